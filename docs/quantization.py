"""What 4-bit GGUF costs the conversion vs the original, and the mixed-precision recipes that even it.

    python docs/quantization.py --llama-cpp LLAMA_CPP_DIR --converter-python CONV/bin/python \
        [--llama-quantize llama-build/bin/llama-quantize] --json docs/quantization.json

Run it with a Python that has llama-cpp-python 0.3.36 (the llama.cpp build of docs/engines.md).
Same measurement as docs/engines.py: the first --tokens ids of the evaluation split (one window, no
BOS) fed as ids, mean NLL through llama_cpp.Llama's logits (docs/engines.py's llama_cpp_nll), for
the embedded SmolLM2-135M (original) and its default conversion (converted), each GGUF made by the
documented sequence (llama.cpp's converter at f32, docs/gguf_q_lora_rank.py, then quantize).

Quantizing: with --llama-quantize, the binary (`--tensor-type NAME=TYPE` per override); without it,
the same library call the binary makes, llama_model_quantize through llama-cpp-python, with the
same overrides as tt_overrides (NAME is a regex searched in each tensor name, as the binary does).
A recipe's override naming a tensor a file lacks (the original has no attn_kv_a_mqa) changes nothing
there. Each row: base type + overrides, NLL and size for both, and the relative NLL cost against f32.

The ids are read with the project's tokenizer in --ids-python (default: python3 on PATH), a Python
that imports the project (torch); the tensor types of each file with gguf in --converter-python.
"""
import argparse
import ctypes
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]

# the overrides tried on both 4-bit base types
OVERRIDES = [
    [],
    ["attn_kv_a_mqa=bf16"],
    ["token_embd=q8_0"],
    ["token_embd=q8_0", "attn_kv_a_mqa=bf16"],
    ["token_embd=q8_0", "attn_kv_a_mqa=q8_0"],
    ["token_embd=q8_0", "attn_kv_a_mqa=q8_0", "attn_k_b=q8_0", "attn_v_b=q8_0"],
]
# (base type, overrides) rows; f32 is the reference, no quantizing
RECIPES = [
    ("f32", []),
    ("q8_0", []),
    *[("Q4_K_M", o) for o in OVERRIDES],
    *[("q4_0", o) for o in OVERRIDES],
    ("q4_0", ["token_embd=q8_0", "attn_kv_a_mqa=q8_0", "attn_k_b=q8_0", "attn_v_b=q8_0", "attn_q=q8_0"]),
]


def eval_ids(n: int, python: str) -> list[int]:
    code = ("import json,sys; sys.path[:0]=[{r!r}]\n"
            "from fetch import EVAL_TEXT, ensure_default_model, ensure_texts\n"
            "from tokenizer import load_tokenizer\n"
            "ensure_texts(); m = ensure_default_model()\n"
            "print(json.dumps(load_tokenizer(m).encode(EVAL_TEXT.read_text())[:{n}]))").format(r=str(ROOT), n=n)
    out = subprocess.run([python, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT).stdout
    return json.loads(out.strip().splitlines()[-1])


def folders(python: str) -> tuple[Path, Path]:
    code = ("import sys; sys.path[:0]=[{r!r}]\n"
            "from fetch import ensure_default_conversion, ensure_default_model\n"
            "print(ensure_default_model()); print(ensure_default_conversion())").format(r=str(ROOT))
    out = subprocess.run([python, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT).stdout
    o, c = out.strip().splitlines()[-2:]
    return Path(o), Path(c)


def f32_gguf(folder: Path, out: Path, llama_cpp: Path, python: str) -> None:
    raw = out.with_suffix(".raw.gguf")
    subprocess.run([python, str(llama_cpp / "convert_hf_to_gguf.py"), str(folder), "--outtype", "f32",
                    "--outfile", str(raw)], check=True, capture_output=True)
    subprocess.run([python, str(HERE / "gguf_q_lora_rank.py"), str(raw), str(out)], check=True, capture_output=True)
    raw.unlink()


def quantize(src: Path, dst: Path, base: str, overrides: list[str], binary: str | None) -> None:
    if binary:
        args = [binary]
        for o in overrides:
            args += ["--tensor-type", o]
        subprocess.run([*args, str(src), str(dst), base], check=True, capture_output=True)
        return
    import llama_cpp.llama_cpp as C
    ftype = {"q8_0": C.LLAMA_FTYPE_MOSTLY_Q8_0, "q4_0": C.LLAMA_FTYPE_MOSTLY_Q4_0,
             "Q4_K_M": C.LLAMA_FTYPE_MOSTLY_Q4_K_M, "f16": C.LLAMA_FTYPE_MOSTLY_F16}[base]
    gtype = {"bf16": 30, "f16": 1, "q8_0": 8, "q6_k": 14, "q5_0": 6, "q4_0": 2}  # enum ggml_type (ggml.h)
    p = C.llama_model_quantize_default_params()
    p.ftype = ftype
    p.nthread = 2
    keep = []
    if overrides:
        arr = (C.llama_model_tensor_override * (len(overrides) + 1))()
        for i, o in enumerate(overrides):
            name, t = o.split("=")
            keep.append(name.lower().encode())
            arr[i].pattern = keep[-1]
            arr[i].type = gtype[t.lower()]
        arr[len(overrides)].pattern = None
        p.tt_overrides = ctypes.cast(arr, ctypes.POINTER(C.llama_model_tensor_override))
    rc = C.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(p))
    if rc:
        raise RuntimeError(f"llama_model_quantize returned {rc}")


def tensor_types(path: Path, python: str) -> dict:
    """{type: count} of the 2-D+ weights (read by gguf in the converter's Python), to show what a recipe made."""
    code = ("import collections, json, sys, gguf\n"
            "c = collections.Counter(t.tensor_type.name for t in gguf.GGUFReader(sys.argv[1]).tensors if len(t.shape) > 1)\n"
            "print(json.dumps(dict(sorted(c.items()))))")
    return json.loads(subprocess.run([python, "-c", code, str(path)], check=True, capture_output=True, text=True).stdout)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-cpp", type=Path, required=True, help="llama.cpp source tree (convert_hf_to_gguf.py)")
    ap.add_argument("--converter-python", required=True, help="Python for the converter (torch, sentencepiece, gguf)")
    ap.add_argument("--llama-quantize", help="the llama-quantize binary (default: llama_model_quantize in-process)")
    ap.add_argument("--ids-python", default="python3", help="Python that imports the project (torch)")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--work", type=Path, help="keep the GGUF files here (default: a temporary folder)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--converted-only", action="store_true",
                    help="skip the original (for recipes naming only MLA tensors, which it lacks: its plain row holds)")
    ap.add_argument("--recipes", type=json.loads, help='JSON [[type, ["NAME=TYPE", ...]], ...] instead of RECIPES')
    args = ap.parse_args()
    from engines import llama_cpp_nll
    ids = eval_ids(args.tokens, args.ids_python)
    original, converted = folders(args.ids_python)
    tmp = None if args.work else tempfile.TemporaryDirectory()
    work = args.work or Path(tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    rows, ref = [], {}
    for label, folder in (("original", original), ("converted", converted)):
        f = work / f"{label}-f32.gguf"
        if not f.exists():
            f32_gguf(folder, f, args.llama_cpp, args.converter_python)
    recipes = args.recipes or RECIPES
    if recipes[0][0] != "f32":
        recipes = [("f32", []), *recipes]
    for base, overrides in recipes:
        row = {"type": base, "overrides": overrides}
        for label in ("original", "converted"):
            if label == "original" and args.converted_only and base != "f32":
                row.update(original=float("nan"), original_MiB=float("nan"), original_cost=float("nan"))
                continue
            src = work / f"{label}-f32.gguf"
            if base == "f32":
                path = src
            else:
                path = work / f"{label}-{base}{''.join('-' + o.replace('=', '_') for o in overrides)}.gguf"
                t0 = time.time()
                quantize(src, path, base, overrides, args.llama_quantize)
                row[f"{label}_quantize_s"] = round(time.time() - t0, 1)
            nll = llama_cpp_nll(str(path), ids)
            row[label] = nll
            row[f"{label}_MiB"] = path.stat().st_size / 2**20
            row[f"{label}_types"] = tensor_types(path, args.converter_python)
            ref.setdefault(label, nll)
            row[f"{label}_cost"] = nll / ref[label] - 1
            if base != "f32":
                path.unlink()
        rows.append(row)
        print(f"{base:<7} {' '.join(overrides) or '-':<70} orig {row['original']:.4f} ({row['original_cost']*100:+.2f}%, "
              f"{row['original_MiB']:.1f} MiB)  conv {row['converted']:.4f} ({row['converted_cost']*100:+.2f}%, "
              f"{row['converted_MiB']:.1f} MiB)", flush=True)
        if args.json:
            args.json.write_text(json.dumps({"tokens": len(ids), "rows": rows}, indent=1) + "\n")
    print("\n| type | overrides | original NLL (cost) | MiB | converted NLL (cost) | MiB |\n|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['type']} | {', '.join(r['overrides']) or '-'} | {r['original']:.4f} ({r['original_cost']*100:+.2f}%) | "
              f"{r['original_MiB']:.1f} | {r['converted']:.4f} ({r['converted_cost']*100:+.2f}%) | {r['converted_MiB']:.1f} |")


if __name__ == "__main__":
    main()
