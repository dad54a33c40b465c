"""Every source family in every engine: tiny models of each family's real shape, converted by
convert.py, read by transformers and by vLLM (CPU) on the same token ids.

    python docs/conformance.py --vllm-python /work/vllm-venv/bin/python --json docs/conformance.json
    python docs/conformance.py --families llama2 mistral          # some families; transformers only

For each family (llama2, llama3.1, qwen2.5, mistral, mixtral) a random model of its real layout
(hidden 512, 8 query heads of 64, 2 layers, SmolLM2's tokenizer and vocabulary; q, k and lm_head
sharpened so that attention and logits are far from uniform) is built by transformers at two KV
head counts and converted with `convert.py --eval-text none --calib-tokens 8192`:

  a   8 KV heads (2 x 8 x 64 = 1024 values per token per layer), --kv-lora-rank 512 --rope-dim 64:
      576, the engines' fast shape, the one vLLM's CPU MLA kernel takes
  b   the same source, no --kv-lora-rank / --rope-dim: the latent convert.py picks
  b2  2 KV heads (the families' real 4:1 grouping, 256 values), the latent convert.py picks
      (a 512 + 64 latent cannot compress 256 values: convert.py refuses it, and the refusal is kept)

Each folder, original and converted, is read on the first --tokens ids of the evaluation split
(one window, no BOS): transformers fp32 (AutoModelForCausalLM; Mistral4ForCausalLM by name where
Auto does not map the folder) gives the mean NLL, the largest |logit difference| converted vs
original, and the values per token per layer its cache holds (the shapes of past_key_values);
vLLM fp32, in its own Python, gives the mean NLL through prompt_logprobs, as docs/engines.py reads
it (VLLM_MLA_DISABLE=1 unless R + r = 576, the rotary custom op off, CPU_MLA in fp32 with MLA on),
and the KV cache it allocates per token per layer: its engine core's KVCacheConfig, tensor bytes /
(blocks x block size x layers), = page bytes / block size (the log's 'CPU KV cache size: N tokens'
is max concurrency x max_model_len with each request rounded up to whole blocks: 1 GiB / N / layers
overstates it, and is kept in the json only as a check). A folder that declares a shorter context
than the test (Mistral's: its sliding window) is refused by vLLM at that length; it is tried again
with VLLM_ALLOW_LONG_MAX_MODEL_LEN=1, and both engines also read the first (context - 8) ids, where
original and conversion are the same model. convert.py's 'note:' lines are kept per conversion.
Every model run here uses one thread (OMP_NUM_THREADS=1).
"""
import argparse
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
KV_SPACE_GIB = 1  # VLLM_CPU_KVCACHE_SPACE

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 256, "rope_theta": 500000.0}
# family -> (transformers config class, its kwargs beyond the shared shape)
FAMILIES = {
    "llama2": ("LlamaConfig", {}),
    "llama3.1": ("LlamaConfig", {"rope_parameters": LLAMA3, "max_position_embeddings": 2048}),
    "qwen2.5": ("Qwen2Config", {"tie_word_embeddings": True}),
    "mistral": ("MistralConfig", {"head_dim": 64, "sliding_window": 128}),
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2}),
}
SHAPE = dict(hidden_size=512, num_attention_heads=8, head_dim=64, num_hidden_layers=2, intermediate_size=1024,
             max_position_embeddings=1024, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
# setting -> (source KV heads, extra convert.py flags)
SETTINGS = {"a": (8, ["--kv-lora-rank", "512", "--rope-dim", "64"]), "b": (8, []), "b2": (2, [])}
TRY_TOO = {"b2": ["--kv-lora-rank", "512", "--rope-dim", "64"]}  # also tried, to record what convert.py says


# ----------------------------------------------------------------------------- the vLLM worker (vLLM's Python)

def vllm_worker(job: dict) -> dict:
    """Mean NLL of ids[1:] and the KV cache vLLM allocated, read in-process (no project imports)."""
    for k, v in (("HF_HUB_OFFLINE", "1"), ("VLLM_CPU_KVCACHE_SPACE", str(KV_SPACE_GIB)),
                 ("VLLM_ENABLE_V1_MULTIPROCESSING", "0")):
        os.environ.setdefault(k, v)
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    ids = job["ids"]
    llm = LLM(model=job["folder"], tokenizer=job["folder"], dtype="float32", max_model_len=len(ids) + 8,
              enforce_eager=True, enable_prefix_caching=False, compilation_config={"custom_ops": ["-rotary_embedding"]},
              attention_config={"backend": job["backend"]} if job.get("backend") else None)
    out = llm.generate([TokensPrompt(prompt_token_ids=ids)],
                       SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0, detokenize=False), use_tqdm=False)
    lps = out[0].prompt_logprobs[1:]
    nll = -sum(lp[t].logprob for lp, t in zip(lps, ids[1:])) / (len(ids) - 1)
    cache = {}
    try:  # the engine core's own KVCacheConfig (in-process with VLLM_ENABLE_V1_MULTIPROCESSING=0)
        cfg = llm.llm_engine.engine_core.engine_core.scheduler.kv_cache_config
        cache["num_blocks"] = cfg.num_blocks
        cache["tensor_bytes"] = sum(t.size for t in cfg.kv_cache_tensors)
        cache["groups"] = [{"spec": type(g.kv_cache_spec).__name__, "layers": len(g.layer_names),
                            "block_size": g.kv_cache_spec.block_size, "page_size_bytes": g.kv_cache_spec.page_size_bytes,
                            "num_kv_heads": getattr(g.kv_cache_spec, "num_kv_heads", None),
                            "head_size": getattr(g.kv_cache_spec, "head_size", None),
                            "head_size_v": getattr(g.kv_cache_spec, "head_size_v", None),
                            "sliding_window": getattr(g.kv_cache_spec, "sliding_window", None),
                            "dtype": str(getattr(g.kv_cache_spec, "dtype", ""))} for g in cfg.kv_cache_groups]
    except Exception as e:  # noqa: BLE001 - a reading, not a requirement
        cache["error"] = f"{type(e).__name__}: {e}"
    return {"nll": nll, "cache": cache}


# ----------------------------------------------------------------------------- sources and conversions

def build_source(family: str, kv_heads: int, folder: Path, tokenizer_from: Path):
    """A random model of the family's layout, sharpened; saved with SmolLM2's tokenizer."""
    import torch
    import transformers as tf
    cls_name, extra = FAMILIES[family]
    cfg = getattr(tf, cls_name)(**{**SHAPE, "num_key_value_heads": kv_heads, "vocab_size": 49152, **extra})
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            big = name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias"))  # Qwen-sized biases
            p.add_(torch.randn_like(p) * (0.5 if big else 0.02))  # norms and the rest just off their init
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(4.0)  # sharp attention: scores 16x the init's
        model.lm_head.weight.mul_(4.0)  # sharp logits (for a tied model, the embeddings too: norms follow them)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_from / f, folder / f)


def convert(src: Path, out: Path, flags: list[str]) -> dict:
    """convert.py as a user runs it; its 'note:' lines, its last line on failure, its cache report."""
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    res = subprocess.run([sys.executable, str(ROOT / "convert.py"), "--ckpt", str(src), "--out", str(out),
                          "--eval-text", "none", "--calib-tokens", "8192", *flags],
                         cwd=ROOT, capture_output=True, text=True, env={**os.environ, **ONE_THREAD})
    notes = [line[len("note: "):] for line in res.stderr.splitlines() if line.startswith("note: ")]
    info = {"command": f"python convert.py --ckpt SRC --out OUT --eval-text none --calib-tokens 8192 {' '.join(flags)}".strip(),
            "ok": res.returncode == 0, "notes": notes, "seconds": round(time.perf_counter() - t, 1)}
    if res.returncode:
        info["error"] = res.stderr.strip().splitlines()[-1] if res.stderr.strip() else f"exit {res.returncode}"
        return info
    config = json.loads((out / "config.json").read_text())
    info.update(model_type=config.get("model_type"), architectures=config.get("architectures"),
                kv_lora_rank=config.get("kv_lora_rank"), qk_rope_head_dim=config.get("qk_rope_head_dim"),
                max_position_embeddings=config.get("max_position_embeddings"),
                report=json.loads((out / "convert_report.json").read_text()).get("kv_values_per_token_per_layer"),
                weights_sha256=hashlib.sha256(b"".join(f.read_bytes() for f in sorted(out.glob("*.safetensors")))).hexdigest())
    return info


# ----------------------------------------------------------------------------- the readings

def transformers_read(folder: Path, ids: list[int]) -> tuple:
    """(reading, logits): fp32 logits (float64 on the way out), mean NLL, the class that loaded it, cache values per token per layer."""
    import torch
    import torch.nn.functional as F
    import transformers as tf
    try:
        model, how = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), "AutoModelForCausalLM"
        auto_error = None
    except Exception as e:  # noqa: BLE001 - Mistral4: loaded by name
        auto_error = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        arch = json.loads((folder / "config.json").read_text())["architectures"][0]
        model, how = getattr(tf, arch).from_pretrained(folder, dtype=torch.float32).eval(), arch
    x = torch.tensor([ids])
    with torch.no_grad():
        out = model(x, use_cache=True)
    logits = out.logits[0].double()
    layer = out.past_key_values.layers[0]
    per_token = sum(t[0].numel() for t in (layer.keys, layer.values) if t is not None) // layer.keys.shape[-2]
    reading = {"loads": how, "nll": F.cross_entropy(logits[:-1], x[0, 1:]).item(),
               "cache_values_per_token_per_layer": per_token,
               "cache_shapes": [list(layer.keys.shape), list(layer.values.shape)]}
    if auto_error:
        reading["auto_error"] = auto_error
    return reading, logits


def vllm_read(python: str, folder: Path, ids: list[int], converted: bool) -> dict:
    """One vLLM reading in its own Python, with the flags docs/engines.md lists. Where the folder
    declares a context shorter than the test, vLLM refuses the length; it is tried once more with
    VLLM_ALLOW_LONG_MAX_MODEL_LEN=1 to record what it then does."""
    env = {**os.environ, **ONE_THREAD, "PYTHONFAULTHANDLER": "1"}  # a crash in native code says where
    backend = None
    if converted:
        config = json.loads((folder / "config.json").read_text())
        if config.get("kv_lora_rank", 0) + config.get("qk_rope_head_dim", 0) == 576:
            backend = "CPU_MLA"  # on AMX CPUs vLLM picks AMX_MLA, bfloat16 only
        else:
            env["VLLM_MLA_DISABLE"] = "1"  # its CPU MLA kernel takes 576 only
    reading = {"tokens": len(ids), "flags": {"backend": backend, "VLLM_MLA_DISABLE": env.get("VLLM_MLA_DISABLE")}}
    for attempt in ("as is", "VLLM_ALLOW_LONG_MAX_MODEL_LEN=1"):
        t = time.perf_counter()
        res = subprocess.run([python, __file__, "--worker", json.dumps({"folder": str(folder), "ids": ids, "backend": backend})],
                             capture_output=True, text=True, env=env)
        log = res.stdout + res.stderr
        said = [re.sub(r"^.*?\] ", "", line) for line in log.splitlines()
                if re.search(r"KV cache size|Using .*backend|MLA|Resolved architecture|modeling backend", line)
                and not re.search(r"non-default args|^\{", re.sub(r"^.*?\] ", "", line))]
        if res.returncode == 0:
            got = json.loads(res.stdout.strip().splitlines()[-1])
            reading.update(loads=True, nll=got["nll"], cache=got["cache"], log=said[:12],
                           seconds=round(time.perf_counter() - t, 1))
            reading["cache"].update(derive_cache(got["cache"], log))
            if attempt != "as is":
                reading["loads"] = f"only with {attempt}"
            return reading
        reading.setdefault("errors", []).append(f"{attempt}: {last_error(log, res.returncode)}")
        reading.setdefault("log", said[:12])
        if "User-specified max_model_len" not in log:
            break
        env["VLLM_ALLOW_LONG_MAX_MODEL_LEN"] = "1"  # the declared context is shorter than the test: try past it
    reading["loads"] = False
    return reading


def last_error(log: str, returncode: int) -> str:
    """The exception a failed vLLM run ended on (with a pydantic error's reason), or the signal and
    the innermost frame faulthandler printed."""
    lines = [re.sub(r"^\[rank\d+\]:\s*", "", line).rstrip() for line in log.splitlines()]
    if returncode < 0:
        import signal
        current = next((i for i, line in enumerate(lines) if line.startswith("Current thread")), len(lines))
        frames = [re.sub(r'^File ".*/site-packages/(.*)", line (\d+) in (\w+)$', r"\1:\2 \3", line.strip())
                  for line in lines[current:] if line.strip().startswith('File "') and "/torch/" not in line]
        return f"killed by {signal.Signals(-returncode).name} in " + " <- ".join(frames[:3])
    found = [i for i, line in enumerate(lines) if re.match(r"^[\w.]+(Error|Exception)\b", line)]
    if not found:
        return lines[-1][:400] if lines else f"exit {returncode}"
    i = found[-1]
    why = lines[i + 1].strip() if "ValidationError" in lines[i] and i + 1 < len(lines) else ""
    return f"{lines[i]} {why}".strip()[:400]


def derive_cache(cache: dict, log: str) -> dict:
    """Bytes per token per layer that vLLM allocated: its KVCacheConfig's tensors / (blocks x block size x
    layers), which is page bytes / block size. The log's 'KV cache size: N tokens' is max concurrency x
    max_model_len, each request rounded up to whole blocks, so VLLM_CPU_KVCACHE_SPACE / N / layers
    overstates it; it is kept as a check."""
    derived = {}
    if cache.get("groups"):
        g, layers = cache["groups"][0], sum(g["layers"] for g in cache["groups"])
        derived["bytes_per_token_per_layer"] = cache["tensor_bytes"] / (cache["num_blocks"] * g["block_size"] * layers)
        derived["page_bytes_per_token"] = g["page_size_bytes"] / g["block_size"]
        derived["values_per_token_per_layer"] = derived["bytes_per_token_per_layer"] / 4  # fp32 cache
    m = re.search(r"KV cache size: ([\d,]+) tokens", log)
    if m:
        tokens = int(m.group(1).replace(",", ""))
        layers = sum(g["layers"] for g in cache.get("groups", [])) or SHAPE["num_hidden_layers"]
        derived["log_tokens"] = tokens
        derived["log_bytes_per_token_per_layer"] = KV_SPACE_GIB * 2**30 / tokens / layers
    return derived


# ----------------------------------------------------------------------------- the table

def fmt(x, nd=4):
    return "—" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{nd}f}"


def pair(orig: dict, conv: dict) -> str:
    """'original / converted (converted - original)' for two readings ({'nll': ...} or a failed vLLM one)."""
    def one(x):
        return fmt(x["nll"]) if "nll" in x else "fails"
    diff = f" ({conv['nll'] - orig['nll']:+.4f})" if "nll" in conv and "nll" in orig else ""
    return f"{one(orig)} / {one(conv)}{diff}"


def markdown(results: list[dict]) -> str:
    """One row per (family, setting), settings whose folders are bit-identical merged: mean NLL in each
    engine (converted minus original in brackets), the cache per token per layer each one allocated."""
    rows = ["| family | setting: KV values -> R + r | transformers fp32 NLL: original / converted (diff) | "
            "vLLM CPU fp32 NLL: original / converted (diff) | cache values / token / layer: transformers; vLLM |",
            "|---|---|---|---|---|"]
    shown = set()
    for r in results:
        c = r["convert"]
        key = (r["family"], c.get("weights_sha256"))
        if c["ok"] and key in shown:
            continue  # already shown with its bit-identical twin
        shown.add(key)
        same = [x["setting"] for x in results if x is not r and c["ok"]
                and (x["family"], x["convert"].get("weights_sha256")) == key]
        if not c["ok"]:
            rows.append(f"| {r['family']} | {r['setting']}: convert.py refused | `{c['error'][:100]}` | | |")
            continue
        t, v = r["transformers"], r.get("vllm") or {}
        name = ", ".join([r["setting"], *same])
        setting = f"{name}: {2 * r['kv_heads'] * 64} -> {c['kv_lora_rank']} + {c['qk_rope_head_dim']}"
        tr, vr = pair(t["original"], t["converted"]), pair(v["original"], v["converted"]) if v else "not run"
        cache = [f"{t['original']['cache_values_per_token_per_layer']} -> {t['converted']['cache_values_per_token_per_layer']}"]
        if r.get("in_context"):
            n, ic = r["in_context"]["tokens"], r["in_context"]
            tr += f"; first {n}: {pair({'nll': ic['transformers']['original']}, {'nll': ic['transformers']['converted']})}"
            if ic.get("vllm"):
                vr += f"; first {n}: {pair(ic['vllm']['original'], ic['vllm']['converted'])}"
        if v:
            got = [x.get("cache", {}).get("values_per_token_per_layer") for x in (v["original"], v["converted"])]
            if r.get("in_context", {}).get("vllm"):  # vLLM read the converted folder within its context only
                got[1] = got[1] or r["in_context"]["vllm"]["converted"].get("cache", {}).get("values_per_token_per_layer")
            cache.append(" -> ".join(f"{g:.0f}" if g else "fails" for g in got))
        rows.append(f"| {r['family']} | {setting} | {tr} | {vr} | {'; '.join(cache)} |")
    return "\n".join(rows)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", nargs="*", default=list(FAMILIES), choices=list(FAMILIES))
    p.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--tokens", type=int, default=256, help="ids of the evaluation split, one window")
    p.add_argument("--work", type=Path, default=Path("/tmp/transmla-conformance"), help="sources and conversions")
    p.add_argument("--vllm-python", help="a Python with vllm-cpu installed (else transformers only)")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:  # one vLLM reading, in vLLM's own Python: json in argv, the result on the last line
        print(json.dumps(vllm_worker(json.loads(args.worker))))
        return

    os.environ.update(ONE_THREAD)
    sys.path[:0] = [str(ROOT), str(HERE)]
    import torch
    torch.set_num_threads(1)
    from fetch import EVAL_TEXT, ensure_default_model, ensure_texts
    from tokenizer import load_tokenizer
    ensure_texts()
    smol = ensure_default_model()
    ids = load_tokenizer(smol).encode(EVAL_TEXT.read_text())[: args.tokens]
    results, sources, vllm_sources = [], {}, {}
    for family in args.families:
        for setting in args.settings:
            kv_heads, flags = SETTINGS[setting]
            src = args.work / f"{family}-kv{kv_heads}"
            if src not in sources:
                shutil.rmtree(src, ignore_errors=True)
                build_source(family, kv_heads, src, smol)
                sources[src] = transformers_read(src, ids)
            out = args.work / f"{family}-kv{kv_heads}-{setting}-mla"
            r = {"family": family, "setting": setting, "kv_heads": kv_heads, "convert": convert(src, out, flags)}
            if setting in TRY_TOO:
                r["also_tried"] = convert(src, args.work / "refused", TRY_TOO[setting])
                r["also_tried"].pop("notes", None)
            print(f"{family} {setting}: {json.dumps(r['convert'])[:300]}", file=sys.stderr, flush=True)
            results.append(r)
            if not r["convert"]["ok"]:
                continue
            (orig, orig_logits), (conv, conv_logits) = sources[src], transformers_read(out, ids)
            r["transformers"] = {"original": orig, "converted": conv,
                                 "max_abs_logit_diff": (conv_logits - orig_logits).abs().max().item()}
            context = r["convert"]["max_position_embeddings"] - 8  # what vLLM takes of a shorter declared context
            if context < len(ids):  # there the two are the same model (Mistral: the sliding window)
                import torch.nn.functional as F
                x = torch.tensor(ids[1:context])
                part = [F.cross_entropy(l[: context - 1], x).item() for l in (orig_logits, conv_logits)]
                r["in_context"] = {"tokens": context, "transformers": {
                    "original": part[0], "converted": part[1], "diff": part[1] - part[0],
                    "max_abs_logit_diff": (conv_logits[:context] - orig_logits[:context]).abs().max().item()}}
                if args.vllm_python:
                    r["in_context"]["vllm"] = {"original": vllm_read(args.vllm_python, src, ids[:context], converted=False),
                                               "converted": vllm_read(args.vllm_python, out, ids[:context], converted=True)}
            if args.vllm_python:
                if src not in vllm_sources:
                    vllm_sources[src] = vllm_read(args.vllm_python, src, ids, converted=False)
                r["vllm"] = {"original": vllm_sources[src], "converted": vllm_read(args.vllm_python, out, ids, converted=True)}
            print(f"{family} {setting}: {json.dumps({k: r[k] for k in ('transformers', 'vllm') if k in r})[:600]}",
                  file=sys.stderr, flush=True)
    table = markdown(results)
    print(table)
    if args.json:
        import importlib.metadata as md
        versions = {"transformers": md.version("transformers"), "torch": md.version("torch")}
        if args.vllm_python:
            versions["vllm"] = subprocess.run([args.vllm_python, "-c", "import importlib.metadata as m; "
                                               "print(m.version('vllm-cpu'), m.version('transformers'))"],
                                              capture_output=True, text=True).stdout.split()
        args.json.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "tokens": len(ids), "versions": versions,
                                         "command": "python docs/conformance.py " + " ".join(sys.argv[1:]),
                                         "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
