"""The claims, proven: an equivalence ladder, each rung printing the largest difference it saw.

    pytest test_equivalence.py -s        # -s shows the differences

Rungs: our forward == transformers (tiny random Llama, Qwen2, Mistral, Mixtral, DeepSeek-V2/V3
checkpoints written by transformers itself, and the embedded SmolLM2); cached token-by-token
decode == one full forward (GQA, MLA naive, MLA absorbed); naive == absorbed; chunked prefill ==
one-shot prefill; compiled decode == eager decode; greedy generation == transformers'.
Plus: our tiktoken tokenizer == Hugging Face tokenizers, and user errors end in one clear line.
transformers is the test oracle only: no script imports it.
"""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from checkpoint import UserError, load_model
from model import ModelArgs, Transformer

ROOT = Path(__file__).resolve().parent
VOCAB = 128


def assert_close(name: str, ours: torch.Tensor, ref: torch.Tensor, atol: float):
    diff = (ours.float() - ref.float()).abs().max().item()
    print(f"{name}: max |diff| = {diff:.3g} (atol {atol:g})")
    assert diff <= atol, f"{name}: max |diff| {diff} > {atol}"


# ----------------------------------------------------------------------------- tiny checkpoints

def _tiny_configs():
    import transformers as tf
    gqa = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=96, vocab_size=VOCAB, max_position_embeddings=256)
    mla = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
               intermediate_size=96, vocab_size=VOCAB, max_position_embeddings=256, kv_lora_rank=16,
               qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=10, first_k_dense_replace=2)
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 64, "rope_theta": 500000.0}
    return {
        "llama": (tf.LlamaConfig(**gqa, rope_parameters=llama3), tf.LlamaForCausalLM),
        "llama_tied_headdim": (tf.LlamaConfig(**gqa, tie_word_embeddings=True, head_dim=24), tf.LlamaForCausalLM),
        "qwen2": (tf.Qwen2Config(**gqa), tf.Qwen2ForCausalLM),
        "mistral": (tf.MistralConfig(**gqa, sliding_window=8), tf.MistralForCausalLM),
        "mixtral": (tf.MixtralConfig(**gqa, num_local_experts=4, num_experts_per_tok=2), tf.MixtralForCausalLM),
        "deepseek_v3": (tf.DeepseekV3Config(**mla, q_lora_rank=None), tf.DeepseekV3ForCausalLM),
        "deepseek_v3_qlora_bias": (tf.DeepseekV3Config(**mla, q_lora_rank=24, attention_bias=True),
                                   tf.DeepseekV3ForCausalLM),
        "deepseek_v2": (tf.DeepseekV2Config(**mla, q_lora_rank=None, n_routed_experts=4), tf.DeepseekV2ForCausalLM),
    }


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """name -> (folder, transformers model): random weights, norms and biases perturbed off 1 and 0."""
    out = {}
    for name, (cfg, cls) in _tiny_configs().items():
        torch.manual_seed(0)
        ref = cls(cfg).eval()
        with torch.no_grad():
            for p in ref.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        folder = tmp_path_factory.mktemp(name)
        ref.save_pretrained(folder)
        out[name] = (folder, ref)
    return out


@pytest.mark.parametrize("name", list(_tiny_configs()))
def test_forward_matches_transformers(tiny, name):
    folder, ref = tiny[name]
    tokens = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(tokens).logits
        for impl in ("naive", "absorb") if "deepseek" in name else ("auto",):
            model, _ = load_model(folder, mla_impl=impl)
            assert_close(f"{name} ({impl}) vs transformers", model(tokens), expected, 1e-4)


# ----------------------------------------------------------------------------- the cache

def _random_model(mla: bool, impl: str = "auto", **kw) -> Transformer:
    torch.manual_seed(0)
    args = ModelArgs(dim=64, n_layers=2, vocab_size=VOCAB, hidden_dim=96, n_heads=4, n_kv_heads=2,
                     head_dim=16, max_seq_len=128, mla_impl=impl, **kw)
    if mla:
        args = ModelArgs(**{**args.__dict__, "kv_lora_rank": 24, "qk_nope_head_dim": 16,
                            "qk_rope_head_dim": 8, "v_head_dim": 16})
    model = Transformer(args)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if p.dim() == 1 else 0.0))
    return model.eval()


@pytest.mark.parametrize("kind", ["gqa", "mla_naive", "mla_absorb", "mla_auto"])
@torch.no_grad()
def test_cached_decode_equals_full_forward(kind):
    model = _random_model(kind != "gqa", kind.removeprefix("mla_"))
    tokens = torch.randint(0, VOCAB, (2, 30), generator=torch.Generator().manual_seed(2))
    full = model(tokens)
    model.setup_caches(2, 48)
    steps = [model(tokens[:, :10], torch.arange(10))]  # prefill, then one token at a time
    steps += [model(tokens[:, i:i + 1], torch.tensor([i])) for i in range(10, 30)]
    assert_close(f"{kind}: prefill + token-by-token decode vs one forward", torch.cat(steps, 1), full, 1e-5)


@torch.no_grad()
def test_chunked_prefill_equals_one_shot():
    for kind in ("gqa", "mla"):
        model = _random_model(kind == "mla", sliding_window=7 if kind == "gqa" else None)
        tokens = torch.randint(0, VOCAB, (1, 33), generator=torch.Generator().manual_seed(3))
        model.setup_caches(1, 40)
        one = model(tokens, torch.arange(33))
        chunks = [model(tokens[:, a:b], torch.arange(a, b)) for a, b in ((0, 13), (13, 20), (20, 33))]
        assert_close(f"{kind}: chunked prefill (13+7+13) vs one shot", torch.cat(chunks, 1), one, 1e-5)


@torch.no_grad()
def test_naive_equals_absorbed():
    naive, absorbed = _random_model(True, "naive"), _random_model(True, "absorb")
    tokens = torch.randint(0, VOCAB, (3, 25), generator=torch.Generator().manual_seed(4))
    assert_close("MLA naive vs absorbed, full sequence", absorbed(tokens), naive(tokens), 1e-5)


def test_kv_bytes_per_token():
    gqa, mla = _random_model(False), _random_model(True)
    assert gqa.kv_bytes_per_token() == 2 * (2 * 2 * 16) * 4  # layers * (k + v) * n_kv * head_dim * fp32
    assert mla.kv_bytes_per_token() == 2 * (24 + 8) * 4  # layers * (R + r) * fp32
    print("kv bytes/token: gqa", gqa.kv_bytes_per_token(), "mla", mla.kv_bytes_per_token())


@torch.no_grad()
def test_compiled_decode_equals_eager():
    from generate import compile_decode_step, decode_one_token
    for kind in ("gqa", "mla"):
        model = _random_model(kind == "mla")
        prompt = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))
        model.setup_caches(2, 32)
        model(prompt, torch.arange(12))
        caches = [{k: b.clone() for k, b in layer.attention.cache.named_buffers()} for layer in model.layers]
        eager_logits, compiled_logits = [], []
        step = compile_decode_step("cpu")
        torch._dynamo.reset()
        for fn, out in ((decode_one_token, eager_logits), (step, compiled_logits)):
            for layer, saved in zip(model.layers, caches):
                for k, b in layer.attention.cache.named_buffers():
                    b.copy_(saved[k])
            token = prompt[:, -1:].contiguous()
            # a recompile per position would make the compiled step useless: make it an error
            with torch._dynamo.config.patch(error_on_recompile=True):
                for pos in range(12, 20):
                    token = fn(model, token, torch.tensor([pos]), 0.0, None)
                    out.append(token.clone())
        assert torch.equal(torch.cat(eager_logits, 1), torch.cat(compiled_logits, 1))
        # the tokens agree; check the numbers too, from the same cache state
        x, pos = prompt[:, -1:], torch.tensor([12])
        compiled_forward = torch.compile(model, fullgraph=True, dynamic=False)
        for layer, saved in zip(model.layers, caches):
            for k, b in layer.attention.cache.named_buffers():
                b.copy_(saved[k])
        eager = model(x, pos)
        assert_close(f"{kind}: compiled vs eager decode logits", compiled_forward(x, pos), eager, 1e-5)


# ----------------------------------------------------------------------------- the embedded model

@pytest.fixture(scope="module")
def smollm():
    from fetch import ensure_default_model, ensure_texts
    from transformers import LlamaForCausalLM
    folder = ensure_default_model()
    ensure_texts()
    ref = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model, _ = load_model(folder)
    return folder, model, ref


@torch.no_grad()
def test_embedded_model_matches_transformers(smollm):
    from fetch import EVAL_TEXT
    from tokenizer import load_tokenizer
    folder, model, ref = smollm
    ids = torch.tensor([load_tokenizer(folder).encode(EVAL_TEXT.read_text())[:256]])
    assert_close("SmolLM2-135M logits vs transformers (256 tokens of eval text)", model(ids), ref(ids).logits, 1e-3)


@torch.no_grad()
def test_greedy_generation_matches_transformers(smollm):
    from generate import generate
    from tokenizer import load_tokenizer
    folder, model, ref = smollm
    tok = load_tokenizer(folder)
    prompt = tok.encode("The capital of France is")
    model.setup_caches(1, len(prompt) + 24)
    ours = generate(model, prompt, 24, temperature=0.0)
    model.clear_caches()
    theirs = ref.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(prompt):].tolist()
    print("greedy:", repr(tok.decode(ours)))
    assert ours == theirs


# ----------------------------------------------------------------------------- user errors

def _script(*argv):
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)


def _one_clear_line(res, needle):
    print(res.stderr.strip())
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and needle in res.stderr


def test_user_errors(tiny, tmp_path):
    import json
    import shutil
    res = _script("bench.py", "--ppl", "--ckpt", str(tmp_path / "nowhere"))
    _one_clear_line(res, "no such file")

    bad = tmp_path / "gpt2"
    shutil.copytree(tiny["llama"][0], bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    _one_clear_line(_script("generate.py", "--ckpt", str(bad), "--prompt", "hi"), "not supported")

    bad = tmp_path / "shapes"
    shutil.copytree(tiny["llama"][0], bad)
    (bad / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 100}))
    with pytest.raises(UserError, match="has shape"):
        load_model(bad)

    bad = tmp_path / "truncated"
    shutil.copytree(tiny["llama"][0], bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="safetensors"):
        load_model(bad)


# ----------------------------------------------------------------------------- conversion (convert.py)

CONVERTIBLE = ["llama", "qwen2", "mistral", "llama_tied_headdim"]


@pytest.mark.parametrize("name", CONVERTIBLE)
@torch.no_grad()
def test_conversion_steps_exact(tiny, name):
    """Step 1 (GQA as MLA) and step 2 (RoRoPE with RoPE kept on every dim) reproduce the original
    logits; step 3 (BKV-PCA) at full rank reproduces the partial-RoPE model it starts from; so does
    a full-rank low-rank query. Each in MLA's naive and absorbed forms."""
    from checkpoint import CheckpointReader
    from convert import convert_in_memory
    folder = tiny[name][0]
    a = CheckpointReader(folder).args
    L, r = a.n_kv_heads * a.head_dim, a.head_dim // 2
    calib = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(6))
    tokens = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(7))

    def logits(model, impl):
        for layer in model.layers:
            layer.attention.impl = impl
        return model(tokens)

    def convert(**kw):
        return convert_in_memory(CheckpointReader(folder), calib, **kw)

    original = load_model(folder, sliding_window=None)[0](tokens)  # DeepSeek has no sliding window
    step1 = convert(upto="gqa", rope_dim=L, kv_lora_rank=L, freqfold=1)
    step2 = convert(upto="rorope", rope_dim=L, kv_lora_rank=2 * L, freqfold=1)
    partial = convert(upto="rorope", rope_dim=r, kv_lora_rank=2 * L - r, freqfold=2)
    step3 = convert(upto="bkv_pca", rope_dim=r, kv_lora_rank=2 * L - r, freqfold=2)
    step4 = convert(upto="bkv_pca", rope_dim=r, kv_lora_rank=2 * L - r, freqfold=2, q_lora_rank=a.dim)
    for impl in ("naive", "absorb"):
        assert_close(f"{name} step 1 GQA as MLA ({impl}) vs original", logits(step1, impl), original, 1e-4)
        assert_close(f"{name} step 2 RoRoPE, all RoPE kept ({impl}) vs original", logits(step2, impl), original, 1e-4)
        want = logits(partial, impl)
        assert_close(f"{name} step 3 BKV-PCA full rank ({impl}) vs partial RoPE", logits(step3, impl), want, 1e-4)
        assert_close(f"{name} step 4 q_lora full rank ({impl}) vs partial RoPE", logits(step4, impl), want, 1e-4)
    assert step3.args.rope_pairs is None  # the final model uses ordinary RoPE of dim r
    dropped = (logits(partial, "naive") - original).abs().max().item()
    print(f"{name}: dropping RoPE to r = {r} of {L} changes logits by up to {dropped:.3g} (expected: not exact)")


@pytest.mark.parametrize("name", CONVERTIBLE)
@torch.no_grad()
def test_converted_folder_loads_in_stock_transformers(tiny, name, tmp_path):
    """The written folder is a stock DeepSeek-V3 checkpoint: transformers' own DeepseekV3ForCausalLM
    loads it (no remote code) and agrees with our model on it, and with the in-memory conversion."""
    from transformers import AutoModelForCausalLM
    from checkpoint import CheckpointReader
    from convert import convert_in_memory, convert_layers, write_checkpoint
    folder = tiny[name][0]
    a = CheckpointReader(folder).args
    calib = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(6))
    tokens = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(7))
    kw = dict(rope_dim=a.head_dim // 2, kv_lora_rank=20, freqfold=2)
    out = tmp_path / "mla"
    write_checkpoint(CheckpointReader(folder), out, convert_layers(CheckpointReader(folder), calib, **kw),
                     torch.float32, {"method": "transmla"})
    ref = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(ref).__name__ == "DeepseekV3ForCausalLM"
    ours, _ = load_model(out)
    in_memory = convert_in_memory(CheckpointReader(folder), calib, **kw)
    theirs = ref(tokens).logits
    assert_close(f"{name} converted: ours vs transformers DeepseekV3", ours(tokens), theirs, 1e-4)
    assert_close(f"{name} converted: written vs in-memory", ours(tokens), in_memory(tokens), 1e-5)
    assert ours.kv_bytes_per_token() == a.n_layers * (20 + a.head_dim // 2) * 4
