"""The TPLA choices measured and not kept (docs/tpla.md, the first table): each latent transform, a
rope key dealt to the ranks like the latent (split), each shard's scores scaled by the world size
(rescale). tpla.py keeps the whole rope key on every rank and the scores as they are; this script
keeps the two other readings, so that the table can be made again.

    python convert.py --method transmla --out assets/SmolLM2-135M-Instruct-mla-transmla --eval-text none
    python docs/tpla_variants.py --ckpt assets/SmolLM2-135M-Instruct-mla-transmla     # 22 min here

Each row runs TPLA on `--world` ranks in one process, as tpla.SimulatedTPLA does: the first half of
every window in MLA form (the prefill), the second in TPLA form (each shard a softmax of its own,
the shards' outputs summed), which are the logits the ranks give (test_tp_two_ranks); so `ppl` and
`ppl_decode` are what `torchrun --nproc_per_node=2 bench.py --ppl --tp tpla` printed for the same
settings when tpla.py had them as flags (--tpla-rope split, --tpla-rescale). The transforms are
tpla.py's own (hadamard, pca, pca-sorted: pca calibrated, as load_parallel calibrates it, on 2048
tokens of the embedded calibration split).
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tpla  # noqa: E402
from checkpoint import load_model  # noqa: E402
from cli import read_text  # noqa: E402
from evaluate import perplexity  # noqa: E402
from fetch import ensure_texts  # noqa: E402
from model import MLA, absorbed_attention, attention_mask  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402

# (label, transform, rope key split, scores rescaled); None: the model on one device
ROWS = [("single device", None, False, False), ("none", "none", False, False),
        ("pca-sorted", "pca-sorted", False, False), ("pca (round-robin)", "pca", False, False),
        ("hadamard", "hadamard", False, False), ("hadamard, rescale", "hadamard", False, True),
        ("pca, rescale", "pca", False, True), ("none, rescale", "none", False, True),
        ("hadamard, rope split, rescale", "hadamard", True, True)]


class Variant(MLA):
    """TPLA on `world` shards in one process (tpla.SimulatedTPLA's reading), with two choices
    tpla.py does not keep. split_rope: shard i keeps the rotary pairs i, i + world, ... of the rope
    key (in the rotate_half layout pair j is dims j and j + r/2), not all of them. rescale: the
    shard's latent scores times world, so that they keep the whole latent's magnitude (and the
    rope scores too where the rope key is split)."""
    world, start, split_rope, rescale = 2, 0, False, False

    def forward(self, x, cos, sin, mask, input_pos=None):
        B, T, _ = x.shape
        q_nope, q_pe, c, k_pe = self.project(x, cos, sin)
        y = self._naive(q_nope, q_pe, torch.cat([c, k_pe], dim=-1), mask)  # (B, T, H, d_v): MLA form
        s, g, half = self.start, self.world, self.r // 2
        w = self.wkv_b.weight.view(self.n_heads, self.d_nope + self.d_v, self.R)
        lat_gain = float(g) if self.rescale else 1.0
        rope_gain = float(g) if self.rescale and self.split_rope else 1.0
        decode = 0
        for i in range(g):
            P = slice(*tpla.split(self.R, i, g))
            pairs = list(range(i, half, g)) if self.split_rope else list(range(half))
            dims = torch.tensor(pairs + [half + j for j in pairs], device=x.device)
            kv = torch.cat([c[..., P], k_pe[..., dims]], dim=-1)  # what rank i caches
            decode = decode + absorbed_attention(q_nope[:, s:], q_pe[:, s:, :, dims] * rope_gain, kv,
                                                 w[:, : self.d_nope, P] * lat_gain, w[:, self.d_nope:, P], self.scale,
                                                 mask[s:])
        return self.wo(torch.cat([y[:, :s], decode], dim=1).reshape(B, T, -1))


@torch.no_grad()
def transformed(folder: Path, transform: str, world: int, calib: torch.Tensor):
    """The model with its latent transformed as load_parallel transforms it (exact on one device)."""
    model = load_model(folder)[0]
    R = model.args.kv_lora_rank
    if transform == "hadamard":
        for block in model.layers:
            tpla.fold_transform(block.attention, tpla.hadamard(R))
    elif transform.startswith("pca"):  # each layer's latents on the exact model's own hidden states
        T = calib.shape[1]
        model.set_rope(max(T, model.rope_cos.shape[0]))
        cos, sin, pos = model.rope_cos[:T], model.rope_sin[:T], torch.arange(T)
        h = model.tok_embeddings(calib)
        for block in model.layers:
            tpla.fold_transform(block.attention, torch.eye(R))
            Q = tpla.pca_basis(tpla.latent_moment(block.attention, block.attention_norm(h)), world,
                               interleave=transform == "pca")
            h = block(h, cos, sin, attention_mask(pos, pos))
            tpla.fold_transform(block.attention, Q)
    return model


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="an MLA checkpoint (the table: the official method's conversion)")
    p.add_argument("--world", type=int, default=2, help="the number of TPLA shards")
    p.add_argument("--max-tokens", type=int, default=8192, help="score the first N tokens of the evaluation split")
    p.add_argument("--ctx", type=int, default=1024, help="window length; its second half is decoded in TPLA form")
    a = p.parse_args()
    folder = Path(a.ckpt)
    calib_text, eval_text = ensure_texts()
    tok = load_tokenizer(folder)
    ids = tok.encode(read_text(eval_text))[: a.max_tokens]
    calib = tpla.calibration_ids(folder)
    print(f"| TPLA x{a.world} ({folder.name}) | ppl | ppl_decode | vs single (ppl_decode) |\n|---|---|---|---|")
    single = None
    for label, transform, split_rope, rescale in ROWS:
        model = load_model(folder)[0] if transform is None else transformed(folder, transform, a.world, calib)
        for layer in model.layers if transform is not None else ():
            layer.attention.__class__ = Variant
            layer.attention.world, layer.attention.start = a.world, a.ctx // 2
            layer.attention.split_rope, layer.attention.rescale = split_rope, rescale
        r = perplexity(model, ids, a.ctx)
        single = single or r["ppl_decode"]
        print(f"| {label} | {r['ppl']:.2f} | {r['ppl_decode']:.2f} | {r['ppl_decode'] / single - 1:+.1%} |", flush=True)


if __name__ == "__main__":
    main()
