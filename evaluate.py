"""Evaluation: perplexity, as every script in this project measures it.

    python bench.py --ppl                 # the embedded model on the embedded evaluation split
    python bench.py --ppl --ckpt MLA_DIR  # any checkpoint (torchrun: TPLA or head-parallel)

Protocol (the one the published comparisons used): tokenize the text without BOS, cut it into
non-overlapping windows of `ctx` tokens, drop a shorter tail, and average the next-token NLL
over every predicted token (ctx - 1 per window). convert.py reports it before and after
converting, finetune.py before and after training, bench.py --ppl on its own.
"""
import math

import torch
import torch.nn.functional as F

from cli import UserError, progress_bar


@torch.no_grad()
def perplexity(model, ids: list[int], ctx: int, progress=None, decode_form: bool = False, batch: int = 4) -> dict:
    """Mean next-token NLL over non-overlapping full windows of ctx tokens: `ppl` over every
    predicted token, `ppl_decode` over the tokens a decode step predicts when the first half of
    the window is the prompt (the tokens at h + 1 ... ctx - 1, h = ctx // 2).
    decode_form: score those tokens by real decode steps (teacher forcing: prefill the first half,
    then feed the true tokens h ... ctx - 2 one at a time), `batch` windows at once; otherwise
    one full forward per window gives both (the same numbers for an exact model)."""
    n_windows = len(ids) // ctx
    if n_windows == 0:
        raise UserError(f"the text has {len(ids)} tokens, fewer than one window of --ctx {ctx}")
    if max(ids) >= model.args.vocab_size:
        raise UserError(f"token id {max(ids)} is past the model's vocab_size {model.args.vocab_size} (the "
                        f"tokenizer has tokens the checkpoint has no embedding for)")
    device = model.tok_embeddings.weight.device
    windows = torch.tensor(ids[: n_windows * ctx], device=device).view(n_windows, ctx)
    h = ctx // 2
    total, total_decode = 0.0, 0.0
    if progress:
        progress(0, n_windows)  # a bar from the start: the first window can take a while
    if not decode_form:
        for i, w in enumerate(windows):
            logits = model(w[None])  # (1, ctx, V)
            nll = F.cross_entropy(logits[0, :-1].float(), w[1:], reduction="none")  # nll[j]: token j + 1
            total += nll.sum().item()
            total_decode += nll[h:].sum().item()
            if progress:
                progress(i + 1, n_windows)
    else:
        model.setup_caches(min(batch, n_windows), ctx)
        for b in range(0, n_windows, batch):
            w = windows[b: b + batch]
            logits = model(w[:, :h], torch.arange(h, device=device))  # (B, h, V): prefill predicts 1 ... h
            total += F.cross_entropy(logits.flatten(0, 1).float(), w[:, 1: h + 1].flatten(), reduction="sum").item()
            for pos in range(h, ctx - 1):
                logits = model(w[:, pos: pos + 1], torch.tensor([pos], device=device))  # (B, 1, V)
                nll = F.cross_entropy(logits[:, 0].float(), w[:, pos + 1], reduction="sum").item()
                total, total_decode = total + nll, total_decode + nll
            if progress:
                progress(min(b + batch, n_windows), n_windows)
        model.clear_caches()
    n, n_decode = n_windows * (ctx - 1), n_windows * (ctx - 1 - h)
    return {"ppl": math.exp(total / n), "nll": total / n, "tokens": n,
            "ppl_decode": math.exp(total_decode / n_decode), "nll_decode": total_decode / n_decode,
            "tokens_decode": n_decode, "windows": n_windows, "ctx": ctx}


class WindowBar:
    """A progress callback for perplexity(): a tqdm bar on stderr (windows done of all, with an ETA),
    made on the first call and closed on the last, so a long evaluation is never a silent minute.
    disable: no bar (ranks other than 0)."""

    def __init__(self, desc: str, disable: bool = False):
        self.desc, self.disable, self.bar = desc, disable, None

    def __call__(self, done: int, total: int):
        if self.bar is None:
            self.bar = progress_bar(total=total, desc=self.desc, unit="window", disable=self.disable)
        self.bar.update(done - self.bar.n)
        if done == total:
            self.bar.close()
