"""Native MLA checkpoints, the models TPLA was published on: DeepSeek-V2 (and V2-Lite), DeepSeek-V3,
Kimi-K2 and Moonlight (shipped as deepseek_v3). Mixture-of-experts layers with shared experts and
each release's routing, YaRN RoPE with DeepSeek's softmax-scale correction, q_lora, interleaved
rope rows, dense first layers.

    pytest test_deepseek.py -s        # -s shows the differences

Rungs: our forward == transformers' DeepseekV2ForCausalLM / DeepseekV3ForCausalLM on tiny random
checkpoints of each shape (written by transformers' save_pretrained), naive and absorbed; greedy
tokens equal; cached decode == one full forward. Then split over ranks: head-parallel and TPLA
with 1 rank exact; with 2 gloo ranks head-parallel exact (logits and greedy tokens), TPLA's
prefill exact and its decode equal to test_equivalence's reference (written from the
definition); each rank holds only its share of the routed experts. Routing we do not compute is
refused in one line.
"""
import json
import shutil

import pytest
import torch

import test_equivalence as te
from checkpoint import load_model
from cli import UserError, init_distributed
from conftest import VOCAB, _calib, _free_port, _launch, _one_clear_line, _rank_env, _script, _tp_tokens, assert_close

SHAPE = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=96,
             moe_intermediate_size=32, vocab_size=VOCAB, max_position_embeddings=256, kv_lora_rank=16,
             qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=10)


def yarn(factor: float, original: int, **kw) -> dict:
    return {"rope_type": "yarn", "rope_theta": 10000.0, "factor": factor, "original_max_position_embeddings": original,
            "beta_fast": 32, "beta_slow": 1, **kw}


def _configs():
    import transformers as tf
    v2, v3 = (tf.DeepseekV2Config, tf.DeepseekV2ForCausalLM), (tf.DeepseekV3Config, tf.DeepseekV3ForCausalLM)
    return {
        # V2-Lite's routing: softmax, greedy top-k, 2 shared experts, a dense first layer; its YaRN
        "v2_lite": (*v2, dict(q_lora_rank=None, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=2,
                              first_k_dense_replace=1, topk_method="greedy",
                              rope_parameters=yarn(4.0, 64, mscale=0.707, mscale_all_dim=0.707))),
        # V2's: group-limited greedy (the best 2 of 4 groups, a group ranked by its best expert), scaled x16
        "v2_grouped": (*v2, dict(q_lora_rank=24, n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=1,
                                 first_k_dense_replace=0, topk_method="group_limited_greedy", n_group=4,
                                 topk_group=2, routed_scaling_factor=16.0)),
        # V3's: sigmoid, a bias on the choice, groups ranked by their best two, renormalised, x2.5;
        # YaRN with mscale != mscale_all_dim, so cos and sin carry a gain too
        "v3": (*v3, dict(q_lora_rank=24, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                         first_k_dense_replace=1, n_group=4, topk_group=2, norm_topk_prob=True,
                         routed_scaling_factor=2.5, rope_parameters=yarn(8.0, 32, mscale=1.0, mscale_all_dim=0.8))),
        # Kimi-K2's: one group, YaRN x32 with beta_fast = beta_slow = 1
        "kimi_k2": (*v3, dict(q_lora_rank=24, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                              first_k_dense_replace=1, n_group=1, topk_group=1, routed_scaling_factor=2.827,
                              rope_parameters=yarn(32.0, 16, beta_fast=1, beta_slow=1, mscale=1.0,
                                                   mscale_all_dim=1.0))),
        # rope rows in halves (rope_interleave false), no YaRN, no shared experts
        "v3_halves": (*v3, dict(q_lora_rank=None, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=0,
                                first_k_dense_replace=0, n_group=2, topk_group=1, rope_interleave=False)),
    }


def _save(cfg_cls, model_cls, kw: dict, folder, shape=SHAPE):
    """A transformers checkpoint of random weights, every parameter and the router's correction
    bias moved off its initial value (a bias of 0 or a norm of 1 would hide a missing term)."""
    torch.manual_seed(0)
    ref = model_cls(cfg_cls(**{**shape, **kw})).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for name, b in ref.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn_like(b) * 0.1)
    ref.save_pretrained(folder)
    return ref


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    """name -> (folder, transformers model)."""
    out = {}
    for name, (cfg_cls, model_cls, kw) in _configs().items():
        folder = tmp_path_factory.mktemp(name)
        out[name] = folder, _save(cfg_cls, model_cls, kw, folder)
    return out


def _tokens():
    return torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", list(_configs()))
@torch.no_grad()
def test_forward_matches_transformers(native, name):
    folder, ref = native[name]
    tokens = _tokens()
    expected = ref(tokens).logits
    for impl in ("naive", "absorb"):
        model, _ = load_model(folder, mla_impl=impl)
        assert_close(f"{name} ({impl}) vs transformers", model(tokens), expected, 1e-4)


@torch.no_grad()
def test_layers_are_what_the_config_says(native):
    """first_k_dense_replace dense layers, then MoE layers with the config's experts; the router's
    bias kept in float32 when the model is bfloat16, as transformers keeps it."""
    from model import MoE, FeedForward
    model, _ = load_model(native["v3"][0], dtype=torch.bfloat16)
    kinds = [type(layer.feed_forward) for layer in model.layers]
    assert kinds == [FeedForward, MoE, MoE]
    moe = model.layers[1].feed_forward
    assert len(moe.experts) == 8 and moe.shared.w1.out_features == 32
    assert moe.gate.e_score_correction_bias.dtype == torch.float32
    assert model.layers[1].feed_forward.gate.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("name", ["v2_lite", "v3", "kimi_k2"])
@torch.no_grad()
def test_greedy_tokens_match_transformers(native, name):
    from generate import generate
    folder, ref = native[name]
    model, _ = load_model(folder)
    prompt = list(range(3, 15))
    model.setup_caches(1, len(prompt) + 16)
    ours = generate(model, prompt, 16, temperature=0.0)
    theirs = ref.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(prompt):].tolist()
    print(f"{name} greedy: ours {ours}, transformers {theirs}")
    assert ours == theirs


@pytest.mark.parametrize("impl", ["naive", "absorb"])
@torch.no_grad()
def test_cached_decode_equals_full_forward(native, impl):
    """A MoE + YaRN model: a prefill then one token at a time through the latent cache == one forward."""
    model, _ = load_model(native["v3"][0], mla_impl=impl)
    tokens = _tokens()
    full = model(tokens)
    model.setup_caches(2, 48)
    steps = [model(tokens[:, :10], torch.arange(10))]
    steps += [model(tokens[:, i:i + 1], torch.tensor([i])) for i in range(10, 40)]
    assert_close(f"v3 MoE + YaRN ({impl}): prefill + decode vs one forward", torch.cat(steps, 1), full, 1e-5)


def test_yarn_is_in_force(native):
    """The YaRN model is not the same model without YaRN (so the equalities above test it)."""
    folder = native["v3"][0]
    model, _ = load_model(folder)
    plain, _ = load_model(folder, rope_scaling=None)
    diff = (model(_tokens()) - plain(_tokens())).abs().max().item()
    print(f"v3 with vs without its YaRN: max |diff| {diff:.3g}")
    assert diff > 1e-2


def test_unsupported_routing_is_refused(native, tmp_path):
    """Routing and RoPE we do not compute: one line naming the field, exit non-zero, from a script."""
    base = json.loads((native["v2_lite"][0] / "config.json").read_text())
    base3 = json.loads((native["v3"][0] / "config.json").read_text())
    for name, src, change, needle in (
            ("v2_method", "v2_lite", {"topk_method": "noaux_tc"}, "topk_method 'noaux_tc'"),
            ("v2_norm", "v2_lite", {"norm_topk_prob": True}, "norm_topk_prob true"),
            ("v3_softmax", "v3", {"scoring_func": "softmax"}, "scoring_func 'softmax'"),
            ("v3_method", "v3", {"topk_method": "group_limited_greedy"}, "topk_method 'group_limited_greedy'"),
            ("v3_groups", "v3", {"n_group": 3}, "n_group 3"),
            ("v3_too_many", "v3", {"num_experts_per_tok": 6, "topk_group": 1}, "num_experts_per_tok 6"),
            # transformers renormalises one weight to 1, DeepSeek's code does not
            ("v3_one_expert", "v3", {"num_experts_per_tok": 1}, "num_experts_per_tok 1 and norm_topk_prob true"),
            # transformers ignores moe_layer_freq, vLLM honours it
            ("v3_every_second", "v3", {"moe_layer_freq": 2}, "moe_layer_freq 2"),
            ("v3_no_experts", "v3", {"n_routed_experts": 0}, "n_routed_experts 0"),
            ("v2_mlp_bias", "v2_lite", {"mlp_bias": True}, "mlp_bias true"),
            # one of mscale / mscale_all_dim: transformers and DeepSeek's code put different gains on cos and sin
            ("yarn_mscale_alone", "v3", {"rope_parameters": yarn(8.0, 32, mscale=0.707)}, "ambiguous"),
            ("yarn_all_dim_alone", "v3", {"rope_parameters": yarn(8.0, 32, mscale_all_dim=0.8)}, "ambiguous"),
            ("yarn_betas", "v3", {"rope_parameters": yarn(8.0, 32, beta_fast=1, beta_slow=32)}, "below beta_slow"),
            ("yarn_truncate", "v3", {"rope_parameters": yarn(8.0, 32, truncate="no")}, "truncate")):
        bad = tmp_path / name
        shutil.copytree(native[src][0], bad)
        (bad / "config.json").write_text(json.dumps({**(base if src == "v2_lite" else base3), **change}))
        _one_clear_line(_script("generate.py", "--ckpt", str(bad), "--prompt", "hi"), needle)
    # shared experts on disk with rows, and a config that says there are none
    bad = tmp_path / "v2_shared_unsaid"
    shutil.copytree(native["v2_lite"][0], bad)
    (bad / "config.json").write_text(json.dumps({**base, "n_shared_experts": 0}))
    with pytest.raises(UserError, match="shared_experts.* in all"):
        load_model(bad)
    with pytest.raises(UserError, match="'yarn' is supported on DeepSeek"):
        from checkpoint import args_from_config
        args_from_config({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 1,
                          "vocab_size": 8, "intermediate_size": 8,
                          "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})


# fields transformers' configs default (transformers 5), left out of config.json
LEFT_OUT = {"deepseek_v2": ("n_routed_experts", "n_shared_experts", "first_k_dense_replace", "q_lora_rank",
                            "routed_scaling_factor", "norm_topk_prob", "topk_method"),
            "deepseek_v3": ("n_shared_experts", "q_lora_rank", "first_k_dense_replace", "n_group", "topk_group",
                            "routed_scaling_factor", "norm_topk_prob")}


@pytest.mark.parametrize("kind", ["deepseek_v2", "deepseek_v3"])
@torch.no_grad()
def test_fields_left_out_mean_what_transformers_makes_them(tmp_path, kind):
    """A config.json without the routing fields (V3: 1 shared expert, the first 3 layers dense,
    best 4 of 8 groups, x2.5; V2: 64 experts, 2 shared; both: q_lora_rank 1536) is the model
    transformers builds from it, not one with our own defaults."""
    import transformers as tf
    cls = {"deepseek_v2": (tf.DeepseekV2Config, tf.DeepseekV2ForCausalLM),
           "deepseek_v3": (tf.DeepseekV3Config, tf.DeepseekV3ForCausalLM)}[kind]
    shape = {**SHAPE, "num_hidden_layers": 4}
    ref = _save(*cls, dict(n_routed_experts=16, num_experts_per_tok=2) if kind == "deepseek_v3" else
                dict(num_experts_per_tok=2), tmp_path, shape)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k not in LEFT_OUT[kind]}))
    model, _ = load_model(tmp_path)
    a = model.args
    print(f"{kind} read without {', '.join(LEFT_OUT[kind])}: {a.n_experts} experts, {a.n_shared_experts} shared, "
          f"{a.first_dense_layers} dense, groups {a.topk_group}/{a.n_group}, x{a.routed_scaling_factor}, "
          f"q_lora_rank {a.q_lora_rank}")
    assert_close(f"{kind} with fields left out vs transformers", model(_tokens()), ref(_tokens()).logits, 1e-4)


@torch.no_grad()
def test_kimi_k2_model_type_reads_as_deepseek_v3(native, tmp_path):
    """Kimi-K2's config.json says model_type kimi_k2 (architectures DeepseekV3ForCausalLM): read as
    DeepSeek-V3, and written back (tpla.py, finetune.py) under the same names."""
    from writer import write_model
    folder = tmp_path / "kimi"
    shutil.copytree(native["kimi_k2"][0], folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "kimi_k2"}))
    model, _ = load_model(folder)
    assert_close("kimi_k2 vs transformers' deepseek_v3", model(_tokens()), native["kimi_k2"][1](_tokens()).logits, 1e-4)
    write_model(model, folder, tmp_path / "again", torch.float32, {})
    assert json.loads((tmp_path / "again" / "config.json").read_text())["model_type"] == "kimi_k2"
    assert_close("kimi_k2 written back and read again", load_model(tmp_path / "again")[0](_tokens()),
                    model(_tokens()), 0.0)


@torch.no_grad()
def test_router_bias_stays_float32_in_bfloat16_files(native, tmp_path):
    """V3's e_score_correction_bias is written float32 when the weights go bfloat16: its small
    differences between experts decide the routing, and bfloat16 would round them away."""
    from checkpoint import CheckpointReader
    from writer import write_model, write_random_checkpoint
    model, folder = load_model(native["v3"][0])
    write_model(model, folder, tmp_path / "bf16", torch.bfloat16, {})
    name = "model.layers.1.mlp.gate.e_score_correction_bias"
    written = CheckpointReader(tmp_path / "bf16").get(name)
    ours = model.layers[1].feed_forward.gate.e_score_correction_bias
    print(f"written as {written.dtype}; max |diff| from the model's bias {(written - ours).abs().max().item():.3g}; "
          f"in bfloat16 it would be {(ours.bfloat16().float() - ours).abs().max().item():.3g}")
    assert written.dtype == torch.float32 and torch.equal(written, ours)
    assert load_model(tmp_path / "bf16", dtype=torch.bfloat16)[0].layers[1].feed_forward.gate.e_score_correction_bias.dtype == torch.float32
    write_random_checkpoint(tmp_path / "random", json.loads((folder / "config.json").read_text()))
    assert CheckpointReader(tmp_path / "random").get(name).dtype == torch.float32


# ----------------------------------------------------------------------------- split over ranks

# 3 heads (2 ranks: 1 + 2) and 5 routed experts (2 ranks: 2 + 3), a dense first layer, a shared expert
TP_SHAPE = {**SHAPE, "hidden_size": 48, "num_attention_heads": 3}
TP_KW = dict(q_lora_rank=None, n_routed_experts=5, num_experts_per_tok=2, n_shared_experts=1,
             first_k_dense_replace=1, n_group=1, topk_group=1, routed_scaling_factor=1.5)
TP_JOBS = [("heads", "none"), ("tpla", "none"), ("tpla", "pca"), ("tpla", "hadamard")]


@pytest.fixture(scope="module")
def tp_moe(tmp_path_factory):
    import transformers as tf
    folder = tmp_path_factory.mktemp("tp_moe")
    _save(tf.DeepseekV3Config, tf.DeepseekV3ForCausalLM, TP_KW, folder, TP_SHAPE)
    return folder


def _held(model) -> dict:
    """What a rank holds: its parameter count, and the routed experts of each MoE layer."""
    return {"params": sum(p.numel() for p in model.parameters()),
            "experts": [sorted(int(e) for e in layer.feed_forward.experts) for layer in model.layers
                        if hasattr(layer.feed_forward, "experts")]}


@torch.no_grad()
def test_tp_one_rank_equals_single_device(tp_moe, one_rank):
    import tpla
    tokens = _tp_tokens()
    ref = load_model(tp_moe)[0]
    want = ref(tokens)
    for mode, transform in TP_JOBS:
        model = tpla.load_parallel(tp_moe, mode, 0, 1, transform=transform, calib=_calib())[0]
        label = f"MoE --tp {mode} ({transform}), 1 rank"
        assert_close(f"{label}: full forward vs single device", model(tokens), want, 1e-5)
        assert_close(f"{label}: prefill + decode vs single device", te._prefill_then_decode(model, tokens), want, 1e-5)


@pytest.fixture(scope="module")
def one_rank():
    import torch.distributed as dist
    init_distributed("cpu")
    yield
    dist.destroy_process_group()


def _worker(rank: int, world: int, port: int, folder, out: str):
    import os
    os.environ.update(_rank_env(rank, world, port))
    import tpla
    from cli import leave_process_group
    init_distributed("cpu")
    results = {}
    with torch.no_grad():
        for mode, transform in TP_JOBS:
            model = tpla.load_parallel(folder, mode, rank, world, transform=transform, calib=_calib())[0]
            attention = {k: v for k, v in model.state_dict().items() if ".attention." in k}
            results[mode, transform] = (model(_tp_tokens()), te._prefill_then_decode(model, _tp_tokens()),
                                        te._greedy(model), _held(model), attention)
    torch.save(results, f"{out}.{rank}")
    leave_process_group()


@torch.no_grad()
def test_tp_two_ranks(tp_moe, tmp_path):
    """2 gloo processes on a MoE checkpoint. Head-parallel == the single-device model (logits,
    greedy tokens). TPLA: prefill exact; decode equal to the reference from the definition on the
    checkpoint as rank 0 holds it (test_equivalence._tpla_reference, whose feed-forward is the whole
    MoE). Each rank holds only its contiguous share of every MoE layer's routed experts, so less
    than the whole model; the expert split itself is exact (the head-parallel logits are)."""
    import torch.multiprocessing as mp
    out = tmp_path / "rank"
    mp.spawn(_worker, args=(2, _free_port(), tp_moe, str(out)), nprocs=2, join=True)
    ranks = [torch.load(f"{out}.{r}") for r in range(2)]
    tokens = _tp_tokens()
    ref = load_model(tp_moe)[0]
    want = ref(tokens)
    whole = _held(ref)
    for (mode, transform), (full, steps, greedy, held, attention) in ranks[0].items():
        label = f"MoE --tp {mode} ({transform}), 2 ranks"
        assert_close(f"{label}: full forward vs single device", full, want, 1e-5)
        for rank, r in enumerate(ranks):
            held = r[mode, transform][3]
            print(f"{label}: rank {rank} holds experts {held['experts'][0]} of each MoE layer, "
                  f"{held['params']} of the whole model's {whole['params']} parameters")
            assert held["experts"] == [[0, 1] if rank == 0 else [2, 3, 4]] * 2
            assert held["params"] < whole["params"]
        if mode == "heads":
            assert_close(f"{label}: prefill + decode vs single device", steps, want, 1e-5)
            assert greedy == te._greedy(ref)
            continue
        assert_close(f"{label}: prefill (MLA form) vs single device", steps[:, :12], want[:, :12], 1e-5)
        held_model = load_model(tp_moe)[0]
        held_model.load_state_dict({**held_model.state_dict(), **attention})
        assert_close(f"{label}: prefill + TPLA decode vs the reference", steps,
                        te._tpla_reference(held_model, tokens, 2, 12), 1e-5)
        diff = (steps[:, 12:] - want[:, 12:]).abs().max().item()
        agree = (steps[:, 12:].argmax(-1) == want[:, 12:].argmax(-1)).float().mean().item()
        print(f"{label}: decode (TPLA form) vs MLA: max |diff| {diff:.3g}, top-1 agreement {agree:.0%}")
        assert diff > 1e-3  # the split is active


def test_synthetic_shape_is_the_published_model():
    """bench.py's DeepSeek-V2-Lite shape reads as 15.7B parameters and 2.4B active per token (the input
    embedding table aside: a token reads one row of it), as published."""
    import math
    from fetch import SYNTHETIC
    from checkpoint import args_from_config, checkpoint_tensors
    a = args_from_config(SYNTHETIC["deepseek-v2-lite"])
    total = sum(math.prod(shape) for _, shape in checkpoint_tensors(a).values())
    per_expert = 3 * a.dim * a.moe_hidden_dim
    active = (total - (a.n_layers - a.first_dense_layers) * (a.n_experts - a.n_experts_per_tok) * per_expert
              - a.vocab_size * a.dim)
    print(f"DeepSeek-V2-Lite: {total / 1e9:.2f}B parameters, {active / 1e9:.2f}B active per token")
    assert abs(total / 1e9 - 15.7) < 0.05 and abs(active / 1e9 - 2.4) < 0.1  # published: 15.7B, 2.4B
    # what --synthetic cannot do: one line each, before anything is written
    _one_clear_line(_script("bench.py", "--synthetic", "deepseek-v2-lite", "--ppl", "x.txt"), "--synthetic")
    _one_clear_line(_script("bench.py", "--synthetic", "deepseek-v2-lite", "--layers", "28"), "has 27 layers")
    assert (a.kv_lora_rank, a.qk_rope_head_dim, a.n_heads) == (512, 64, 16)


def test_bench_tp_on_a_random_moe_checkpoint(tmp_path):
    """write_random_checkpoint writes a loadable folder of a config's shape (here a tiny DeepSeek-V2-Lite);
    bench.py under 2 ranks times head-parallel and TPLA on it and reports each rank's share of the
    weights against the whole checkpoint, and the per-rank cache (R + r against R / 2 + r)."""
    from fetch import SYNTHETIC
    from writer import write_random_checkpoint
    cfg = {**SYNTHETIC["deepseek-v2-lite"], "vocab_size": VOCAB, "hidden_size": 48, "intermediate_size": 64,
           "moe_intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 3, "n_routed_experts": 8,
           "num_experts_per_tok": 2, "kv_lora_rank": 16, "qk_nope_head_dim": 12, "qk_rope_head_dim": 8,
           "v_head_dim": 10}
    folder = tmp_path / "random"
    write_random_checkpoint(folder, cfg, torch.float32)
    model, _ = load_model(folder)
    assert torch.isfinite(model(_tokens())).all()
    ranks = _launch(2, "bench.py", "--ckpt", str(folder), "--contexts", "16,32", "--batch", "2",
                       "--new-tokens", "2", "--json", str(tmp_path / "bench.json"), timeout=300)
    assert all(r.returncode == 0 for r in ranks), ranks[0].stderr[-2000:] + ranks[1].stderr[-2000:]
    result = json.loads((tmp_path / "bench.json").read_text())
    print(ranks[0].stdout)
    assert {(r["model"], r["context"]) for r in result["decode"]} == {(m, c) for m in ("heads", "tpla") for c in (16, 32)}
    assert result["kv_bytes_per_token"] == {"heads": 2 * (16 + 8) * 4, "tpla": 2 * (8 + 8) * 4}
    assert [r["rank"] for r in result["ranks"]] == [0, 1]
    assert all(0 < r["param_bytes"] < result["checkpoint_bytes"] for r in result["ranks"])


@torch.no_grad()
def test_fitted_rotation_on_a_moe_checkpoint(tp_moe, tmp_path):
    """python tpla.py's fitted rotation on a native MoE checkpoint: the rotated folder (experts
    written back under DeepSeek's names) is the same model on one device, and its TPLA error falls."""
    import tpla
    with torch.enable_grad():
        record = tpla.rotate_for_tpla(tp_moe, tmp_path / "rotated", 2, _calib(), queries=64, steps=10, log=print)
    rotated, _ = load_model(tmp_path / "rotated")
    original, _ = load_model(tp_moe)
    assert_close("MoE checkpoint rotated for TPLA vs the original (one device)", rotated(_tp_tokens()),
                    original(_tp_tokens()), 1e-5)
    print("TPLA x2 attention error per layer, before -> after:", record["error_before"], record["error_after"])
    assert all(a < b for a, b in zip(record["error_after"], record["error_before"]))


def test_bench_bytes_and_flops_of_experts_by_hand(native):
    """bench.py's roofline on a mixture of experts, counted by hand. The tiny V2-Lite: hidden 64, 3
    layers (the first dense, MLP 96), 8 routed experts of 3 x 64 x 32 = 6144 parameters, 2 per token,
    2 shared (one SwiGLU of 64 rows: 12288), router 8 x 64. A step of batch 1 reads exactly the 2
    experts its token reaches; of batch 2, 8 (1 - (6/8)^2) = 3.5 of them expected. fp32."""
    from bench import step_bytes, step_flops, weight_bytes
    model = load_model(native["v2_lite"][0])[0]
    one, routed = 6144, 2 * 8 * 6144  # one expert; all routed experts of the 2 MoE layers
    held = weight_bytes(model)
    assert held == 4 * (sum(p.numel() for p in model.parameters()) - VOCAB * 64)  # the embedding is indexed
    assert weight_bytes(model, 1) == held - 4 * 2 * 6 * one
    assert weight_bytes(model, 2) == held - 4 * 2 * round(4.5 * one)
    assert step_bytes(model, 48, 1) == weight_bytes(model, 1) + 48 * 3 * (16 + 8) * 4
    for layer in model.layers:
        layer.attention.impl = "absorb"
    linears = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    router = 2 * 8 * 64
    per_token = linears - routed + 2 * 2 * one + router  # every weight but the routed experts, 2 of them per layer
    assert step_flops(model, 48, 2) == 2 * 2 * (per_token + 48 * 3 * 4 * (2 * 16 + 8))
