"""The Hugging Face boundary: read a checkpoint folder into our Transformer (writer.py writes one).

What is in here:
- find_checkpoint: `--ckpt` may name the folder or any file in it.
- args_from_config: a `config.json` (llama, qwen2, mistral, mixtral, deepseek_v2/v3, mistral4) -> ModelArgs,
  every field it needs checked for presence and type; mla_config, its inverse for what convert.py
  writes (stock DeepSeek-V3, or Mistral4 for Mixtral).
- HF_NAMES / hf_name: the one mapping from our parameter names to Hugging Face's; STACKED_EXPERTS:
  how mistral4 (MLA + Mixtral's router, what convert.py writes for Mixtral) stacks experts;
  checkpoint_tensors: every tensor a config declares, with its shape.
- The RoPE layout change at the boundary: DeepSeek checkpoints lay rotary pairs out
  interleaved (x0, x1), (x2, x3), ...; model.py works in rotate_half (x_i, x_{i+D/2}). Rows of
  the projections that produce q_pe and k_pe are permuted here once, so scores are unchanged.
- Reading, checked before any tensor is read: the index against its shards, every safetensors
  header (a JSON object; known dtypes; offsets that tile the data exactly, as shape x dtype
  says), the tensors against the config (none missing, none unaccounted for, every shape).
  FP8 weights with block scales (DeepSeek-V3's format) are dequantized as they are read; other
  quantized checkpoints are refused with how to dequantize first. Every refusal is a UserError
  of one line that names the file and the fault.
- load_model: build on the meta device, then stream tensors one at a time from the
  safetensors file(s), so memory never holds two copies of the weights.
"""
import math
from dataclasses import replace
from pathlib import Path

import torch

from cli import UserError, read_json
from model import ModelArgs, Transformer


SUPPORTED = ("llama", "qwen2", "mistral", "mixtral", "deepseek_v2", "deepseek_v3", "mistral4")

# mistral4 is DeepSeek's MLA with a router that, set as below, is exactly Mixtral's (softmax over all
# experts, top-k, renormalised); transformers' defaults first, for fields a config.json may leave out
MISTRAL4_AS_MIXTRAL = {"n_shared_experts": (1, 0), "n_group": (1, 1), "topk_group": (1, 1),
                       "norm_topk_prob": (True, True), "routed_scaling_factor": (1.0, 1.0),
                       "first_k_dense_replace": (0, 0)}


def find_checkpoint(path: str | Path) -> Path:
    """The checkpoint folder, given the folder itself or any file inside it."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    folder = path if path.is_dir() else path.parent
    if not (folder / "config.json").is_file():
        where = f"{path} is a file in {folder.absolute()}, which has" if folder != path else f"{folder}: a folder with"
        raise UserError(f"{where} no config.json; expected a Hugging Face checkpoint folder or a file in one")
    return folder


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    cfg = read_json(path)
    if not isinstance(cfg, dict):
        raise UserError(f"{path}: not a JSON object")
    return cfg


_MISSING = object()


def _field(cfg: dict, key: str, kind: type = int, default=_MISSING, minimum: int = 1, where: str = ""):
    """cfg[key], checked: present (unless a default is given) and of the right kind; ints at least
    `minimum`, floats positive and finite. A config written by hand or cut short fails here, in one
    line, by name (`where`: the object it sits in, e.g. rope_scaling)."""
    value = cfg.get(key)
    key = f"{where} {key}" if where else key
    if value is None:
        if default is _MISSING:
            raise UserError(f"config.json has no {key}")
        return default
    ok = {int: isinstance(value, int) and not isinstance(value, bool) and value >= minimum,
          float: isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf,
          bool: isinstance(value, bool), dict: isinstance(value, dict)}[kind]
    if not ok:
        want = {int: f"an integer >= {minimum}", float: "a positive finite number", bool: "true or false", dict: "an object"}[kind]
        raise UserError(f"config.json: {key} is {value!r}, expected {want}")
    return value


ROPE_FIELDS = {"linear": ("factor",),  # what each RoPE scaling needs, every one a positive number
               "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
               "yarn": ("factor",)}
YARN_OPTIONAL = ("original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
                 "attention_factor")  # non-negative numbers where present (null, or 0 but for attention_factor: the default)
MLA_KINDS = ("deepseek_v2", "deepseek_v3", "mistral4")
# other names of a supported architecture: Kimi-K2's config.json is DeepSeek-V3's under its own model_type
ALIASES = {"kimi_k2": "deepseek_v3"}
# a field that DeepSeek's config.json leaves out means what transformers' DeepseekV2Config /
# DeepseekV3Config make it mean (transformers 5), so a short config loads as transformers loads it
DEEPSEEK_DEFAULTS = {
    "deepseek_v2": dict(n_routed_experts=64, n_shared_experts=2, first_k_dense_replace=0, moe_intermediate_size=1407,
                        routed_scaling_factor=1.0, norm_topk_prob=False, topk_method="greedy", q_lora_rank=1536),
    "deepseek_v3": dict(n_routed_experts=256, n_shared_experts=1, first_k_dense_replace=3, moe_intermediate_size=2048,
                        num_experts_per_tok=8, n_group=8, topk_group=4, routed_scaling_factor=2.5,
                        norm_topk_prob=True, q_lora_rank=1536),
}


def model_kind(cfg: dict) -> str | None:
    """config.json's model_type, an alias (ALIASES) read as the architecture it names."""
    kind = cfg.get("model_type")
    return ALIASES.get(kind, kind) if isinstance(kind, str) else kind


def _rope_config(cfg: dict) -> tuple[float, dict | None]:
    # transformers 5 writes "rope_parameters"; older configs write "rope_theta" + "rope_scaling"
    params = _field(cfg, "rope_parameters", dict, {})
    theta = _field(params, "rope_theta", float, None, where="rope_parameters") or _field(cfg, "rope_theta", float, 10000.0)
    scaling = _field(cfg, "rope_scaling", dict, {}) or params
    where = "rope_scaling" if cfg.get("rope_scaling") else "rope_parameters"
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind not in ROPE_FIELDS:
        raise UserError(f"rope type {kind!r} is not supported (supported: default, {', '.join(ROPE_FIELDS)})")
    if kind == "yarn" and model_kind(cfg) not in MLA_KINDS[:2]:
        raise UserError(f"rope type 'yarn' is supported on DeepSeek's MLA checkpoints ({', '.join(MLA_KINDS[:2])}), "
                        f"not on {cfg.get('model_type')!r}")
    for key in ROPE_FIELDS[kind]:
        _field(scaling, key, float, where=where)
    if kind == "llama3" and scaling["low_freq_factor"] >= scaling["high_freq_factor"]:
        raise UserError("config.json: llama3 rope scaling needs low_freq_factor < high_freq_factor")
    if kind == "yarn":
        for key in YARN_OPTIONAL:
            v = scaling.get(key)
            if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < math.inf):
                raise UserError(f"config.json: {where} {key} is {v!r}, expected a non-negative number")
        _field(scaling, "truncate", bool, True, where=where)
        if (scaling.get("beta_fast") or 32) < (scaling.get("beta_slow") or 1):
            raise UserError(f"config.json: {where} beta_fast {scaling.get('beta_fast') or 32} is below beta_slow "
                            f"{scaling.get('beta_slow') or 1}: YaRN interpolates below beta_slow turns and keeps above beta_fast")
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if scaling.get("attention_factor") is None and scaling["factor"] > 1 and bool(m) != bool(m_all) and (m_all or m != 1):
            raise UserError(f"config.json: {where} has mscale {m!r} and mscale_all_dim {m_all!r}: with one of them "
                            "transformers puts 0.1 ln(factor) + 1 on cos and sin, DeepSeek's code mscale(factor, "
                            "mscale) / mscale(factor, mscale_all_dim), so the model is ambiguous; give both, or attention_factor")
        # as transformers: the pretraining context defaults to max_position_embeddings
        scaling = {"original_max_position_embeddings": _field(cfg, "max_position_embeddings", int, 4096), **scaling}
        scaling["original_max_position_embeddings"] = scaling["original_max_position_embeddings"] or \
            _field(cfg, "max_position_embeddings", int, 4096)
    return theta, {**scaling, "rope_type": kind}


def args_from_config(cfg: dict, **overrides) -> ModelArgs:
    """ModelArgs for a config.json (as a dict); UserError naming the first field that is missing,
    of the wrong kind or not supported."""
    kind = model_kind(cfg)
    if kind not in SUPPORTED:
        raise UserError(f"model_type {cfg.get('model_type')!r} is not supported (supported: "
                        f"{', '.join(SUPPORTED + tuple(ALIASES))})")
    if cfg.get("hidden_act", "silu") != "silu":
        raise UserError(f"hidden_act {cfg['hidden_act']!r} is not supported (only silu)")
    theta, scaling = _rope_config(cfg)
    dim, n_heads = _field(cfg, "hidden_size"), _field(cfg, "num_attention_heads")
    # MLA has no KV heads (DeepSeek-V3's config says 128 whatever the heads)
    n_kv_heads = n_heads if kind in MLA_KINDS else _field(cfg, "num_key_value_heads", int, n_heads)
    if n_heads % n_kv_heads:
        raise UserError(f"config.json: num_attention_heads {n_heads} is not a multiple of num_key_value_heads {n_kv_heads}")
    quant = cfg.get("quantization_config")
    if quant is not None and not _fp8_blocks(quant):
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else quant
        raise UserError(f"quantized checkpoints are not supported (quantization_config: quant_method {method!r}; "
                        "FP8 with block scales is): dequantize it to bfloat16 or float16 first, or start from "
                        "the unquantized release")
    a = dict(
        dim=dim, n_layers=_field(cfg, "num_hidden_layers"), vocab_size=_field(cfg, "vocab_size"),
        norm_eps=_field(cfg, "rms_norm_eps", float, 1e-6),
        tie_embeddings=_field(cfg, "tie_word_embeddings", bool, False),
        max_seq_len=_field(cfg, "max_position_embeddings", int, 4096),
        hidden_dim=_field(cfg, "intermediate_size"), n_heads=n_heads, n_kv_heads=n_kv_heads,
        head_dim=_field(cfg, "head_dim", int, dim // n_heads),
        rope_theta=theta, rope_scaling=scaling, extra=cfg,
    )
    if kind == "llama":
        bias = _field(cfg, "attention_bias", bool, False)
        a.update(qkv_bias=bias, o_bias=bias, mlp_bias=_field(cfg, "mlp_bias", bool, False))
    elif kind == "qwen2":
        if cfg.get("use_sliding_window"):
            raise UserError("qwen2 with use_sliding_window is not supported")
        a.update(qkv_bias=True)
    elif kind in ("mistral", "mixtral"):
        a.update(sliding_window=_field(cfg, "sliding_window", int, None))
        if kind == "mixtral":
            a.update(n_experts=_field(cfg, "num_local_experts"), n_experts_per_tok=_field(cfg, "num_experts_per_tok"))
    else:  # MLA: deepseek_v2 / v3, dense or mixture of experts; mistral4 with Mixtral's routing
        if kind == "mistral4":
            _check_mistral4(cfg)
            a.update(n_experts=_field(cfg, "n_routed_experts"), n_experts_per_tok=_field(cfg, "num_experts_per_tok"),
                     hidden_dim=_field(cfg, "moe_intermediate_size"))
        else:  # transformers: layers from first_k_dense_replace on are MoE
            cfg = {**DEEPSEEK_DEFAULTS[kind], **cfg}
            if _field(cfg, "mlp_bias", bool, False) and kind == "deepseek_v2":
                raise UserError("deepseek_v2 with mlp_bias true is not supported (no feed-forward biases here)")
            if _field(cfg, "first_k_dense_replace", int, 0, 0) < a["n_layers"]:
                a.update(_deepseek_moe(cfg, kind))
        bias = _field(cfg, "attention_bias", bool, False)
        a.update(kv_lora_rank=_field(cfg, "kv_lora_rank"), q_lora_rank=_field(cfg, "q_lora_rank", int, 0, 0),
                 qk_nope_head_dim=_field(cfg, "qk_nope_head_dim"), qk_rope_head_dim=_field(cfg, "qk_rope_head_dim"),
                 v_head_dim=_field(cfg, "v_head_dim"), qkv_bias=bias, o_bias=bias, head_dim=cfg["qk_rope_head_dim"])
    a.update(overrides)
    return ModelArgs(**a)


def _deepseek_moe(cfg: dict, kind: str) -> dict:
    """The ModelArgs of DeepSeek-V2's or V3's mixture of experts (Kimi-K2 and Moonlight are V3), or
    UserError naming the routing we do not compute. V2: softmax scores, top-k `greedy` or
    `group_limited_greedy` (a group ranks by its best expert), times routed_scaling_factor, never
    renormalised (transformers ignores norm_topk_prob there, DeepSeek's code renormalises instead
    of scaling: refused). V3: sigmoid scores, the choice biased by e_score_correction_bias among
    the best topk_group of n_group groups (a group ranks by its best two), `noaux_tc`."""
    if not cfg.get("n_routed_experts"):
        raise UserError(f"config.json: n_routed_experts {cfg.get('n_routed_experts')!r} with first_k_dense_replace "
                        f"{cfg.get('first_k_dense_replace', 0)} below num_hidden_layers: transformers builds the later layers "
                        "as mixtures of no experts; a dense model sets first_k_dense_replace to num_hidden_layers")
    if cfg.get("moe_layer_freq", 1) not in (1, None):
        raise UserError(f"{kind} with moe_layer_freq {cfg['moe_layer_freq']!r} is not supported: transformers makes "
                        "every layer from first_k_dense_replace on a mixture of experts, vLLM every moe_layer_freq-th, "
                        "so the model is ambiguous")
    n_experts, k = _field(cfg, "n_routed_experts"), _field(cfg, "num_experts_per_tok")
    n_group, topk_group = _field(cfg, "n_group", int, 1), _field(cfg, "topk_group", int, 1)
    if kind == "deepseek_v2":
        method, score, want_method, group_score = cfg.get("topk_method", "greedy"), "softmax", ("greedy", "group_limited_greedy"), "max"
        if method == "greedy":
            n_group = topk_group = 1
        if _field(cfg, "norm_topk_prob", bool, False):
            raise UserError("deepseek_v2 with norm_topk_prob true is not supported: transformers ignores it and "
                            "DeepSeek's own code renormalises instead of scaling, so the model is ambiguous")
    else:
        method, score, want_method, group_score = cfg.get("topk_method", "noaux_tc"), "sigmoid", ("noaux_tc",), "top2"
        if k == 1 and _field(cfg, "norm_topk_prob", bool, True):
            raise UserError("deepseek_v3 with num_experts_per_tok 1 and norm_topk_prob true is not supported: "
                            "transformers renormalises the one weight to 1, DeepSeek's code leaves it, so the model is ambiguous")
    if method not in want_method:
        raise UserError(f"{kind} with topk_method {method!r} is not supported (supported: {', '.join(want_method)})")
    if cfg.get("scoring_func", score) != score:
        raise UserError(f"{kind} with scoring_func {cfg['scoring_func']!r} is not supported ({kind} routes by {score})")
    if n_experts % n_group or topk_group > n_group or k > n_experts or (group_score == "top2" and n_experts // n_group < 2):
        raise UserError(f"config.json: {n_experts} routed experts in n_group {n_group} groups, topk_group "
                        f"{topk_group}, num_experts_per_tok {k}: not a routing (groups must divide the experts, "
                        "keep at most all groups, and hold enough experts)")
    if k > topk_group * (n_experts // n_group):
        raise UserError(f"config.json: num_experts_per_tok {k} exceeds the {topk_group * (n_experts // n_group)} "
                        f"experts in the topk_group {topk_group} groups kept")
    return dict(n_experts=n_experts, n_experts_per_tok=k, moe_hidden_dim=_field(cfg, "moe_intermediate_size"),
                n_shared_experts=_field(cfg, "n_shared_experts", int, 0, 0),
                first_dense_layers=_field(cfg, "first_k_dense_replace", int, 0, 0),
                router_score=score,
                router_bias=kind == "deepseek_v3", n_group=n_group, topk_group=topk_group, group_score=group_score,
                norm_topk_prob=kind == "deepseek_v3" and _field(cfg, "norm_topk_prob", bool, True),
                routed_scaling_factor=_field(cfg, "routed_scaling_factor", float, 1.0))


def _check_mistral4(cfg: dict):
    """Refuse, in one line, a mistral4 checkpoint whose MoE or attention our Transformer does not compute."""
    bad = [f"{k} {cfg.get(k, default)!r}" for k, (default, want) in MISTRAL4_AS_MIXTRAL.items()
           if cfg.get(k, default) != want]
    rope = cfg.get("rope_parameters")
    if not rope:
        bad.append("no rope_parameters (transformers then uses yarn)")
    elif rope.get("llama_4_scaling_beta"):  # queries scaled by 1 + beta log(1 + floor(pos / original_max))
        bad.append(f"llama_4_scaling_beta {rope['llama_4_scaling_beta']!r}")
    if bad:
        raise UserError(f"mistral4 with {', '.join(bad)} is not supported: only Mixtral's routing "
                        f"({', '.join(f'{k} {want!r}' for k, (_, want) in MISTRAL4_AS_MIXTRAL.items())}, "
                        "llama_4_scaling_beta 0), as convert.py writes")


def rope_interleaved(args: ModelArgs) -> bool:
    """Whether the checkpoint's q_pe / k_pe rows are interleaved pairs (DeepSeek) or halves (HF Llama)."""
    kind = model_kind(args.extra)
    return kind == "deepseek_v2" or (kind in ("deepseek_v3", "mistral4") and args.extra.get("rope_interleave", True))


# ----------------------------------------------------------------------------- writing a config: the inverse

# what convert.py declares for a converted model; args_from_config reads each back to the same ModelArgs

def _mla_fields(args: ModelArgs, dtype: torch.dtype) -> dict:
    """The config fields DeepSeek-V3 and Mistral4 share: the trunk and the MLA attention."""
    src = args.extra
    return {
        "hidden_size": args.dim, "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads, "num_key_value_heads": args.n_heads,
        "kv_lora_rank": args.kv_lora_rank, "q_lora_rank": args.q_lora_rank or None,
        "qk_nope_head_dim": args.qk_nope_head_dim, "qk_rope_head_dim": args.qk_rope_head_dim,
        "v_head_dim": args.v_head_dim, "rope_interleave": True,
        "attention_bias": args.qkv_bias, "rms_norm_eps": args.norm_eps, "hidden_act": "silu",
        "vocab_size": args.vocab_size, "max_position_embeddings": args.max_seq_len,
        "tie_word_embeddings": args.tie_embeddings,
        "bos_token_id": src.get("bos_token_id"), "eos_token_id": src.get("eos_token_id"),
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def deepseek_config(args: ModelArgs, dtype: torch.dtype) -> dict:
    rope = {"rope_theta": args.rope_theta, "rope_type": "default", **(args.rope_scaling or {})}
    return {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", **_mla_fields(args, dtype),
        "intermediate_size": args.hidden_dim, "moe_intermediate_size": args.hidden_dim,
        # every layer dense, in the form each engine reads as dense: transformers and vLLM by
        # first_k_dense_replace, llama.cpp by 0 experts (it requires fewer expert groups than
        # experts, and no groups at all for 0)
        "first_k_dense_replace": args.n_layers, "moe_layer_freq": 1,
        "n_routed_experts": 0, "n_shared_experts": 0, "num_experts_per_tok": None, "n_group": None, "topk_group": None,
        "rope_parameters": rope, "num_nextn_predict_layers": 0,
        # the same RoPE in the names engines built on transformers 4 read (SGLang, older vLLM)
        "rope_theta": args.rope_theta, "rope_scaling": args.rope_scaling or None,
    }


def mistral4_config(args: ModelArgs, dtype: torch.dtype) -> dict:
    """Stock Mistral4 for a converted Mixtral. Its router (softmax over all experts, best of n_group
    groups, top k, renormalised if norm_topk_prob, times routed_scaling_factor) is Mixtral's with
    one group, renormalisation and scaling 1; it always adds a shared expert of n_shared_experts *
    moe_intermediate_size rows, none here. Two things in its attention need care:
    - its "default" RoPE spans all qk_nope + qk_rope dims; the other types honour
      partial_rotary_factor, so a source without scaling gets "linear" with factor 1: plain RoPE.
    - it multiplies queries by 1 + llama_4_scaling_beta * log(1 + floor(pos / original_max_position_embeddings)):
      beta 0 makes that exactly 1. The field must still be a number (transformers logs that linear
      RoPE does not expect it; Mistral4 reads it all the same)."""
    r, head_dim = args.qk_rope_head_dim, args.qk_nope_head_dim + args.qk_rope_head_dim
    rope = {"rope_theta": args.rope_theta, **(args.rope_scaling or {"rope_type": "linear", "factor": 1.0}),
            "partial_rotary_factor": _fraction(r, head_dim), "llama_4_scaling_beta": 0.0}
    rope.setdefault("original_max_position_embeddings", args.max_seq_len)
    return {
        "architectures": ["Mistral4ForCausalLM"], "model_type": "mistral4", **_mla_fields(args, dtype),
        "intermediate_size": args.hidden_dim, "moe_intermediate_size": args.hidden_dim,
        "n_routed_experts": args.n_experts, "num_experts_per_tok": args.n_experts_per_tok,
        "n_shared_experts": 0, "n_group": 1, "topk_group": 1, "norm_topk_prob": True, "routed_scaling_factor": 1.0,
        "first_k_dense_replace": 0, "rope_parameters": rope, "pad_token_id": args.extra.get("pad_token_id"),
    }


def _fraction(part: int, whole: int) -> float:
    """part / whole, nudged up where needed so that int(whole * f) == part, as transformers computes the rotary dim."""
    f = part / whole
    return f if int(whole * f) == part else math.nextafter(f, 1.0)


def mla_config(args: ModelArgs, dtype: torch.dtype, settings: dict) -> dict:
    """The config.json of a converted model: stock DeepSeek-V3, or Mistral4 for a mixture of experts;
    `settings`, what the conversion did, under "transmla"."""
    return {**(mistral4_config if args.n_experts else deepseek_config)(args, dtype), "transmla": settings}


# ----------------------------------------------------------------------------- names

# our module path -> Hugging Face module path, inside a layer (model.layers.{i}.) and outside it
HF_NAMES = {
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "attention.wq_a": "self_attn.q_a_proj",
    "attention.q_norm": "self_attn.q_a_layernorm",
    "attention.wq_b": "self_attn.q_b_proj",
    "attention.wkv_a": "self_attn.kv_a_proj_with_mqa",
    "attention.kv_norm": "self_attn.kv_a_layernorm",
    "attention.wkv_b": "self_attn.kv_b_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj",
    "feed_forward.gate": "block_sparse_moe.gate",  # Mixtral router
    "feed_forward.experts": "block_sparse_moe.experts",  # + .{e}.w1 / w2 / w3, kept as is
}
TOP_NAMES = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}
# mistral4 keeps the MoE under mlp., like DeepSeek: the router is mlp.gate, and the experts ...
MISTRAL4_NAMES = {**HF_NAMES, "feed_forward.gate": "mlp.gate", "feed_forward.experts": "mlp.experts"}
# ... are stacked per layer into 3-D tensors, rows in this order (expert e's weights are rows
# e * M ... (e + 1) * M of the tensor seen as 2-D, so one expert is one contiguous read):
#   mlp.experts.gate_up_proj (E, 2 * hidden, dim): [w1 ; w3] of expert 0, of expert 1, ...
#   mlp.experts.down_proj    (E, dim, hidden):      w2 of expert 0, of expert 1, ...
# The names mlp.experts.{e}.w1.weight that hf_name gives are therefore not on disk: CheckpointReader
# presents each expert's block of the stacked tensor under it, CheckpointWriter.add_layer stacks.
STACKED_EXPERTS = {"gate_up_proj": ("w1", "w3"), "down_proj": ("w2",)}
# DeepSeek-V2/V3: the router mlp.gate (weight, and V3's e_score_correction_bias), the shared experts
# as one SwiGLU, and each routed expert under Llama's names: mlp.experts.{e}.gate_proj / up_proj / down_proj
DEEPSEEK_NAMES = {**HF_NAMES, "feed_forward.gate": "mlp.gate", "feed_forward.experts": "mlp.experts",
                  **{f"feed_forward.shared.{w}": f"mlp.shared_experts.{p}"
                     for w, p in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj"))}}
SWIGLU_NAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def hf_name(ours: str, kind: str | None = None) -> str:
    """The Hugging Face name of one of our parameters in a checkpoint of model_type `kind`."""
    if not ours.startswith("layers."):
        module, param = ours.rsplit(".", 1)
        return f"{TOP_NAMES[module]}.{param}"
    _, i, rest = ours.split(".", 2)
    kind = ALIASES.get(kind, kind)
    names = {"mistral4": MISTRAL4_NAMES, "deepseek_v2": DEEPSEEK_NAMES, "deepseek_v3": DEEPSEEK_NAMES}.get(kind, HF_NAMES)
    if names is DEEPSEEK_NAMES and rest.startswith("feed_forward.experts."):
        _, _, e, w, param = rest.split(".")  # feed_forward.experts.{e}.w1.weight
        return f"model.layers.{i}.mlp.experts.{e}.{SWIGLU_NAMES[w]}.{param}"
    for mine, theirs in names.items():
        if rest.startswith(mine + "."):
            return f"model.layers.{i}.{theirs}{rest[len(mine):]}"
    raise KeyError(ours)


def checkpoint_tensors(args: ModelArgs) -> dict[str, tuple[str, tuple]]:
    """Every tensor a checkpoint with these args holds: our name -> (Hugging Face name, shape).
    mistral4's experts appear under their per-expert names, as CheckpointReader presents them."""
    with torch.device("meta"):
        model = Transformer(args)
    kind = model_kind(args.extra)
    return {k: (hf_name(k, kind), tuple(v.shape)) for k, v in model.state_dict().items()}


def rope_rows(args: ModelArgs, ours: str) -> torch.Tensor | None:
    """For a DeepSeek tensor whose rows include rotary pairs, the row permutation that takes the
    checkpoint's interleaved pairs to our rotate_half layout; None for every other tensor."""
    if not (args.is_mla and rope_interleaved(args)):
        return None
    r = args.qk_rope_head_dim
    if ours.endswith(("attention.wq.weight", "attention.wq_b.weight")):
        n_groups, group, offset = args.n_heads, args.qk_nope_head_dim + r, args.qk_nope_head_dim
    elif ours.endswith(("attention.wkv_a.weight", "attention.wkv_a.bias")):
        n_groups, group, offset = 1, args.kv_lora_rank + r, args.kv_lora_rank
    else:
        return None
    perm = torch.arange(n_groups * group).view(n_groups, group)
    rope = perm[:, offset:]
    perm[:, offset:] = torch.cat([rope[:, 0::2], rope[:, 1::2]], dim=1)  # evens first, then odds
    return perm.flatten()


# ----------------------------------------------------------------------------- loading

# every dtype the safetensors format defines, with its size in bits; the header is checked against these
SAFETENSORS_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8,
                    "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
                    "I64": 64, "U64": 64, "F64": 64, "C64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}
# ... and the ones a weight may be stored in here (FP8 only beside its block scales, see _fp8_blocks)
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
FP8 = ("F8_E4M3", "F8_E5M2")
INDEX = "model.safetensors.index.json"


def _fp8_blocks(quant) -> tuple[int, int] | None:
    """The weight block of a quantization_config we dequantize: FP8 with one float32 scale per block
    of weight, stored as `{weight}_scale_inv` (DeepSeek-V3, Kimi-K2, Qwen3-FP8: quant_method "fp8",
    weight_block_size [128, 128]); None for every other quantization."""
    if not isinstance(quant, dict) or quant.get("quant_method") != "fp8":
        return None
    block = quant.get("weight_block_size")
    if (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)
            and quant.get("fmt", "e4m3") in ("e4m3", "e5m2")):
        return block[0], block[1]
    return None


class SafetensorsFile:
    """One .safetensors file, read one tensor at a time with plain reads. (safetensors' own
    safe_open maps the whole file: every tensor read stays resident and counts as memory, which
    hides whether a conversion really streams.) Format: 8-byte little-endian header length, a
    JSON header {name: {dtype, shape, data_offsets}}, then the raw little-endian data.

    The header is checked whole when the file is opened, as the safetensors library checks it:
    a JSON object whose every entry has a known dtype, a shape of non-negative integers and
    offsets [begin, end) with end - begin = elements x dtype size, the tensors tiling the data
    exactly (no overlap, no gap, nothing past the end of the file). UserError names the fault."""

    def __init__(self, path: Path):
        self.path = path
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                if size < 8 or not 2 <= n <= size - 8:
                    raise UserError(f"{path}: not a safetensors file, or cut short ({size} bytes; "
                                    f"its first 8 bytes give a header of {n} bytes)")
                raw = f.read(n)
        except OSError as e:
            raise UserError(f"{path}: cannot read it ({e.strerror})") from None
        header = read_json(path, raw)
        if not isinstance(header, dict):
            raise UserError(f"{path}: the safetensors header is not a JSON object")
        header.pop("__metadata__", None)
        self.start, self.entries = 8 + n, header
        spans = sorted((self._check(name, e), name) for name, e in header.items())
        at = 0
        for (begin, end), name in spans:
            if begin != at:
                what = "overlaps the tensor before it" if begin < at else f"leaves bytes {at}-{begin} unused"
                raise UserError(f"{path}: tensor {name} {what} (data_offsets {[begin, end]}): a damaged header")
            at = end
        if self.start + at != size:
            problem = (f"truncated: {size} bytes, its header describes {self.start + at}" if self.start + at > size
                       else f"{size - self.start - at} bytes after the last tensor")
            raise UserError(f"{path}: {problem} (an interrupted download or copy?)")

    def _check(self, name: str, e) -> tuple[int, int]:
        """One header entry's [begin, end), once its dtype, shape and size are checked."""
        def bad(why):
            return UserError(f"{self.path}: tensor {name!r} in the header: {why}")
        if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= e.keys():
            raise bad("not an object with dtype, shape and data_offsets")
        dtype, shape, offsets = e["dtype"], e["shape"], e["data_offsets"]
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_BITS:
            raise bad(f"unknown dtype {dtype!r}")
        if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise bad(f"shape {shape!r} is not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets) and 0 <= offsets[0] <= offsets[1]):
            raise bad(f"data_offsets {offsets!r} is not [begin, end]")
        bits = math.prod(shape) * SAFETENSORS_BITS[dtype]  # Python integers: no overflow, whatever the header says
        if bits != 8 * (offsets[1] - offsets[0]):
            short = lambda x: str(x) if len(str(x)) <= 40 else str(x)[:37] + "..."  # noqa: E731
            raise bad(f"data_offsets {short(offsets)} give {short(offsets[1] - offsets[0])} bytes, shape "
                      f"{short(shape)} of {dtype} needs {short(bits // 8)}")
        return offsets[0], offsets[1]

    def shape(self, name: str) -> tuple:
        return tuple(self.entries[name]["shape"])

    def dtype(self, name: str) -> str:
        return self.entries[name]["dtype"]

    def get(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor, or only rows [first, first + n) of it seen as 2-D (n, last dim): one contiguous read."""
        e = self.entries[name]
        dtype = SAFETENSORS_DTYPES[e["dtype"]]
        begin, end = e["data_offsets"]
        shape = e["shape"]
        if rows is not None:
            first, n = rows
            row_bytes = shape[-1] * dtype.itemsize
            begin, end, shape = begin + first * row_bytes, begin + (first + n) * row_bytes, [n, shape[-1]]
        buf = torch.empty(end - begin, dtype=torch.uint8, device="cpu")  # read from disk: always the CPU
        with open(self.path, "rb") as f:
            f.seek(self.start + begin)
            if f.readinto(buf.numpy()) != end - begin:
                raise UserError(f"{self.path}: cut short while reading {name} (the file changed while in use?)")
        return buf.view(dtype).reshape(shape)


class CheckpointReader:
    """Every tensor of a checkpoint, single-file or sharded; a tensor is read when asked for.

    Opening it checks everything that can be checked without reading a tensor: config.json
    (args_from_config), the index (well-formed; every shard it names on disk; every tensor in
    the shard it names), every shard's header (SafetensorsFile), the dtypes. check() then holds
    the tensors against what the config declares."""

    def __init__(self, path: str | Path, **overrides):
        self.folder = folder = find_checkpoint(path)
        config = read_config(folder)
        try:
            self.args = args_from_config(config, **overrides)
        except UserError as e:
            raise UserError(f"{folder}: {e}") from None
        self.fp8_block = _fp8_blocks(config.get("quantization_config"))
        if (folder / INDEX).is_file():
            weight_map = self._read_index(folder / INDEX)
        elif (folder / "model.safetensors").is_file():
            weight_map = None
        else:
            bins = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
            raise UserError(f"{folder}: no model.safetensors or {INDEX}" + (
                f" ({bins[0]} is a pickle checkpoint: save it as safetensors first, e.g. with transformers' "
                "save_pretrained)" if bins else ""))
        names = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
        self.files = {name: SafetensorsFile(folder / name) for name in names}
        if weight_map is None:
            weight_map = {k: "model.safetensors" for k in self.files["model.safetensors"].entries}
        for tensor, shard in weight_map.items():
            if tensor not in self.files[shard].entries:
                raise UserError(f"{folder / INDEX}: lists {tensor} under {shard}, which does not hold it "
                                "(a stale index?)")
        self.weight_map = weight_map
        self._check_dtypes()
        self.blocks = {}  # expert weight -> (stacked tensor, (first row, rows)), for mistral4
        if model_kind(self.args.extra) == "mistral4":
            self._unstack_experts()
        self._untie_a_trained_head()

    def _untie_a_trained_head(self):
        """A config that says tie_word_embeddings while the files also hold an lm_head.weight of other
        values (a head trained apart after the tie, as fine-tuning and quantization tools write it):
        the logits come from that head, as transformers (5.x) and vLLM compute them; a head equal to
        the embeddings changes nothing. Reads the two tensors only in that rare case."""
        head, emb = hf_name("output.weight"), hf_name("tok_embeddings.weight")
        if (self.args.tie_embeddings and head in self.weight_map and emb in self.weight_map
                and self.shape(head) == self.shape(emb) and not torch.equal(self.get(head), self.get(emb))):
            self.args = replace(self.args, tie_embeddings=False)

    @staticmethod
    def _read_index(path: Path) -> dict[str, str]:
        """The index's weight_map (tensor -> shard file), every shard it names checked to be on disk."""
        index = read_json(path)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not (isinstance(weight_map, dict) and weight_map
                and all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items())):
            raise UserError(f"{path}: no weight_map of tensor names to shard files")
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            if Path(shard).name != shard or not shard.endswith(".safetensors"):
                raise UserError(f"{path}: names shard {shard!r}, not a .safetensors file in this folder")
        missing = [s for s in shards if not (path.parent / s).is_file()]
        if missing:
            raise UserError(f"{path}: names {missing[0]}, which is not in {path.parent} ({len(missing)} of "
                            f"{len(shards)} shards missing: an interrupted download?)")
        return weight_map

    def _check_dtypes(self):
        """Every tensor in a dtype we read: a float, or FP8 beside its block scales."""
        for name, shard in self.weight_map.items():
            dtype = self.files[shard].dtype(name)
            if dtype in SAFETENSORS_DTYPES and (dtype not in FP8 or self.fp8_block):
                continue
            hint = ("FP8 without a quantization_config of quant_method 'fp8' and weight_block_size"
                    if dtype in FP8 else "not a weight dtype we read (F32, F16, BF16, F64)")
            raise UserError(f"{self.folder / shard}: tensor {name} is stored as {dtype}, {hint}: a quantized "
                            "checkpoint? dequantize it to bfloat16 or float16 first")

    def _unstack_experts(self):
        """List each expert's w1 / w3 / w2 (STACKED_EXPERTS) as a tensor of its own: rows of the stack."""
        for name in [k for k in self.weight_map if k.rsplit(".", 1)[-1] in STACKED_EXPERTS]:
            prefix, stacked = name.rsplit(".", 1)  # model.layers.{i}.mlp.experts, gate_up_proj
            parts = STACKED_EXPERTS[stacked]
            shape = self.shape(name)
            if len(shape) != 3 or shape[1] % len(parts) or self.files[self.weight_map[name]].dtype(name) in FP8:
                raise UserError(f"{self.folder}: stacked experts {name} of shape {list(shape)}: expected "
                                f"(experts, {len(parts)} x rows, columns) in a float dtype")
            n_experts, m, _ = shape  # m rows per expert, n per weight
            n = m // len(parts)
            for e in range(n_experts):
                for j, w in enumerate(parts):
                    self.blocks[f"{prefix}.{e}.{w}.weight"] = name, (e * m + j * n, n)
                    self.weight_map[f"{prefix}.{e}.{w}.weight"] = self.weight_map[name]
            del self.weight_map[name]

    def shape(self, name: str) -> tuple:
        file = self.files[self.weight_map[name]]
        if name in self.blocks:
            stacked, (_, n) = self.blocks[name]
            return n, file.shape(stacked)[-1]
        return file.shape(name)

    def stored_dtype(self) -> torch.dtype:
        """The dtype the checkpoint stores its weights in (its embeddings'), bfloat16 for FP8: what its
        dequantized weights are written in, as transformers dequantizes them."""
        emb = hf_name("tok_embeddings.weight")
        dtype = self.files[self.weight_map[emb]].dtype(emb)
        return torch.bfloat16 if dtype in FP8 else SAFETENSORS_DTYPES[dtype]

    def _expect(self, theirs: str, shape: tuple):
        """UserError unless tensor `theirs` is in the checkpoint with `shape`."""
        if theirs not in self.weight_map:
            raise UserError(f"{self.folder}: tensor {theirs} is missing (config.json says model_type "
                            f"{self.args.extra['model_type']!r}, {self.args.n_layers} layers)")
        if self.shape(theirs) != shape:
            raise UserError(f"{self.folder}: tensor {theirs} has shape {list(self.shape(theirs))}, "
                            f"config.json implies {list(shape)}")

    def check(self):
        """Hold the tensors against what config.json declares (checkpoint_tensors), before any is read:
        each declared one present with its shape, and every one on disk accounted for (FP8 scales
        with their weights; tensors no model uses, such as DeepSeek-V3's multi-token-prediction
        layers, set aside by _ignorable)."""
        used = set()
        for theirs, shape in checkpoint_tensors(self.args).values():
            self._expect(theirs, shape)
            used.add(theirs)
            scale = self._scale_name(theirs)
            if scale:
                self._check_scale(theirs, scale)
                used.add(scale)
        unused = [k for k in self.weight_map if k not in used and not _ignorable(k, self.shape(k), self.args)]
        if unused:
            raise UserError(f"{self.folder}: tensors that config.json does not account for, e.g. {unused[0]} "
                            f"({len(unused)} in all)")

    def _scale_name(self, name: str) -> str | None:
        """The block scales of an FP8 weight; None for a weight stored as it is."""
        if name in self.blocks or self.files[self.weight_map[name]].dtype(name) not in FP8:
            return None
        scale = f"{name}_scale_inv"
        if scale not in self.weight_map:
            raise UserError(f"{self.folder}: FP8 tensor {name} has no {scale} beside it")
        return scale

    def _check_scale(self, name: str, scale: str):
        (bm, bn), shape = self.fp8_block, self.shape(name)
        want = (-(-shape[0] // bm), -(-shape[1] // bn)) if len(shape) == 2 else None
        if self.shape(scale) != want or self.files[self.weight_map[scale]].dtype(scale) not in ("F32", "BF16", "F16"):
            raise UserError(f"{self.folder}: {scale} has shape {list(self.shape(scale))}; weight_block_size "
                            f"{[bm, bn]} on {name} {list(shape)} needs a float {list(want or ())}")

    def get(self, name: str) -> torch.Tensor:
        """One tensor as stored; FP8 weights dequantized to float32 (each block times its scale)."""
        file = self.files[self.weight_map[name]]
        if name in self.blocks:
            return file.get(*self.blocks[name])
        t = file.get(name)
        scale = self._scale_name(name)
        if scale is None:
            return t
        self._check_scale(name, scale)
        s = self.get(scale).float()
        bm, bn = self.fp8_block
        s = s.repeat_interleave(bm, 0)[: t.shape[0]].repeat_interleave(bn, 1)[:, : t.shape[1]]  # one per weight
        return t.float() * s

    def fill(self, module: torch.nn.Module, prefix: str = "", device="cpu", dtype=torch.float32):
        """Load every parameter of `module` (built on the meta device; its names are ours, under
        `prefix` in the whole model) from the checkpoint, shapes checked."""
        state = {}
        for ours, meta in module.state_dict().items():
            theirs = hf_name(prefix + ours, model_kind(self.args.extra))
            self._expect(theirs, tuple(meta.shape))
            t = self.get(theirs)
            perm = rope_rows(self.args, prefix + ours)
            state[ours] = (t if perm is None else t[perm]).to(device=device, dtype=float32_or(ours, dtype))
        module.load_state_dict(state, strict=True, assign=True)


def float32_or(ours: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype a parameter is written in: DeepSeek-V3's e_score_correction_bias stays float32 (as
    DeepSeek ships it and transformers keeps it), since in bfloat16 its small differences between
    experts, which decide the routing, round away; every other parameter `dtype`."""
    return torch.float32 if ours.endswith("e_score_correction_bias") else dtype


def load_model(path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32,
               **overrides) -> tuple[Transformer, Path]:
    """Load a Hugging Face checkpoint folder (or any file in it) into our Transformer. Every check
    (CheckpointReader, check()) runs before the first tensor is read; UserError names what is wrong."""
    reader = CheckpointReader(path, **overrides)
    args = reader.args
    reader.check()
    with torch.device("meta"):
        model = Transformer(args)
    reader.fill(model, device=device, dtype=dtype)
    model.set_rope(device=device)
    return model.eval(), reader.folder


def _ignorable(name: str, shape: tuple, args: ModelArgs) -> bool:
    if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and args.tie_embeddings):
        return True
    if ".mlp.shared_experts." in name and model_kind(args.extra) in MLA_KINDS and 0 in shape:
        return True  # n_shared_experts 0: transformers still writes them, of 0 rows
    # DeepSeek-V3 ships its multi-token-prediction layers after the last layer: not used for generation
    parts = name.split(".")
    mtp = args.extra.get("num_nextn_predict_layers") or 0
    return (name.startswith("model.layers.") and parts[2].isdigit()
            and args.n_layers <= int(parts[2]) < args.n_layers + mtp)
