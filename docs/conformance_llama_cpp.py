"""docs/conformance.py's families in llama.cpp: does the f32 GGUF of each tiny model and of its
conversion load, and what mean NLL does llama.cpp give them (same 256 ids, one window, no BOS)?

    python docs/conformance_llama_cpp.py --llama-cpp LLAMA_CPP_DIR --converter-python CONV/bin/python \
        --llama-python LLAMA_VENV/bin/python --json docs/conformance_llama_cpp.json

Sources and conversions are docs/conformance.py's (build_source, convert, transformers_read: its
code, imported). Each folder goes through the documented llama.cpp sequence at f32 (llama.cpp's
convert_hf_to_gguf.py in --converter-python, docs/gguf_q_lora_rank.py), then llama-cpp-python in
--llama-python reads the ids (docs/engines.py's reading, with llama.cpp's log kept so that a
refusal gives its own error line). transformers fp32 NLL beside it for the agreement.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def worker(job: dict) -> None:
    """In llama-cpp-python's Python: the NLL, llama.cpp's log on stderr."""
    import numpy as np
    import llama_cpp.llama_cpp as C
    from llama_cpp import Llama
    default = C.llama_model_default_params

    def params():  # no extra buffer types, as docs/engines.py (AMX faults on some VMs)
        p = default()
        p.use_extra_bufts = False
        return p
    C.llama_model_default_params = params
    ids = job["ids"]
    llm = Llama(model_path=job["gguf"], n_ctx=len(ids) + 8, n_batch=len(ids) + 8, logits_all=True, verbose=True)
    llm.eval(ids)
    logits = np.asarray(llm.scores[: len(ids) - 1], dtype=np.float64)
    m = logits.max(1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(logits - m).sum(1))
    print(json.dumps(float(np.mean(lse - logits[np.arange(len(ids) - 1), ids[1:]]))))


def error_line(text: str) -> str:
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    for key in ("error", "Error", "failed", "Failed", "Exception"):
        hits = [l for l in lines if key in l]
        if hits:
            return hits[0][:300]
    return lines[-1][:300] if lines else "?"


def llama_cpp_read(folder: Path, work: Path, args, ids: list[int]) -> dict:
    raw, f32 = work / (folder.name + ".raw.gguf"), work / (folder.name + "-f32.gguf")
    res = subprocess.run([args.converter_python, str(args.llama_cpp / "convert_hf_to_gguf.py"), str(folder),
                          "--outtype", "f32", "--outfile", str(raw)], capture_output=True, text=True)
    if res.returncode:
        return {"stage": "convert_hf_to_gguf.py", "error": error_line(res.stderr)}
    res = subprocess.run([args.converter_python, str(HERE / "gguf_q_lora_rank.py"), str(raw), str(f32)],
                         capture_output=True, text=True)
    raw.unlink(missing_ok=True)
    if res.returncode:
        return {"stage": "gguf_q_lora_rank.py", "error": error_line(res.stderr)}
    res = subprocess.run([args.llama_python, __file__, "--worker", json.dumps({"gguf": str(f32), "ids": ids})],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    f32.unlink(missing_ok=True)
    if res.returncode:
        return {"stage": "llama.cpp load/eval", "error": error_line(res.stderr), "returncode": res.returncode}
    return {"nll": json.loads(res.stdout.strip().splitlines()[-1])}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llama-cpp", type=Path)
    p.add_argument("--converter-python")
    p.add_argument("--llama-python")
    p.add_argument("--families", nargs="*")
    p.add_argument("--settings", nargs="*", default=["a", "b2"])
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--work", type=Path, default=Path("/tmp/transmla-conformance-llama"))
    p.add_argument("--json", type=Path)
    p.add_argument("--prepare", action="store_true", help="only build the sources and conversions (kept in --work)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    sys.path[:0] = [str(ROOT), str(HERE)]
    import conformance as cf
    os.environ.update(cf.ONE_THREAD)
    import torch
    torch.set_num_threads(1)
    from fetch import EVAL_TEXT, ensure_default_model, ensure_texts
    from tokenizer import load_tokenizer
    ensure_texts()
    smol = ensure_default_model()
    ids = load_tokenizer(smol).encode(EVAL_TEXT.read_text())[: args.tokens]
    args.work.mkdir(parents=True, exist_ok=True)
    results, sources = [], {}
    for family in args.families or list(cf.FAMILIES):
        for setting in args.settings:
            kv_heads, flags = cf.SETTINGS[setting]
            src = args.work / f"{family}-kv{kv_heads}"
            if not (src / "config.json").exists():  # kept between runs (--prepare builds them alone)
                shutil.rmtree(src, ignore_errors=True)
                cf.build_source(family, kv_heads, src, smol)
            out = args.work / f"{family}-kv{kv_heads}-{setting}-mla"
            info = args.work / f"{out.name}.convert.json"
            if not info.exists():
                info.write_text(json.dumps(cf.convert(src, out, flags)))
            conv = json.loads(info.read_text())
            if args.prepare:
                print(f"{out.name}: {'ok' if conv['ok'] else conv.get('error')}", flush=True)
                continue
            if src not in sources:
                sources[src] = {"transformers": cf.transformers_read(src, ids)[0]["nll"],
                                "llama.cpp": llama_cpp_read(src, args.work, args, ids)}
            r = {"family": family, "setting": setting, "kv_heads": kv_heads,
                 "latent": f"{conv.get('kv_lora_rank')} + {conv.get('qk_rope_head_dim')}", "convert_ok": conv["ok"],
                 "original": sources[src]}
            if conv["ok"]:
                r["converted"] = {"transformers": cf.transformers_read(out, ids)[0]["nll"],
                                  "llama.cpp": llama_cpp_read(out, args.work, args, ids)}
            else:
                r["convert_error"] = conv.get("error")
            results.append(r)
            print(json.dumps(r), flush=True)
            if args.json:
                args.json.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "tokens": len(ids),
                                                 "results": results}, indent=1) + "\n")
    if args.prepare:
        return

    def cell(x):
        lc = x["llama.cpp"]
        return f"{lc['nll']:.4f}" if "nll" in lc else f"fails ({lc['stage']}): {lc['error']}"
    print("\n| family | setting | latent | transformers fp32: original / converted | llama.cpp f32: original | llama.cpp f32: converted |")
    print("|---|---|---|---|---|---|")
    for r in results:
        c = r.get("converted")
        print(f"| {r['family']} | {r['setting']} | {r['latent']} | {r['original']['transformers']:.4f} / "
              f"{c['transformers'] if c else float('nan'):.4f} | {cell(r['original'])} | {cell(c) if c else 'no conversion'} |")


if __name__ == "__main__":
    main()
