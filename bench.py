"""Benchmarks. For now: perplexity (the speed and memory benchmark comes with the fast path).

    python bench.py --ppl                          # the embedded model on the evaluation split
    python bench.py --ppl assets/lee_eval.txt --ckpt path/to/checkpoint --ctx 1024

Perplexity protocol (the same everywhere in this project, and the one the published
comparison used): tokenize the text without BOS, cut it into non-overlapping windows of
--ctx tokens, drop a shorter tail, and average the next-token NLL over every predicted token
(ctx - 1 per window). The last stdout line is one JSON object with "ppl".
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from checkpoint import UserError, default_or, load_model, pick_device, pick_dtype, run


def read_text(path: str | Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read it as UTF-8 text ({e})") from None


@torch.no_grad()
def perplexity(model, ids: list[int], ctx: int, progress=None) -> dict:
    """Mean next-token NLL over non-overlapping full windows of ctx tokens."""
    n_windows = len(ids) // ctx
    if n_windows == 0:
        raise UserError(f"the text has {len(ids)} tokens, fewer than one window of --ctx {ctx}")
    device = model.tok_embeddings.weight.device
    windows = torch.tensor(ids[: n_windows * ctx], device=device).view(n_windows, ctx)
    total = 0.0
    for i, w in enumerate(windows):
        logits = model(w[None])  # (1, ctx, V)
        total += F.cross_entropy(logits[0, :-1].float(), w[1:], reduction="sum").item()
        if progress:
            progress(i + 1, n_windows)
    n = n_windows * (ctx - 1)
    return {"ppl": math.exp(total / n), "nll": total / n, "tokens": n, "windows": n_windows, "ctx": ctx}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="checkpoint folder or any file in it (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--ppl", nargs="?", const="", metavar="TEXT",
                   help="measure perplexity on this text file (no file: the embedded evaluation split)")
    p.add_argument("--ctx", type=int, default=1024, help="window length in tokens")
    p.add_argument("--max-tokens", type=int, help="use only the first N tokens of the text")
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--dtype", help="float32, bfloat16 or float16 (default: float32 on CPU)")
    args = p.parse_args()
    if args.ppl is None:
        raise UserError("nothing to do: pass --ppl [TEXT] (the speed benchmark is not written yet)")
    if args.ctx < 2:
        raise UserError("--ctx must be at least 2")

    from tokenizer import load_tokenizer
    if args.ppl == "":
        from fetch import ensure_texts
        args.ppl = ensure_texts()[1]
    text = read_text(args.ppl)
    device = pick_device(args.device)
    model, folder = load_model(default_or(args.ckpt), device=device, dtype=pick_dtype(args.dtype, device))
    ids = load_tokenizer(folder).encode(text, bos=False)[: args.max_tokens]

    def progress(i, n):
        print(f"\rwindow {i}/{n}", end="", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    result = perplexity(model, ids, args.ctx, progress)
    print(file=sys.stderr)
    result.update(ckpt=str(folder), text=str(args.ppl), seconds=round(time.perf_counter() - t0, 1))
    print(f"perplexity {result['ppl']:.4f} over {result['tokens']} predicted tokens "
          f"({result['windows']} windows of {args.ctx}) in {result['seconds']}s")
    print(json.dumps(result))


if __name__ == "__main__":
    run(main)
