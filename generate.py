"""Text generation with a preallocated KV cache (per-head K/V for GQA, the latent for MLA).

    python generate.py --prompt "The capital of France is" --temperature 0
    python generate.py --ckpt path/to/checkpoint --prompt "Tell me a story" --chat --max-new-tokens 200
    python generate.py --prompt "Once upon a time" --compile        # compiled one-token decode step
    torchrun --nproc_per_node=2 generate.py --prompt "The capital of France is" --temperature 0
    torchrun --nproc_per_node=2 generate.py --ckpt MLA_DIR --prompt "Hi" --tp heads --tpla-transform pca

Prints only the continuation on stdout, streamed as it is produced; timing on stderr.
Without --ckpt it runs the embedded SmolLM2-135M-Instruct (fetched on first use).

Under torchrun (or with --tp) the model is split across the processes (tpla.py): TPLA for an MLA
checkpoint, head-parallel for GQA; without --ckpt it is the embedded model's default MLA
conversion (made on first use). Every rank runs the same loop with the same seed; rank 0 prints.

The loop is two functions: prefill (the whole prompt in one forward, MLA in its naive form)
and decode_one_token (one token against the cache, MLA in its absorbed form). The decode step
has fixed shapes and takes positions as a tensor, so `torch.compile` traces it once.
"""
import argparse
import sys
import time

import torch

import tpla
from cli import UserError, launched, pick_device, pick_dtype, run
from tokenizer import load_tokenizer


def sample(logits: torch.Tensor, temperature: float, top_k: int | None) -> torch.Tensor:
    """(B, V) logits -> (B, 1) next tokens. temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    # argmax(p / E) with E ~ Exp(1) is a draw from p: no multinomial, no host sync, compiles cleanly
    return (probs / torch.empty_like(probs).exponential_(1)).argmax(-1, keepdim=True)


def prefill(model, tokens: torch.Tensor, input_pos: torch.Tensor, temperature: float, top_k: int | None):
    logits = model(tokens, input_pos)  # (B, T, V)
    return sample(logits[:, -1], temperature, top_k)


def decode_one_token(model, token: torch.Tensor, input_pos: torch.Tensor, temperature: float,
                     top_k: int | None):
    logits = model(token, input_pos)  # (B, 1, V)
    return sample(logits[:, -1], temperature, top_k)


@torch.no_grad()
def generate(model, prompt: list[int], max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, stop_ids: set[int] = frozenset(), decode_step=decode_one_token,
             on_token=None) -> list[int]:
    """Generate up to max_new_tokens after `prompt`; the caches must hold len(prompt) + max_new_tokens.
    Returns the new tokens (the stop token, if one came, included)."""
    device = model.tok_embeddings.weight.device
    tokens = torch.tensor([prompt], device=device)
    T = len(prompt)
    token = prefill(model, tokens, torch.arange(T, device=device), temperature, top_k)
    out = []
    for i in range(max_new_tokens):
        out.append(token.item())
        if on_token:
            on_token(out)
        if out[-1] in stop_ids or i == max_new_tokens - 1:
            break
        input_pos = torch.tensor([T + i], device=device)
        token = decode_step(model, token.view(1, 1), input_pos, temperature, top_k).clone()
    return out


def compile_decode_step(device: str):
    # fullgraph: a graph break would put Python back into every token; reduce-overhead adds
    # CUDA graphs, which replay the whole step as one launch
    if device.startswith("cpu"):
        decompose_small_matmuls()
    mode = "reduce-overhead" if device.startswith("cuda") else None
    return torch.compile(decode_one_token, fullgraph=True, dynamic=False, mode=mode)


def decompose_small_matmuls(max_rows: int = 8):
    """On CPU a decode step multiplies 1 to `max_rows` rows by each weight matrix, and its time is
    reading the weights. BLAS does that at a fraction of the memory bandwidth; inductor can
    instead emit those matmuls as its own vectorised multiply-and-sum loops, which read the
    weights faster (docs/speed.md measures both). Batched matmuls (attention) stay with BLAS: as
    loops they are slower."""
    from torch._inductor import config
    from torch._inductor.fx_passes import decompose_mem_bound_mm as pass_
    limits = {"cpu_max_first_dimension_decomposition": max_rows, "cpu_max_other_dimension_decomposition": 1 << 20}
    config.post_grad_fusion_options = {**config.post_grad_fusion_options, "decompose_mm_pass": limits}
    for name, value in limits.items():  # the pass reads its limits once, at import
        setattr(pass_, name, value)
    pass_.should_decompose_bmm = lambda mat1, mat2: False


class Streamer:
    """Writes the decoded continuation as it grows, holding back an incomplete UTF-8 character
    until the next token completes it; finish() writes what is held back at the end (as
    transformers' decode of the same ids shows it: U+FFFD for each byte of a cut character)."""

    def __init__(self, tokenizer, stop_ids):
        self.tok, self.stop_ids, self.shown, self.ids = tokenizer, stop_ids, "", []

    def __call__(self, ids: list[int], final: bool = False):
        self.ids = ids
        text = self.tok.decode([t for t in ids if t not in self.stop_ids])
        if text.endswith("\ufffd") and not final:
            return
        sys.stdout.write(text[len(self.shown):])
        sys.stdout.flush()
        self.shown = text

    def finish(self):
        self(self.ids, final=True)


def main():
    args = parse_args()
    if args.compile and (launched() or args.tp):
        raise UserError("--compile is not supported with tensor parallelism (the decode step runs eager)")
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)  # what can fail at once, before joining a process group
    where = tpla.place(args.ckpt, args.tp, args.tpla_transform, device)
    tok = load_tokenizer(where.folder)
    prompt = encode_prompt(tok, args.prompt, args.chat)  # a bad prompt fails before the weights are read
    model = where.load(dtype)
    if max(prompt) >= model.args.vocab_size:
        raise UserError(f"--prompt: token id {max(prompt)} is past the model's vocab_size {model.args.vocab_size} "
                        f"(the tokenizer has tokens the checkpoint has no embedding for)")
    log = (lambda *a: print(*a, file=sys.stderr)) if where.rank == 0 else (lambda *a: None)
    model.setup_caches(1, len(prompt) + args.max_new_tokens)
    log(f"loaded {where.folder.name} ({describe_cache(model, where, dtype)}) in {time.perf_counter() - t0:.1f}s")
    step = decode_one_token
    if args.compile:
        step = compiled_step(model, len(prompt), args.temperature, args.top_k, log)
        torch.manual_seed(args.seed)

    t0 = time.perf_counter()
    streamer = Streamer(tok, tok.eos_ids) if where.rank == 0 else None
    out = generate(model, prompt, args.max_new_tokens, args.temperature, args.top_k, tok.eos_ids, step,
                   on_token=streamer)
    dt = time.perf_counter() - t0
    if streamer:
        streamer.finish()
        sys.stdout.write("\n")
    log(f"{len(out)} tokens in {dt:.2f}s: {len(out) / dt:.1f} tokens/s (prompt {len(prompt)} tokens)")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="checkpoint folder or any file in it (default: embedded SmolLM2-135M-Instruct; "
                                  "under torchrun its default MLA conversion)")
    p.add_argument("--prompt", required=True, help="text to continue (or the user message with --chat)")
    p.add_argument("--max-new-tokens", type=int, default=100, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 is greedy")
    p.add_argument("--top-k", type=int, default=200, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--seed", type=int, default=1234, help="random seed")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--compile", action="store_true", help="torch.compile the one-token decode step")
    tpla.add_placement_flags(p)
    args = p.parse_args()
    if args.max_new_tokens < 1:
        raise UserError("--max-new-tokens must be at least 1")
    return args


def encode_prompt(tok, text: str, chat: bool) -> list[int]:
    """The prompt's ids: in the model's chat template (--chat), or with the BOS transformers adds."""
    prompt = tok.encode_chat([{"role": "user", "content": text}]) if chat else tok.encode(text, add_special_tokens=True)
    if not prompt:
        raise UserError("--prompt is empty")
    return prompt


def describe_cache(model, where: tpla.Placement, dtype: torch.dtype) -> str:
    """What one token costs in the cache of one layer (of this rank), in values and bytes."""
    values = sum(layer.attention.kv_values_per_token() for layer in model.layers) // model.args.n_layers
    return (f"{'MLA' if model.args.is_mla else 'GQA'}{', ' + where.describe() if where.mode else ''}; cache per token per layer"
            f"{' per rank' if where.mode else ''}: {values} values, "
            f"{model.kv_bytes_per_token() // model.args.n_layers} bytes in {str(dtype).removeprefix('torch.')}")


def compiled_step(model, n_prompt: int, temperature: float, top_k: int | None, log):
    """The compiled decode step, compiled now on throwaway positions past the prompt, so that the
    timing of the generation is steady-state."""
    step = compile_decode_step(model.tok_embeddings.weight.device.type)
    t0 = time.perf_counter()
    device = model.tok_embeddings.weight.device
    for _ in range(2):
        step(model, torch.zeros(1, 1, dtype=torch.long, device=device), torch.tensor([n_prompt], device=device),
             temperature, top_k)
    log(f"compiled the decode step in {time.perf_counter() - t0:.1f}s")
    return step


if __name__ == "__main__":
    run(main)
