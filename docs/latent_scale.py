"""The trade behind convert.LATENT_RMS: how small the latent rides under DeepSeek's latent RMSNorm.

    python docs/latent_scale.py          # ~15 minutes on 2 CPU cores; prints the table in latent_scale.md

Stock DeepSeek applies RMSNorm(c) = w c / sqrt(mean(c^2) + eps) to the latent c (eps 1e-6). We
make it linear by scaling c down to RMS s (--latent-rms) and w up by 1 / s: the norm then divides by
sqrt(eps + ~s^2), a per-token factor off 1 by about s^2 / (2 eps). Small s is exact in fp32 but
leaves c (a float16 activation), and the weights that make it, below what float16 (smallest
normal 6e-5, subnormal 6e-8) and 8-bit blocks with a float16 scale hold, and puts w past
float16's 65504. convert.balance_input shares the smallness between the attention's input and
the latent rows (both ~sqrt(s) where either alone would carry s).

For each s: the embedded SmolLM2's default conversion (R 64, r 32, F 4, fitted, 16 x 256
calibration tokens), mean NLL on the first 2 x 1024 evaluation tokens, read as
  fp32        as converted;
  f16 store   every weight stored in float16, computed in float32 (llama.cpp's f16 files);
  fp16        the whole model in float16 (vLLM / transformers with dtype float16);
  q8_0        every layer matrix through llama.cpp's q8_0 round trip (blocks of 32 along the
              input, one float16 scale = max|w| / 127, int8), computed in float32.
The original GQA model read the same ways is the baseline each reading is judged against.
"""
import copy
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import convert  # noqa: E402
from checkpoint import CheckpointReader, load_model  # noqa: E402
from cli import read_text  # noqa: E402
from evaluate import perplexity  # noqa: E402
from fetch import ensure_default_model, ensure_texts  # noqa: E402
from test_engines import q8_0  # noqa: E402 (llama.cpp's round trip, as the tests define it)
from tokenizer import load_tokenizer  # noqa: E402


def readings(model, ids: list[int]) -> dict:
    def nll(m):
        return perplexity(m, ids, 1024)["nll"]
    out = {"fp32": nll(model)}
    stored = copy.deepcopy(model)
    with torch.no_grad():
        for p in stored.parameters():
            p.copy_(p.half().float())
    out["f16 store"] = nll(stored)
    out["fp16"] = nll(copy.deepcopy(model).half())
    quant = copy.deepcopy(model)
    with torch.no_grad():
        for name, mod in quant.named_modules():
            if isinstance(mod, torch.nn.Linear) and name.startswith("layers.") and mod.weight.shape[1] % 32 == 0:
                mod.weight.copy_(q8_0(mod.weight))
    out["q8_0"] = nll(quant)
    return out


def main():
    folder = ensure_default_model()
    calib_path, eval_path = ensure_texts()
    tok = load_tokenizer(folder)
    calib = convert.calibration_samples([d for d in read_text(calib_path).splitlines() if d.strip()], tok, 256, 16)
    ids = tok.encode(read_text(eval_path))[: 2 * 1024]
    rows = {"original GQA": readings(load_model(folder)[0], ids)}
    print("original GQA", rows["original GQA"], flush=True)
    for s in (1e-10, 1e-6, 3e-6, 1e-5, 3e-5, 1e-4):
        model = convert.convert_in_memory(CheckpointReader(folder), calib, replace(convert.FITTED, latent_rms=s))
        rows[f"latent RMS {s:g}"] = readings(model, ids)
        print(f"latent RMS {s:g}", rows[f"latent RMS {s:g}"], flush=True)
    print("\n| model | " + " | ".join(rows["original GQA"]) + " |\n|---|" + "---:|" * len(rows["original GQA"]))
    for name, r in rows.items():
        print(f"| {name} | " + " | ".join(f"{v:.4f}" for v in r.values()) + " |")


if __name__ == "__main__":
    main()
