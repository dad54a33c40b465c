"""The claims, proven: an equivalence ladder, each rung printing the largest difference it saw.

    pytest test_equivalence.py -s        # -s shows the differences

Rungs: our forward == transformers (tiny random Llama, Qwen2, Mistral, Mixtral, DeepSeek-V2/V3
checkpoints written by transformers itself, and the embedded SmolLM2); cached token-by-token
decode == one full forward (GQA, MLA naive, MLA absorbed); naive == absorbed; chunked prefill ==
one-shot prefill; compiled decode == eager decode; greedy generation and perplexity ==
transformers'; each exact conversion step == the model it starts from (Mixtral too), and the
converted folder in stock transformers (DeepSeek-V3; Mistral4 for Mixtral) == our model on it;
tensor parallelism on 1 and 2 ranks == one device (TPLA: its prefill exact, its decode == a
reference written from the definition); fine-tuning's unfold / fold exact, its chunked loss ==
one pass, FSDP2 ranks == one process. The scripts end to end and their plumbing are in
test_scripts.py; transformers is the test oracle only: no script imports it.
"""
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from checkpoint import load_model
from cli import init_distributed
from conftest import (CONVERTIBLE, ROOT, VOCAB, _calib, _converted, _converted_at_eps_1e5, _engine_eps, _free_port,
                      _rank_env, _script, _stopped_after, _tiny_configs, _tiny_pair_with_tokenizer, _tp_tokens,
                      assert_close)
from model import ModelArgs, Transformer


# ----------------------------------------------------------------------------- tiny checkpoints: ours vs transformers

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


@pytest.mark.parametrize("kind", ["gqa", "mla_naive", "mla_absorb"])
@torch.no_grad()
def test_bfloat16_decode_tracks_float32(kind):
    """bf16 weights and cache, eager and compiled, against the fp32 model. Not exact: bf16 keeps 8
    significant bits (relative rounding 2^-9), and some ten roundings deep on logits of size ~3.5
    that is ~0.1; measured 0.05-0.07. The bound 0.15 fails any real bug (a wrong cache
    entry or head moves logits by ~1)."""
    import copy
    model = _random_model(kind != "gqa", kind.removeprefix("mla_"))
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    tokens = torch.randint(0, VOCAB, (2, 30), generator=torch.Generator().manual_seed(2))
    full = model(tokens)
    bf16.setup_caches(2, 48)
    steps = [bf16(tokens[:, :10], torch.arange(10))]
    steps += [bf16(tokens[:, i:i + 1], torch.tensor([i])) for i in range(10, 29)]
    assert steps[-1].dtype == torch.bfloat16
    assert all(b.dtype == torch.bfloat16 for layer in bf16.layers for b in layer.attention.cache.buffers())
    assert_close(f"{kind}: bf16 cached decode vs fp32 forward", torch.cat(steps, 1), full[:, :29], 0.15)
    compiled = torch.compile(bf16, fullgraph=True, dynamic=False)
    assert_close(f"{kind}: bf16 compiled decode vs fp32 forward", compiled(tokens[:, 29:], torch.tensor([29])),
                 full[:, 29:], 0.15)


@pytest.mark.parametrize("impl", ["absorb", "naive"])
@torch.no_grad()
def test_bfloat16_long_cache_tracks_float32(impl):
    """bf16 MLA (weights and cache) decoding 12 tokens after a 2048-token prefill, against the fp32
    model's one forward: relative error of the logits (norm of the difference over norm of the
    fp32 logits) measured 0.0121 (absorbed) and 0.0123 (naive), bound 0.03; top-1 the same wherever
    fp32's best two logits differ by more than 0.1 (one token here has a gap of 0.011, and on a CPU
    with AVX-512 bf16 the naive path flips it; max |diff| of the logits is 0.047). Over
    2K keys a softmax or latent norm that lost its small terms would drift well past that. (On this
    CPU torch sums bf16 in fp32 inside softmax and mean, so computing either in bf16 is not such a
    fault here; the fp32 casts in model.py are for kernels that do not.)"""
    import copy
    model = _random_model(True, impl)
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    tokens = torch.randint(0, VOCAB, (2, 2060), generator=torch.Generator().manual_seed(5))
    full = model(tokens)[:, 2048:]
    bf16.setup_caches(2, 2060)
    bf16(tokens[:, :2048], torch.arange(2048))
    steps = torch.cat([bf16(tokens[:, i:i + 1], torch.tensor([i])) for i in range(2048, 2060)], 1).float()
    rel = ((steps - full).norm() / full.norm()).item()
    top2 = full.topk(2, -1).values
    clear = top2[..., 0] - top2[..., 1] > 0.1  # a near-tie in fp32 (gap under bf16's ~0.05 error) may go either way
    top1 = (steps.argmax(-1) == full.argmax(-1))[clear].float().mean().item()
    print(f"mla {impl}: bf16 decode after a 2048-token cache vs fp32: relative error {rel:.4f}, top-1 agreement "
          f"{top1:.0%} on the {clear.sum().item()} of {clear.numel()} tokens whose fp32 top-2 gap exceeds 0.1")
    assert rel < 0.03 and top1 == 1.0 and clear.float().mean() > 0.75


@pytest.mark.parametrize("kind", ["gqa", "mla_naive", "mla_absorb", "mla_auto"])
@torch.no_grad()
def test_chunked_prefill_equals_no_cache(kind):
    """A prompt prefilled in chunks (13 + 7 + 13 tokens) into a fresh cache, then two decode steps:
    the logits of one forward with no cache at all. Every chunk must write its own keys and values
    (or latents) before it attends, and read the earlier chunks' back (GQA with a sliding window
    of 7, so the window's edge falls inside chunks)."""
    model = _random_model(kind != "gqa", kind.removeprefix("mla_"), sliding_window=7 if kind == "gqa" else None)
    tokens = torch.randint(0, VOCAB, (2, 35), generator=torch.Generator().manual_seed(3))
    full = model(tokens)
    model.setup_caches(2, 40)
    steps = [model(tokens[:, a:b], torch.arange(a, b)) for a, b in ((0, 13), (13, 20), (20, 33), (33, 34), (34, 35))]
    assert_close(f"{kind}: chunked prefill (13+7+13) + decode on a fresh cache vs no cache", torch.cat(steps, 1),
                 full, 1e-5)


@torch.no_grad()
def test_naive_equals_absorbed():
    naive, absorbed = _random_model(True, "naive"), _random_model(True, "absorb")
    tokens = torch.randint(0, VOCAB, (3, 25), generator=torch.Generator().manual_seed(4))
    assert_close("MLA naive vs absorbed, full sequence", absorbed(tokens), naive(tokens), 1e-5)


def test_training_stores_no_attention_matrix():
    """Training memory: the forward of GQA and of naive MLA (whose value head dim differs from the
    query's) keeps no (T, S) attention matrix for the backward: torch's fused attention kernel runs
    (MLA's values padded with zero columns to the queries' head dim). Largest saved tensor against
    one layer's attention matrices (B x heads x T x T values), B = 2, T = 128."""
    for mla in (False, True):
        model = _random_model(mla, "naive")
        tokens = torch.randint(0, VOCAB, (2, 128), generator=torch.Generator().manual_seed(5))
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            model.hidden(tokens).sum()  # not the logits: this vocabulary is as small as T
        matrix = 2 * model.args.n_heads * 128 * 128
        print(f"{'MLA naive' if mla else 'GQA'}: largest saved tensor {max(sizes)} values, "
              f"an attention matrix {matrix}")
        assert max(sizes) < matrix  # (GQA's largest is its boolean mask for the folded query rows, as floats)


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

@torch.no_grad()
def test_embedded_model_matches_transformers(smollm):
    from fetch import EVAL_TEXT
    from tokenizer import load_tokenizer
    folder, model, ref = smollm
    ids = torch.tensor([load_tokenizer(folder).encode(EVAL_TEXT.read_text())[:256]])
    assert_close("SmolLM2-135M logits vs transformers (256 tokens of eval text)", model(ids), ref(ids).logits, 1e-4)


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


@torch.no_grad()
def test_perplexity_matches_transformers(smollm):
    """bench.py's perplexity equals transformers' on the same tokens (first 4 windows of 1024)."""
    import math
    from evaluate import perplexity
    from fetch import EVAL_TEXT
    from tokenizer import load_tokenizer
    folder, model, ref = smollm
    ids = load_tokenizer(folder).encode(EVAL_TEXT.read_text())[: 4 * 1024 + 100]
    ours = perplexity(model, ids, 1024)["ppl"]
    windows = torch.tensor(ids[: 4 * 1024]).view(4, 1024)
    nll = sum(F.cross_entropy(ref(w[None]).logits[0, :-1], w[1:], reduction="sum").item() for w in windows)
    theirs = math.exp(nll / (4 * 1023))
    print(f"perplexity on 4 x 1024 tokens: ours {ours:.4f}, transformers {theirs:.4f}, "
          f"relative difference {abs(ours / theirs - 1):.2e}")
    assert abs(ours / theirs - 1) < 1e-4


# ----------------------------------------------------------------------------- conversion (convert.py)

@pytest.mark.parametrize("name", CONVERTIBLE)
@torch.no_grad()
def test_conversion_steps_exact(tiny, name):
    """Step 1 (GQA as MLA) and step 2 (RoRoPE with RoPE kept on every dim) reproduce the original
    logits; step 3 (BKV-PCA) at full rank reproduces the partial-RoPE model it starts from; so does
    a full-rank low-rank query. Each in MLA's naive and absorbed forms, with the latent at RMS 1e-10,
    where its RMSNorm is linear to fp32 precision (the default's bound: test_default_latent_rms_bound)."""
    from checkpoint import CheckpointReader
    from dataclasses import replace
    from convert import OFFICIAL, convert_in_memory
    folder = tiny[name][0]
    a = CheckpointReader(folder).args
    L, r = a.n_kv_heads * a.head_dim, a.head_dim // 2
    calib = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(6))
    tokens = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(7))

    def logits(model, impl):
        for layer in model.layers:
            layer.attention.impl = impl
        return model(tokens)

    def convert(**settings):  # the official recipe, where a step set to None is skipped
        return convert_in_memory(CheckpointReader(folder), calib, replace(OFFICIAL, latent_rms=1e-10, **settings))

    original = load_model(folder, sliding_window=None)[0](tokens)  # DeepSeek has no sliding window
    step1 = convert(rope_select=None, latent_fit=None, rope_dim=L, kv_lora_rank=L, freqfold=1)
    step2 = convert(latent_fit=None, rope_dim=L, kv_lora_rank=2 * L, freqfold=1)
    partial = convert(latent_fit=None, rope_dim=r, kv_lora_rank=2 * L - r, freqfold=2)
    step3 = convert(rope_dim=r, kv_lora_rank=2 * L - r, freqfold=2)
    step4 = convert(rope_dim=r, kv_lora_rank=2 * L - r, freqfold=2, q_lora_rank=a.dim)
    step3_attn = convert(rope_dim=r, kv_lora_rank=2 * L - r, freqfold=2, latent_fit="attention")
    step2_score = convert(latent_fit=None, rope_dim=L, kv_lora_rank=2 * L, freqfold=1, rope_select="score")
    for impl in ("naive", "absorb"):
        assert_close(f"{name} step 1 GQA as MLA ({impl}) vs original", logits(step1, impl), original, 1e-4)
        assert_close(f"{name} step 2 RoRoPE, all RoPE kept ({impl}) vs original", logits(step2, impl), original, 1e-4)
        want = logits(partial, impl)
        assert_close(f"{name} step 3 BKV-PCA full rank ({impl}) vs partial RoPE", logits(step3, impl), want, 1e-4)
        assert_close(f"{name} step 4 q_lora full rank ({impl}) vs partial RoPE", logits(step4, impl), want, 1e-4)
        assert_close(f"{name} step 3 attention PCA full rank ({impl}) vs partial RoPE", logits(step3_attn, impl),
                     want, 1e-4)
        assert_close(f"{name} step 2 score-ordered RoRoPE, all RoPE kept ({impl}) vs original",
                     logits(step2_score, impl), original, 1e-4)
    assert step3.args.rope_pairs is None  # the final model uses ordinary RoPE of dim r
    dropped = (logits(partial, "naive") - original).abs().max().item()
    print(f"{name}: dropping RoPE to r = {r} of {L} changes logits by up to {dropped:.3g} (expected: not exact)")


@torch.no_grad()
def test_written_rope_moves_the_frequencies_and_nothing_else(tmp_path):
    """A llama3-scaled Llama with one KV head (so nothing is cut with every rope pair kept, r =
    head_dim; one pair lies where llama3 blends, so no YaRN equals it): the folder's RoPE is
    DeepSeek's YaRN fitted to llama3's frequencies (convert.written_rope), and the conversion
    equals the original run at exactly those frequencies (the queries' factor undoes the softmax
    scale YaRN brings). With keep_rope_scaling it equals the original itself."""
    import transformers as tf
    from checkpoint import CheckpointReader
    from dataclasses import replace
    from convert import OFFICIAL, convert_in_memory, rope_fold_error
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 64, "rope_theta": 500000.0}
    torch.manual_seed(0)
    tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                                       intermediate_size=96, vocab_size=VOCAB, max_position_embeddings=256,
                                       rope_parameters=llama3)).save_pretrained(tmp_path / "mqa")
    folder = tmp_path / "mqa"
    a = CheckpointReader(folder).args
    d = a.head_dim
    calib = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(6))
    tokens = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(7))
    recipe = replace(OFFICIAL, latent_rms=1e-10, rope_dim=d, kv_lora_rank=d, freqfold=1)
    folded = convert_in_memory(CheckpointReader(folder), calib, recipe)
    kept = convert_in_memory(CheckpointReader(folder), calib, replace(recipe, keep_rope_scaling=True))
    written = folded.args.rope_scaling
    moved, worst, _ = rope_fold_error(a, d)
    print(f"llama3 written as {written}: {moved} of {d // 2} frequencies move, by up to {worst:.0%}")
    assert written["rope_type"] == "yarn" and moved >= 1 and kept.args.rope_scaling == a.rope_scaling
    original = load_model(folder)[0](tokens)
    at_written = load_model(folder, rope_scaling=written)[0](tokens)
    assert_close("llama3 written as YaRN vs the original at YaRN's frequencies", folded(tokens), at_written, 1e-4)
    assert_close("llama3 kept vs the original", kept(tokens), original, 1e-4)
    print(f"  the fold vs the original itself: max |logit diff| {(folded(tokens) - original).abs().max().item():.3g}")


def _compressed_layer(a, block, h: torch.Tensor, cov: torch.Tensor) -> tuple:
    """block (of a model of config a) through steps 1-4 at R = a quarter of its KV width, half its
    rope dims kept, F = 2: (the converted Block, its rope table over h's length)."""
    from convert import attention_pca, gqa_as_mla, mla_block, rorope
    from model import rope_frequencies, rope_table
    layer = rorope(gqa_as_mla(block.attention, a.n_kv_heads, a.head_dim), cov, a.head_dim // 2, 2, a.n_kv_heads)
    layer = attention_pca(layer, cov, a.n_kv_heads * a.head_dim // 4, block.attention.wo.weight)
    inv_freq = rope_frequencies(a.head_dim, a.rope_theta, a.rope_scaling)
    return mla_block(a, layer, block, cov, 0).block, rope_table(inv_freq[torch.tensor(layer.pairs)], h.shape[1])


@pytest.mark.parametrize("name", ["llama", "qwen2"])
@torch.no_grad()
def test_output_refit(tiny, name):
    """refit_output (step 5): where the conversion is exact, the least-squares o_proj without damping
    is the original o_proj; on a compressed layer it lowers the attention-output error on the
    calibration activations below what the original o_proj leaves (with the default damping)."""
    from checkpoint import CheckpointReader
    from convert import attention_outputs, gqa_as_mla, mla_block, refit_output, second_moments
    from model import Block, rope_frequencies, rope_table
    reader = CheckpointReader(tiny[name][0])
    a = reader.args
    with torch.device("meta"):
        block = Block(a)
    reader.fill(block, "layers.0.")
    h = torch.randn(16, 32, a.dim, generator=torch.Generator().manual_seed(8))
    T, mask = h.shape[1], torch.ones(h.shape[1], h.shape[1], dtype=torch.bool).tril()
    inv_freq = rope_frequencies(a.head_dim, a.rope_theta, a.rope_scaling)
    cov = second_moments(block.attention_norm, h)
    exact = gqa_as_mla(block.attention, a.n_kv_heads, a.head_dim)
    mla = mla_block(a, exact, block, cov, 0, latent_rms=1e-10).block  # its latent norm linear to fp32 precision
    rope = rope_table(inv_freq[torch.tensor(exact.pairs)], T)
    want = attention_outputs(block, h, rope_table(inv_freq, T), mask)
    w = refit_output(mla, h, want, rope, mask, damp=0.0)
    assert_close(f"{name}: o_proj refitted on an exact conversion vs the original", w, block.attention.wo.weight, 1e-4)

    L = a.n_kv_heads * a.head_dim
    mla, rope = _compressed_layer(a, block, h, cov)
    x = mla.attention_norm(h)  # its input is scaled (convert.balance_input)
    before = (mla.attention(x, *rope, mask) - want).pow(2).mean().item()
    mla.attention.wo.weight.copy_(refit_output(mla, h, want, rope, mask))
    after = (mla.attention(x, *rope, mask) - want).pow(2).mean().item()
    print(f"{name}: attention output mean squared error, R = {L // 4}: {before:.4g} -> {after:.4g} with o_proj refitted")
    assert after < 0.9 * before


@pytest.mark.parametrize("name", ["llama", "qwen2"])
@torch.no_grad()
def test_block_fit(tiny, name):
    """fit_block (step 6): after steps 1-5 on a compressed layer, training every map of the
    converted attention jointly lowers its output error against the original's on the
    calibration activations, and on activations it never saw, below what steps 1-5 leave."""
    from checkpoint import CheckpointReader
    from convert import attention_outputs, fit_block, refit_output, second_moments
    from model import Block, rope_frequencies, rope_table
    reader = CheckpointReader(tiny[name][0])
    a = reader.args
    with torch.device("meta"):
        block = Block(a)
    reader.fill(block, "layers.0.")
    h, held_out = torch.randn(80, 32, a.dim, generator=torch.Generator().manual_seed(8)).split([64, 16])
    T, mask = h.shape[1], torch.ones(h.shape[1], h.shape[1], dtype=torch.bool).tril()
    rope_gqa = rope_table(rope_frequencies(a.head_dim, a.rope_theta, a.rope_scaling), T)
    L = a.n_kv_heads * a.head_dim
    mla, rope = _compressed_layer(a, block, h, second_moments(block.attention_norm, h))
    want = attention_outputs(block, h, rope_gqa, mask)
    mla.attention.wo.weight.copy_(refit_output(mla, h, want, rope, mask))

    def error(x):
        want = block.attention(block.attention_norm(x), *rope_gqa, mask)
        return ((mla.attention(mla.attention_norm(x), *rope, mask) - want).pow(2).mean() / want.pow(2).mean()).item()
    before = error(h), error(held_out)
    fit_block(mla, h, want, rope, mask, steps=200)
    after = error(h), error(held_out)
    print(f"{name}: relative attention-output error, R = {L // 4}, steps 1-5 -> + 200 Adam steps: calibration "
          f"{before[0]:.4g} -> {after[0]:.4g}, held out {before[1]:.4g} -> {after[1]:.4g}")
    assert after[0] < before[0] and after[1] < before[1]


def _conversion(tiny, name: str, device: str) -> list:
    """Each layer's converted parameters, fitted method at R = 20, calibrated and fitted on `device`."""
    from checkpoint import CheckpointReader
    from dataclasses import replace
    from convert import FITTED, convert_layers
    reader = CheckpointReader(tiny[name][0])
    calib = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(6), device="cpu")
    recipe = replace(FITTED, rope_dim=reader.args.head_dim // 2, kv_lora_rank=20, freqfold=2)
    return [{**layer.params, **layer.rest} for layer in convert_layers(reader, calib, recipe, device=device)]


def _largest_relative_difference(a: list, b: list) -> float:
    return max(((x[k].double() - y[k].double()).abs().max() / y[k].double().abs().max().clamp_min(1e-30)).item()
               for x, y in zip(a, b) for k in y)


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_conversion_follows_its_device_not_the_default(tiny, name):
    """convert_layers(device=...) makes every tensor of its steps where it is told, never where torch
    would put it by default: with the process default set to the meta device (tensors without
    values, which cannot meet real ones in one op), the conversion on "cpu" still runs and gives
    exactly what it gives with the default left alone. That is what lets --device cuda run."""
    plain = _conversion(tiny, name, "cpu")
    torch.set_default_device("meta")
    try:
        elsewhere = _conversion(tiny, name, "cpu")
    finally:
        torch.set_default_device(None)
    diff = _largest_relative_difference(elsewhere, plain)
    print(f"{name}: default device meta vs cpu, largest relative difference {diff:.3g}")
    assert all(t.device.type == "cpu" for layer in elsewhere for t in layer.values()) and diff == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the GPU machine)")
@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_conversion_on_cuda_equals_cpu(tiny, name):
    """The same conversion calibrated and fitted on a GPU: float32 forward passes there round
    differently, the float64 fits not; every converted tensor within 1e-4 of the CPU's, relatively."""
    diff = _largest_relative_difference(_conversion(tiny, name, "cuda"), _conversion(tiny, name, "cpu"))
    print(f"{name}: cuda vs cpu, largest relative difference {diff:.3g}")
    assert diff < 1e-4


@pytest.mark.parametrize("name", CONVERTIBLE)
@torch.no_grad()
def test_converted_folder_loads_in_stock_transformers(tiny, name, tmp_path):
    """The written folder is a stock checkpoint, DeepSeek-V3 (Mistral4 for Mixtral): transformers' own
    class loads it (no remote code, no missing or unexpected tensor) and agrees with our model on
    it, and with the in-memory conversion. The source has rms_norm_eps 1e-5 and the folder 1e-6
    (convert.ENGINE_EPS) with its residual stream scaled to match, so the in-memory model (eps
    1e-5) is the reference; the folder reads the same with the latent norms at transformers' 1e-6
    and at rms_norm_eps (vLLM, SGLang, llama.cpp), has its own lm_head and the dense fields
    llama.cpp accepts."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, Mistral4ForCausalLM
    from checkpoint import CheckpointReader
    from convert import convert_in_memory
    folder, out, calib, recipe = _converted_at_eps_1e5(tiny, name, tmp_path)
    a = CheckpointReader(folder).args
    tokens = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(7))
    # transformers 5.23 does not list mistral4 under AutoModelForCausalLM: its own class, then
    cls = Mistral4ForCausalLM if a.n_experts else AutoModelForCausalLM
    ref, info = cls.from_pretrained(out, output_loading_info=True)
    ref.eval()
    kind = type(ref).__name__.removesuffix("ForCausalLM")
    assert kind == ("Mistral4" if a.n_experts else "DeepseekV3")
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    written = json.loads((out / "config.json").read_text())
    with safe_open(out / "model.safetensors", "pt") as f:
        assert "lm_head.weight" in f.keys() and not written["tie_word_embeddings"]
    assert written["rms_norm_eps"] == 1e-6 and written["transmla"]["residual_scale"] == math.sqrt(0.1)
    if not a.n_experts:  # llama.cpp: no experts, no groups; transformers and vLLM: every layer dense
        assert (written["n_routed_experts"], written["n_group"], written["first_k_dense_replace"]) == (0, None, a.n_layers)
    else:
        assert written["n_group"] < written["n_routed_experts"]
    ours, _ = load_model(out)
    in_memory = convert_in_memory(CheckpointReader(folder), calib, recipe)
    theirs = ref(tokens).logits
    assert_close(f"{name} converted: ours vs transformers {kind}", ours(tokens), theirs, 1e-4)
    assert_close(f"{name} converted: written (eps 1e-6, residual scaled) vs in-memory (eps 1e-5)", ours(tokens),
                 in_memory(tokens), 1e-5)
    _engine_eps(ref, written["rms_norm_eps"])
    assert_close(f"{name} converted: latent norms at rms_norm_eps vs at transformers' 1e-6", ref(tokens).logits,
                 theirs, 1e-5)
    assert ours.kv_bytes_per_token() == a.n_layers * (20 + a.head_dim // 2) * 4


def test_convert_embedded_model_loads_in_stock_transformers(smollm, tmp_path):
    """python convert.py on the embedded model at the default setting (R = 64, r = 32, F = 4; a
    smaller calibration budget and 5 block-fit steps to keep CI short): the folder loads in stock
    transformers with the cache of R + r values per token per layer and matches our model on it."""
    from transformers import AutoModelForCausalLM
    from generate import generate
    from tokenizer import load_tokenizer
    out = tmp_path / "smollm-mla"
    res = _script("convert.py", "--out", str(out), "--calib-tokens", "4096", "--eval-text", "none", "--block-fit", "5")
    print(res.stdout)
    assert res.returncode == 0, res.stderr
    report = json.loads((out / "convert_report.json").read_text())
    assert report["kv_values_per_token_per_layer"] == {"before": 384, "after": 96}
    assert "evaluation" not in next(line for line in res.stdout.splitlines() if line.startswith("conversion time"))
    # which engines' MLA kernels take R + r = 96 (vLLM's: 320, 512, 576 on GPU, 576 only on CPU)
    assert any(line.startswith("serving") and "R + r = 96: vLLM's Triton MLA backend on GPU only" in line
               for line in res.stdout.splitlines())
    from convert import mla_kernels
    assert "every MLA kernel" in mla_kernels(512, 64) and "not its CPU one" in mla_kernels(256, 64)
    ref = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(ref).__name__ == "DeepseekV3ForCausalLM"
    ours, _ = load_model(out)
    tok = load_tokenizer(out)
    ids = torch.tensor([tok.encode("The capital of France is Paris. The capital of Germany is Berlin. " * 8)])
    with torch.no_grad():
        assert_close("converted SmolLM2: ours vs transformers DeepseekV3", ours(ids), ref(ids).logits, 1e-3)
        # bench.py's perplexity of the converted model == transformers' (2 windows of 1024)
        import math
        from evaluate import perplexity
        from fetch import EVAL_TEXT
        eval_ids = tok.encode(EVAL_TEXT.read_text())[: 2 * 1024]
        mine = perplexity(ours, eval_ids, 1024)["ppl"]
        windows = torch.tensor(eval_ids).view(2, 1024)
        nll = sum(F.cross_entropy(ref(w[None]).logits[0, :-1], w[1:], reduction="sum").item() for w in windows)
        theirs = math.exp(nll / (2 * 1023))
        print(f"converted SmolLM2 perplexity on 2 x 1024 tokens: ours {mine:.4f}, transformers {theirs:.4f}, "
              f"relative difference {abs(mine / theirs - 1):.2e}")
        assert abs(mine / theirs - 1) < 1e-3
    prompt = tok.encode("The capital of France is")
    ours.setup_caches(1, len(prompt) + 16)
    print("greedy from the converted model:", repr(tok.decode(generate(ours, prompt, 16))))


# ----------------------------------------------------------------------------- tensor parallelism (tpla.py)

# TPLA decode on 2 ranks is an approximation: the largest logit difference from MLA it may show on
# the tiny 3-head checkpoint below (measured 0.042 with no transform, 0.033 hadamard, 0.032 pca)
TP_JOBS = [("mla3", "heads", "none"), ("mla_qlora_bias", "heads", "none"), ("mqa3", "heads", "none"),
           ("mla3", "tpla", "none"), ("mla3", "tpla", "hadamard"), ("mla3", "tpla", "pca"),
           ("mla_qlora_bias", "tpla", "hadamard"), ("mla3_sharp", "tpla", "none"), ("mla3_sharp", "tpla", "pca")]


def _prefill_then_decode(model, tokens: torch.Tensor, prompt: int = 12) -> torch.Tensor:
    """Logits of a prefill of `prompt` tokens, then of one decode step per remaining token."""
    model.setup_caches(tokens.shape[0], tokens.shape[1] + 4)
    steps = [model(tokens[:, :prompt], torch.arange(prompt))]
    steps += [model(tokens[:, i:i + 1], torch.tensor([i])) for i in range(prompt, tokens.shape[1])]
    model.clear_caches()
    return torch.cat(steps, 1)


def _chunked_then_decode(model, tokens: torch.Tensor, chunks=((0, 5), (5, 12))) -> torch.Tensor:
    """Logits of a prefill in chunks on a fresh cache, then of one decode step per remaining token."""
    model.setup_caches(tokens.shape[0], tokens.shape[1] + 4)
    steps = [model(tokens[:, a:b], torch.arange(a, b)) for a, b in chunks]
    steps += [model(tokens[:, i:i + 1], torch.tensor([i])) for i in range(chunks[-1][1], tokens.shape[1])]
    model.clear_caches()
    return torch.cat(steps, 1)


def _rotate_half(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """RoPE in the rotate_half layout, from its definition: dims (i, i + d/2) turn by pos * theta^(-2i/d)."""
    d = x.shape[-1]
    angle = pos[:, None].double() * theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)  # (T, d/2)
    cos, sin = angle.cos()[:, None, :], angle.sin()[:, None, :]  # (T, 1, d/2)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


@torch.no_grad()
def _tpla_reference(model, tokens: torch.Tensor, world: int, start: int) -> torch.Tensor:
    """Logits of an MLA model whose tokens at positions >= start attend in TPLA form over `world`
    shards, written from the definition (REFERENCE.md section 5), sharing no code with tpla.py or
    model.py's attention: shard i takes its contiguous slice P_i of the normed latent, expands every
    head's keys k_h = [W_UK,h[:, P_i] c[P_i] ; k_pe] and values v_h = W_UV,h[:, P_i] c[P_i] (naive
    form, nothing absorbed), runs a softmax of its own over them with DeepSeek's scale
    (d_nope + r)^-1/2, and passes its heads' outputs through o_proj; the shards' outputs are summed
    (o_proj's bias once). Positions < start attend over the whole latent (MLA form). In float64."""
    a0 = model.args
    H, R, r, dn, dv = a0.n_heads, a0.kv_lora_rank, a0.qk_rope_head_dim, a0.qk_nope_head_dim, a0.v_head_dim
    assert a0.rope_scaling is None and R % world == 0
    B, T = tokens.shape
    pos = torch.arange(T)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    scale = (dn + r) ** -0.5
    h = model.tok_embeddings(tokens).double()
    for block in model.layers:
        at = block.attention
        x = block.attention_norm(h.float()).double()
        lin = lambda m, t: F.linear(t, m.weight.double(), None if m.bias is None else m.bias.double())
        if at.q_lora_rank:
            qa = lin(at.wq_a, x)
            q = lin(at.wq_b, qa * torch.rsqrt(qa.pow(2).mean(-1, keepdim=True) + at.q_norm.eps) * at.q_norm.weight.double())
        else:
            q = lin(at.wq, x)
        q_nope, q_pe = q.view(B, T, H, dn + r).split([dn, r], -1)
        c, k_pe = lin(at.wkv_a, x).split([R, r], -1)
        c = c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + at.kv_norm.eps) * at.kv_norm.weight.double()
        q_pe = _rotate_half(q_pe, pos, a0.rope_theta)
        k_pe = _rotate_half(k_pe[:, :, None], pos, a0.rope_theta)[:, :, 0]
        W = at.wkv_b.weight.double().view(H, dn + dv, R)
        wo = at.wo.weight.double()
        y = torch.zeros_like(h)
        for first, n_shards in ((0, 1), (start, world)):  # rows [first, T): MLA form, then rows >= start: TPLA
            y_rows = 0
            for i in range(n_shards):
                P = slice(i * R // n_shards, (i + 1) * R // n_shards)
                k = torch.einsum("btc,hdc->bthd", c[..., P], W[:, :dn, P])  # (B, T, H, dn)
                v = torch.einsum("btc,hdc->bthd", c[..., P], W[:, dn:, P])  # (B, T, H, dv)
                s_ = (torch.einsum("bqhd,bkhd->bhqk", q_nope, k) + torch.einsum("bqhd,bkd->bhqk", q_pe, k_pe)) * scale
                p_ = s_.masked_fill(~causal, float("-inf")).softmax(-1)  # (B, H, T, T): this shard's own softmax
                o = torch.einsum("bhqk,bkhd->bqhd", p_, v).reshape(B, T, H * dv)
                y_rows = y_rows + o @ wo.T
            y[:, first:] = y_rows[:, first:]
        if at.wo.bias is not None:
            y = y + at.wo.bias.double()
        h = h + y
        h = h + block.feed_forward(block.ffn_norm(h.float())).double()
    return model.logits(model.norm(h.float()))


def _greedy(model) -> list[int]:
    from generate import generate
    model.setup_caches(1, 20)
    out = generate(model, list(range(5, 17)), 8)
    model.clear_caches()
    return out


@torch.no_grad()
def test_latent_transform_is_exact(tiny):
    """The reparametrisation alone (norm weight into the up-projection, then c' = Q c) leaves the
    logits unchanged, naive and absorbed, with a random norm weight and with convert.py's tiny-scale
    latent (RMS ~1e-10 under a norm weight of sqrt(eps) / scale), in fp32."""
    import tpla
    folder = tiny["deepseek_v3_qlora_bias"][0]
    tokens = _tp_tokens()
    for tiny_scale in (False, True):
        model = load_model(folder)[0]
        if tiny_scale:
            for layer in model.layers:
                a = layer.attention
                rms = (a.wkv_a(model.tok_embeddings.weight)[:, : a.R]).pow(2).mean().sqrt()
                s = 1e-10 / rms
                a.wkv_a.weight[: a.R] *= s
                a.wkv_a.bias[: a.R] *= s
                a.kv_norm.weight.copy_(a.kv_norm.weight * (1e-6 ** 0.5) / s)
        want = {impl: _logits_with(model, impl, tokens) for impl in ("naive", "absorb")}
        for name, Q in (("hadamard", tpla.hadamard(model.args.kv_lora_rank)),
                        ("random orthogonal", torch.linalg.qr(torch.randn(model.args.kv_lora_rank,
                                                                          model.args.kv_lora_rank).double())[0])):
            folded = load_model(folder)[0]
            folded.load_state_dict(model.state_dict())
            for layer in folded.layers:
                tpla.fold_transform(layer.attention, Q)
            for impl in ("naive", "absorb"):
                assert_close(f"latent transform {name} ({impl}, tiny-scale latent {tiny_scale}) vs original",
                             _logits_with(folded, impl, tokens), want[impl], 1e-5)


def _logits_with(model, impl, tokens):
    for layer in model.layers:
        layer.attention.impl = impl
    return model(tokens)


@torch.no_grad()
def test_tp_one_rank_equals_single_device(tp_tiny, one_rank):
    """World size 1: head-parallel and TPLA (each transform) give the single-device logits, in a full
    forward, in prefill + decode and in a chunked prefill + decode; TPLA's decode-form perplexity
    equals the plain one."""
    import tpla
    from evaluate import perplexity
    tokens = _tp_tokens()
    for name, mode, transform in TP_JOBS:
        folder = tp_tiny[name]
        ref = load_model(folder)[0]
        model = tpla.load_parallel(folder, mode, 0, 1, transform=transform, calib=_calib())[0]
        label = f"{name} --tp {mode}" + (f" ({transform})" if mode == "tpla" else "") + ", 1 rank"
        assert_close(f"{label}: full forward vs single device", model(tokens), ref(tokens), 1e-5)
        assert_close(f"{label}: prefill + decode vs single device", _prefill_then_decode(model, tokens),
                     ref(tokens), 1e-5)
        assert_close(f"{label}: chunked prefill + decode vs single device", _chunked_then_decode(model, tokens),
                     ref(tokens), 1e-5)
    ids = _tp_tokens().flatten().tolist()
    want = perplexity(load_model(tp_tiny["mla3"])[0], ids, 16)
    got = perplexity(tpla.load_parallel(tp_tiny["mla3"], "tpla", 0, 1)[0], ids, 16, decode_form=True, batch=2)
    print("perplexity, decode form on 1 rank vs full forward:", got, want)
    for k in ("ppl", "ppl_decode"):
        assert abs(got[k] / want[k] - 1) < 1e-5


def _tp_worker(rank: int, world: int, port: int, folders: dict, out: str):
    """One rank of test_tp_two_ranks: the environment torchrun would set, then every job."""
    import os
    os.environ.update(_rank_env(rank, world, port))
    import tpla
    from cli import leave_process_group
    init_distributed("cpu")
    results = {}
    with torch.no_grad():
        for name, mode, transform in TP_JOBS:
            model = tpla.load_parallel(folders[name], mode, rank, world, transform=transform, calib=_calib())[0]
            attention = {k: v for k, v in model.state_dict().items() if ".attention." in k} if mode == "tpla" else None
            results[name, mode, transform] = (model(_tp_tokens()), _prefill_then_decode(model, _tp_tokens()),
                                              _greedy(model), model.kv_bytes_per_token(),
                                              _chunked_then_decode(model, _tp_tokens()), attention)
    if rank == 0:
        torch.save(results, out)
    leave_process_group()


@torch.no_grad()
def test_tp_two_ranks(tp_tiny, tmp_path):
    """2 gloo processes. Head-parallel (uneven 1 + 2 heads; GQA with its one KV head replicated) ==
    the single-device model: logits, greedy tokens, a chunked prefill. TPLA: the full forward and a
    prefill from position 0 are MLA form, exact; every token after that (decode steps, and the
    chunks of a prefill after its first) is TPLA form and equals _tpla_reference, written from the
    definition, on the checkpoint as rank 0 holds it (its latent transformed: none, Hadamard, PCA).
    Where attention is sharp (mla3_sharp) the split must show: TPLA differs from MLA by far more
    than the reference's tolerance. The cache per rank is R / 2 + r values per token per layer,
    against R + r for head-parallel."""
    import torch.multiprocessing as mp
    import tpla
    out = tmp_path / "rank0.pt"
    mp.spawn(_tp_worker, args=(2, _free_port(), dict(tp_tiny), str(out)), nprocs=2, join=True)
    results = torch.load(out)
    tokens = _tp_tokens()
    for (name, mode, transform), (full, steps, greedy, kv_bytes, chunked, attention) in results.items():
        ref = load_model(tp_tiny[name])[0]
        want = ref(tokens)
        label = f"{name} --tp {mode}" + (f" ({transform})" if mode == "tpla" else "") + ", 2 ranks"
        assert_close(f"{label}: full forward vs single device", full, want, 1e-5)
        a = ref.args
        if mode == "heads":
            assert_close(f"{label}: prefill + decode vs single device", steps, want, 1e-5)
            assert_close(f"{label}: chunked prefill + decode vs single device", chunked, want, 1e-5)
            assert greedy == _greedy(ref)
            assert kv_bytes == ref.kv_bytes_per_token()
            continue
        assert_close(f"{label}: prefill (MLA form) vs single device", steps[:, :12], want[:, :12], 1e-5)
        held = load_model(tp_tiny[name])[0]  # the checkpoint as the ranks hold it: its latent transformed
        held.load_state_dict({**held.state_dict(), **attention})
        assert_close(f"{label}: the transformed checkpoint vs the original (one device)", held(tokens), want, 1e-5)
        assert_close(f"{label}: prefill + TPLA decode vs the reference", steps, _tpla_reference(held, tokens, 2, 12), 1e-5)
        assert_close(f"{label}: chunked prefill (5 + 7) + TPLA decode vs the reference", chunked,
                     _tpla_reference(held, tokens, 2, 5), 1e-5)
        diff = (steps[:, 12:] - want[:, 12:]).abs().max().item()
        agree = (steps[:, 12:].argmax(-1) == want[:, 12:].argmax(-1)).float().mean().item()
        print(f"{label}: decode (TPLA form) vs MLA: max |diff| {diff:.3g}, top-1 agreement {agree:.0%}")
        assert diff > (0.1 if "sharp" in name else 1e-2)  # the split is active
        if transform == "none":  # the one-process simulation finetune.py trains with computes the same
            sim = tpla.simulate(load_model(tp_tiny[name])[0], 2, start=12)(tokens)
            assert_close(f"{label}: tpla.simulate (one process) vs the reference", sim,
                         _tpla_reference(held, tokens, 2, 12), 1e-5)
        assert kv_bytes == a.n_layers * (a.kv_lora_rank // 2 + a.qk_rope_head_dim) * 4


@torch.no_grad()
def test_tpla_reference_is_mla_on_one_shard(tp_tiny):
    """The reference itself: with one shard it is the plain MLA model (so its TPLA form differs from
    MLA by the split alone), and its TPLA form at 2 shards is not the MLA model's."""
    tokens = _tp_tokens()
    for name in ("mla3", "mla_qlora_bias", "mla3_sharp"):
        model = load_model(tp_tiny[name])[0]
        assert_close(f"{name}: reference with 1 shard vs the model", _tpla_reference(model, tokens, 1, 0), model(tokens), 1e-5)
        diff = (_tpla_reference(model, tokens, 2, 0) - model(tokens)).abs().max().item()
        print(f"{name}: reference with 2 shards vs the model: max |diff| {diff:.3g}")
        assert diff > 1e-3


# ----------------------------------------------------------------------------- fine-tuning (finetune.py)

def test_finetune_trains_as_if_the_residual_were_unscaled(tmp_path):
    """convert.py writes the residual stream scaled by alpha (rms_norm_eps 1e-6 for every engine):
    fine-tuning that folder moves its weights as fine-tuning the unscaled twin (the same model
    with rms_norm_eps 1e-5 and the embeddings, o_proj and down_proj alpha times larger) does, not
    1/alpha times faster, every weight training (--trainable all)."""
    import math
    import transformers as tf
    from safetensors.torch import load_file, save_file
    from writer import TOKENIZER_FILES
    from fetch import CALIB_TEXT, ensure_default_model, ensure_texts
    ensure_texts()
    gqa = tmp_path / "gqa"
    torch.manual_seed(0)
    tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, intermediate_size=96, vocab_size=49152,
                                       max_position_embeddings=256, rms_norm_eps=1e-5)).save_pretrained(gqa)
    for name in TOKENIZER_FILES:
        if (ensure_default_model() / name).is_file():
            shutil.copy(ensure_default_model() / name, gqa / name)
    mla = _converted(gqa, tmp_path / "mla")
    cfg = json.loads((mla / "config.json").read_text())
    alpha = cfg["transmla"]["residual_scale"]
    assert alpha == math.sqrt(0.1)
    twin = tmp_path / "twin"
    shutil.copytree(mla, twin)
    state = load_file(mla / "model.safetensors")
    for k in state:
        if k.endswith(("embed_tokens.weight", "o_proj.weight", "down_proj.weight")):
            state[k] = state[k] / alpha
    save_file(state, twin / "model.safetensors", metadata={"format": "pt"})
    (twin / "config.json").write_text(json.dumps({**cfg, "rms_norm_eps": 1e-5,
                                                  "transmla": {**cfg["transmla"], "residual_scale": 1.0}}))
    tokens = torch.randint(0, 49152, (2, 40), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert_close("the unscaled twin vs the written folder, before", load_model(twin)[0](tokens),
                     load_model(mla)[0](tokens), 1e-5)
    for folder in (mla, twin):
        res = _script("finetune.py", "--ckpt", str(folder), "--teacher", str(gqa), "--text", str(CALIB_TEXT),
                      "--tokens", "512", "--seq-len", "32", "--batch", "2", "--lr", "1e-3", "--minutes", "0",
                      "--dtype", "float32", "--trainable", "all", "--weight-decay", "0.1", "--eval-text", "none",
                      "--out", str(tmp_path / f"{folder.name}-ft"))
        assert res.returncode == 0, res.stderr[-3000:]
    with torch.no_grad():
        a, b = load_model(tmp_path / "mla-ft")[0](tokens), load_model(tmp_path / "twin-ft")[0](tokens)
        moved = (a - load_model(mla)[0](tokens)).abs().max().item()
    print(f"fine-tuning moved logits by up to {moved:.3g}")
    assert_close("fine-tuned: the written folder vs its unscaled twin", a, b, 1e-3 * moved)
    assert moved > 1e-2


@pytest.mark.parametrize("name", ["llama", "qwen2_qlora"])
@torch.no_grad()
def test_finetune_unfold_fold_exact(tiny, name, tmp_path):
    """The student finetune.py trains equals the loaded checkpoint at step 0 (its latent norms'
    gains unfolded into the down-projections, the attention input's scale undone), and folding
    them back gives the same logits and weights again, the latent at convert.py's RMS under stock
    DeepSeek's norm. A real RMSNorm (a DeepSeek checkpoint's own) is left alone."""
    from finetune import LINEAR, fold, latent_mean_squares, load_student, unfold
    folder = tiny[name.removesuffix("_qlora")][0]
    student = _converted(folder, tmp_path / "mla", q_lora_rank=24 if "qlora" in name else 0)
    tokens = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(7))
    probe = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(8))
    loaded, _ = load_model(student)
    model, unfolded, params = load_student(student, "cpu", torch.float32, "attn", probe)
    a = loaded.args
    assert len(unfolded) == a.n_layers * (2 if a.q_lora_rank else 1), unfolded
    # the latent rows are O(1) now: AdamW's ~lr steps are small against them
    w = model.layers[0].attention.wkv_a.weight[: a.kv_lora_rank]
    print(f"{name}: latent rows' RMS {loaded.layers[0].attention.wkv_a.weight[: a.kv_lora_rank].pow(2).mean().sqrt():.3g}"
          f" folded, {w.pow(2).mean().sqrt():.3g} unfolded")
    assert w.abs().max() > 1e-2
    assert all(p.dtype == torch.float32 and p.requires_grad for p in params)
    assert_close(f"{name}: step-0 student (unfolded) vs loaded checkpoint", model(tokens), loaded(tokens), 1e-5)
    x = model.layers[0].attention_norm.weight
    print(f"{name}: attention input norm weight RMS {loaded.layers[0].attention_norm.weight.pow(2).mean().sqrt():.3g} "
          f"folded, {x.pow(2).mean().sqrt():.3g} unfolded (the source's)")
    fold(model, unfolded)
    assert_close(f"{name}: unfolded then folded vs loaded checkpoint", model(tokens), loaded(tokens), 1e-5)
    worst = max((v - w).abs().max().item() / max(w.abs().max().item(), 1e-30)
                for v, w in zip(model.state_dict().values(), loaded.state_dict().values()))
    print(f"{name}: every weight unfolded then folded vs loaded: largest |diff| / max |weight| {worst:.3g}")
    assert worst < 1e-6
    ms = latent_mean_squares(model, tokens)
    assert len(ms) == len(unfolded) and max(m.max().item() for m in ms.values()) < LINEAR * a.latent_norm_eps
    real, _ = load_model(tiny["deepseek_v3"][0])
    assert unfold(real, tokens) == []
    # bf16 training: the frozen attention norm comes back as it was written, not rounded twice
    model, unfolded, _ = load_student(student, "cpu", torch.bfloat16, "attn", probe)
    fold(model, unfolded)
    bf16, _ = load_model(student, dtype=torch.bfloat16)
    for i, layer in enumerate(model.layers):
        assert torch.equal(layer.attention_norm.weight, bf16.layers[i].attention_norm.weight), i


@torch.no_grad()
def test_distill_loss_chunks_equal_one_pass(tiny, tmp_path):
    """The chunked loss and its gradient equal the loss computed from whole logits in one pass."""
    from finetune import distill_step, load_student
    folder = tiny["llama"][0]
    teacher, _ = load_model(folder)
    # unfolded, as finetune.py trains it: folded, the ~1e-10 latent rows get gradients of ~1e8, where
    # float32 rounding alone differs by more than the bound between two orders of summation
    probe = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(8))
    student, _, params = load_student(_converted(folder, tmp_path / "mla"), "cpu", torch.float32, "attn", probe)
    x, y = torch.randint(0, VOCAB, (2, 2, 24), generator=torch.Generator().manual_seed(11))
    ctx = torch.autocast("cpu", enabled=False)
    with torch.enable_grad():
        kl, ce = distill_step(student, teacher, x, y, 0.5, ctx, chunk=7)
        chunked = [p.grad.clone() for p in params]
        assert min(g.abs().max().item() for g in chunked) > 0  # every trainable weight gets a gradient
        for p in params:
            p.grad = None
        logp_t, logp_s = F.log_softmax(teacher(x), -1), F.log_softmax(student(x), -1)
        kl_ref = F.kl_div(logp_s, logp_t, log_target=True, reduction="sum") / y.numel()
        ce_ref = F.nll_loss(logp_s.flatten(0, 1), y.flatten())
        (kl_ref + 0.5 * ce_ref).backward()
    assert_close("chunked KL vs one pass", torch.tensor(kl), kl_ref, 1e-5)
    assert_close("chunked CE vs one pass", torch.tensor(ce), ce_ref, 1e-5)
    assert_close("chunked gradient vs one pass", torch.cat([g.flatten() for g in chunked]),
                 torch.cat([p.grad.flatten() for p in params]), 1e-6)


def _torchrun(ranks: int, *argv):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
                           *argv], cwd=ROOT, capture_output=True, text=True)


def _losses(folder: Path) -> torch.Tensor:
    """(steps, 2): KL and CE of every step, from the run's finetune_report.json."""
    return torch.tensor([row[1:] for row in json.loads((folder / "finetune_report.json").read_text())["loss"]],
                        dtype=torch.float64)


def test_finetune_fsdp_two_ranks_train_as_one_process(tmp_path):
    """torchrun with 2 gloo ranks on CPU: FSDP2 shards the student and the teacher, each rank takes
    half of every step's windows, and the run gives the same losses, step by step, and the same
    weights as one process with the same global batch (recomputing the activations in the backward
    too); 2 ranks stopped (Ctrl-C) after 3 steps and resumed on 1 rank from the sharded state continue the
    same run. Every weight trains (the root unit's embedding, which is also the head, included).
    With --tpla 2 and one window per rank, each rank trains its window in the form one process
    gives it (the odd one in TPLA form)."""
    from fetch import CALIB_TEXT
    gqa, mla = _tiny_pair_with_tokenizer(tmp_path)
    common = ["finetune.py", "--ckpt", str(mla), "--teacher", str(gqa), "--text", str(CALIB_TEXT), "--tokens",
              str(8 * 4 * 32), "--seq-len", "32", "--batch", "4", "--lr", "1e-3", "--minutes", "0", "--dtype",
              "float32", "--trainable", "all", "--eval-text", "none"]
    runs = {"one process": _script(*common, "--out", str(tmp_path / "one")),
            "2 ranks": _torchrun(2, *common, "--out", str(tmp_path / "two"))}
    stopped = _torchrun(2, str(_stopped_after(3, tmp_path)), *common[1:], "--out", str(tmp_path / "moved"),
                        "--save-every", "3")  # ranks stopped together keep the state saved last: step 3's
    assert "interrupted (Ctrl-C): kept the state saved last in" in stopped.stderr, stopped.stderr[-3000:]
    runs["... resumed on 1"] = _script(*common, "--out", str(tmp_path / "moved"), "--resume")
    tpla = [*common, "--batch", "2", "--tokens", str(4 * 2 * 32), "--tpla", "2"]  # rank 0's window takes MLA form only
    runs["TPLA, one process"] = _script(*tpla, "--out", str(tmp_path / "tpla_one"))
    runs["TPLA, 2 ranks"] = _torchrun(2, *tpla, "--out", str(tmp_path / "tpla_two"))
    for name, res in runs.items():
        assert res.returncode == 0, f"{name}: {res.stderr[-3000:]}"
    assert "resuming at step 3 of 8" in runs["... resumed on 1"].stderr
    want = _losses(tmp_path / "one")
    reference, _ = load_model(tmp_path / "one")
    start, _ = load_model(mla)
    tokens = torch.randint(0, 49152, (2, 40), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        moved = (reference(tokens) - start(tokens)).abs().max().item()
    print(f"one process: KL {want[0, 0]:.4f} -> {want[-1, 0]:.4f} over {len(want)} steps; logits moved by {moved:.3g}")
    assert len(want) == 8 and moved > 1e-3
    # The losses are means over 128 tokens of terms made from float32 log-probabilities of size up
    # to log V (about 11): each term carries rounding of about 7e-7, their mean about 6e-8, and
    # attention's fused kernel rounds a batch split over 2 ranks differently from the whole batch
    # (its blocks follow the batch). So the bound is absolute, a few times that: 3e-7 (the KL
    # here is about 3e-3, so a relative bound would sit below float32's rounding of it).
    for name in ("two", "moved"):
        got = _losses(tmp_path / name)
        loss_diff = (got - want).abs().max().item()
        model, _ = load_model(tmp_path / name)
        with torch.no_grad():
            logit_diff = (model(tokens) - reference(tokens)).abs().max().item()
        print(f"{name} vs one process: losses, largest difference {loss_diff:.3g} (relative "
              f"{((got - want).abs() / want.abs()).max().item():.3g}); logits after training, max |diff| {logit_diff:.3g}")
        assert got.shape == want.shape and loss_diff < 3e-7 and logit_diff < 1e-4
    got, want = _losses(tmp_path / "tpla_two"), _losses(tmp_path / "tpla_one")
    loss_diff = (got - want).abs().max().item()
    print(f"--tpla 2, one window per rank: 2 ranks vs one process, losses' largest difference {loss_diff:.3g} "
          f"(relative {((got - want).abs() / want.abs()).max().item():.3g})")
    assert got.shape == want.shape and loss_diff < 3e-7
