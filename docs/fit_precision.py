"""What float32 statistics and fits would change in a conversion (docs/convert_cost.md).

    python docs/fit_precision.py            # the embedded model at the default setting, ~6 min here

convert.py computes the second moments, eigendecompositions and least-squares fits in float64
(convert.FIT). A consumer GPU does float64 at 1/64 of its float32 rate, so this runs the same
conversion twice in this process, with convert.FIT float64 and float32, and prints the largest
relative difference between the written tensors (each against its own largest entry) and both
perplexities on the embedded evaluation split.
"""
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import convert  # noqa: E402
from checkpoint import CheckpointReader  # noqa: E402


def converted(fit: torch.dtype, out: Path) -> dict:
    convert.FIT = fit
    sys.argv = ["convert.py", "--out", str(out)]
    convert.main()
    return json.loads((out / "convert_report.json").read_text())


def main():
    with tempfile.TemporaryDirectory() as tmp:
        runs = {name: (converted(dtype, Path(tmp) / name), CheckpointReader(Path(tmp) / name))
                for name, dtype in (("float64", torch.float64), ("float32", torch.float32))}
        (r64, a), (r32, b) = runs["float64"], runs["float32"]
        worst, where = 0.0, ""
        for name in a.weight_map:
            x, y = a.get(name).double(), b.get(name).double()
            d = ((y - x).abs().max() / x.abs().max().clamp_min(1e-30)).item()
            worst, where = max((worst, where), (d, name))
    print(f"perplexity after conversion: float64 fits {r64['ppl_after']}, float32 fits {r32['ppl_after']} "
          f"(before: {r64['ppl_before']})")
    print(f"largest relative difference between the written tensors: {worst:.3g} ({where})")


if __name__ == "__main__":
    main()
