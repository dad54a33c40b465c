"""How step 6's settings (Adam steps, learning rate, batch) trade time for held-out error, per layer
(docs/accuracy.md, "Block reconstruction").

    python docs/block_fit_settings.py --layers 4,16 --settings "steps=150,lr=1e-2" "steps=200,lr=1e-2"

A full conversion costs six to ten minutes and says one number; this asks each setting the question
step 6 answers, per layer, in seconds: the embedded model's default calibration (160 samples of 256
tokens: 128 fitted on, the other 32 held out), each listed layer converted by steps 1-5 on the
original model's activations (the default recipe's one stream), then fit_block at each setting from
the same start. Printed per layer and setting: the relative error of the attention output (mean
squared error over the original output's mean square) on the 128 fitted samples and on the 32 held
out, and the seconds it took.
"""
import argparse
import copy
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from checkpoint import CheckpointReader  # noqa: E402
from convert import FITTED, advance, attention_outputs, calibration_samples, convert_layer, fit_block  # noqa: E402
from fetch import calibration_documents, default_or  # noqa: E402
from model import Block, attention_mask, model_rope  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402

FITTED_ON = 128  # samples the fits see; the rest of the calibration samples are held out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", default="4,16", help="layers to fit, comma separated")
    p.add_argument("--settings", nargs="+", default=["steps=150,lr=1e-2", "steps=200,lr=1e-2"],
                   help="fit_block keyword settings, each as k=v,k=v")
    a = p.parse_args()
    layers = sorted(int(i) for i in a.layers.split(","))
    settings = [{k: float(v) if k == "lr" else int(v) for k, v in (kv.split("=") for kv in s.split(","))}
                for s in a.settings]
    reader = CheckpointReader(default_or(None))
    calib = calibration_samples(calibration_documents(), load_tokenizer(reader.folder), 256, FITTED_ON + 32)
    torch.manual_seed(0)
    for i, rows in stream(reader, calib, layers, settings):
        print(f"layer {i}: " + "\n  ".join(rows), flush=True)


@torch.no_grad()
def stream(reader: CheckpointReader, calib: torch.Tensor, layers: list[int], settings: list[dict]):
    """The calibration samples through the original model, as convert_layers streams them for the
    default recipe; at each listed layer, its rows of results (compare)."""
    gqa, T = reader.args, calib.shape[1]
    with torch.device("meta"):
        emb = torch.nn.Embedding(gqa.vocab_size, gqa.dim)
    reader.fill(emb, "tok_embeddings.")
    h = emb(calib)
    mask, rope_gqa = attention_mask(torch.arange(T), torch.arange(T)), model_rope(gqa, T)
    for i in range(max(layers) + 1):
        with torch.device("meta"):
            block = Block(gqa)
        reader.fill(block, f"layers.{i}.")
        base = convert_layer(block, gqa, h[:FITTED_ON], None, replace(FITTED, block_fit=0))
        if i in layers:
            yield i, compare(block, base.block, h, rope_gqa, model_rope(base.args, T), mask, settings)
        advance(block, h, rope_gqa, mask)


def compare(block: Block, start: Block, h: torch.Tensor, rope_gqa: tuple, rope: tuple, mask: torch.Tensor,
            settings: list[dict]) -> list[str]:
    """fit_block at each setting from the same closed-form start: fitted and held-out errors."""
    want, want_fitted = (attention_outputs(block, x, rope_gqa, mask) for x in (h[FITTED_ON:], h[:FITTED_ON]))

    def held_out(b: Block) -> float:
        got = b.attention(b.attention_norm(h[FITTED_ON:]), *rope, mask)
        return ((got - want).pow(2).mean() / want.pow(2).mean()).item()
    rows = [f"steps 1-5: held out {held_out(start):.4f}"]
    for s in settings:
        fitted, t = copy.deepcopy(start), time.perf_counter()
        _, after = fit_block(fitted, h[:FITTED_ON], want_fitted, rope, mask, **s)
        rows.append(f"{s}: fitted {after:.4f}, held out {held_out(fitted):.4f} ({time.perf_counter() - t:.0f} s)")
    return rows


if __name__ == "__main__":
    main()
