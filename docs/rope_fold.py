"""What writing a llama3 rope_scaling as DeepSeek's YaRN (convert.written_rope, the form every
engine reads alike) costs a conversion, against writing it as it is (--keep-rope-scaling, exact in
transformers only), on real weights: the embedded SmolLM2 given Llama-3.1's rope_scaling (factor
8, low_freq_factor 1, high_freq_factor 4, original context 8192; SmolLM2's theta 10000 puts 4 of
its 32 pairs where llama3 blends, 2 of them among the 16 the default r = 32 keeps). That model is
not SmolLM2 any more (its slow pairs turn 8x slower): it is the "original" both conversions are
held against, on the embedded evaluation split (docs/engines.md).

    python docs/rope_fold.py        # two conversions (steps 1-5, news calibration, as measured) and their evaluation: about 14 min here
"""
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fetch import CALIB_TEXT, EVAL_TEXT, ensure_default_model, ensure_texts  # noqa: E402

LLAMA31 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 8192}


def llama3_copy(src: Path, dst: Path) -> Path:
    """src with Llama-3.1's rope_scaling in its config; the other files linked."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name != "config.json" and not (dst / f.name).exists():
            (dst / f.name).symlink_to(f.resolve())
    config = json.loads((src / "config.json").read_text())
    config.pop("rope_parameters", None)
    config.update(rope_scaling=LLAMA31, max_position_embeddings=131072)
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst


def main():
    ensure_texts()
    src = llama3_copy(ensure_default_model(), ROOT / "assets" / "SmolLM2-llama3")
    rows = {}
    for label, extra in (("llama3 kept (--keep-rope-scaling)", ["--keep-rope-scaling"]), ("written as YaRN", [])):
        out = ROOT / "assets" / f"SmolLM2-llama3-mla{'-kept' if extra else ''}"
        subprocess.run([sys.executable, str(ROOT / "convert.py"), "--ckpt", str(src), "--out", str(out),
                        "--eval-text", str(EVAL_TEXT), "--calib-text", str(CALIB_TEXT), "--block-fit", "0", *extra],
                       check=True)
        report = json.loads((out / "convert_report.json").read_text())
        rows[label] = (report["ppl_before"], report["ppl_after"])
        shutil.rmtree(out)
    print("| written | original (SmolLM2 + llama3) | converted, R 64 + r 32 |\n|---|---:|---:|")
    for label, (before, after) in rows.items():
        print(f"| {label} | {before:.2f} | {after:.2f} |")


if __name__ == "__main__":
    main()
