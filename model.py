"""The model: one Transformer that runs both grouped-query attention (GQA: Llama, Qwen2,
Mistral, Mixtral) and multi-head latent attention (MLA: DeepSeek-V2/V3, and what convert.py
writes), with preallocated KV caches.

What is in here, top to bottom:
- ModelArgs: every shape, grouped by what it configures. `kv_lora_rank > 0` means MLA.
- RMSNorm, RoPE helpers (one internal layout: rotate_half, converted at the checkpoint boundary
  in checkpoint.py; linear, Llama-3 and YaRN scaling), FeedForward (SwiGLU), Router and MoE
  (Mixtral's and DeepSeek-V2/V3's mixtures of experts, dispatched grouped by expert).
- KVCache (GQA: per-KV-head keys and values) and LatentCache (MLA: the latent c and the shared
  rope key k_pe, nothing per head).
- Attention (GQA) and MLA with its two paths: naive (expand the latent into per-head K/V,
  good for prefill) and absorbed (fold the up-projections into the query and the output, so
  a decode step reads only R + r values per cached token: `absorbed_attention`, which TPLA's
  decode calls too, on its slice of the latent).
- Block and Transformer; `Transformer.forward(tokens, input_pos)` gives logits at every position;
  attention_mask, the causal (and sliding-window) mask of any query and key positions.

Loading Hugging Face checkpoints lives in checkpoint.py; this file knows nothing of file formats.
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ModelArgs:
    # the trunk
    dim: int = 576
    n_layers: int = 30
    vocab_size: int = 49152
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    max_seq_len: int = 8192  # the longest context the checkpoint was trained for (RoPE table size)
    # feed-forward (SwiGLU); n_experts > 0 makes layers a mixture of experts (Mixtral, DeepSeek, MoE)
    hidden_dim: int = 1536  # a dense layer's hidden size
    mlp_bias: bool = False
    n_experts: int = 0  # routed experts
    n_experts_per_tok: int = 0  # k: the experts each token is routed to
    moe_hidden_dim: int = 0  # one routed expert's hidden size (0: hidden_dim)
    n_shared_experts: int = 0  # DeepSeek: experts every token passes through, one SwiGLU n x moe_hidden_dim wide
    first_dense_layers: int = 0  # DeepSeek first_k_dense_replace: the layers before it are dense, the rest MoE
    # the router (see Router): Mixtral's is the defaults; DeepSeek-V2 adds groups and a scaling
    # factor; DeepSeek-V3 (Kimi-K2, Moonlight) scores with a sigmoid and biases the choice
    router_score: str = "softmax"  # or "sigmoid"
    router_bias: bool = False  # DeepSeek-V3's e_score_correction_bias
    n_group: int = 1  # experts in n_group groups; a token picks among the best topk_group groups' ...
    topk_group: int = 1
    group_score: str = "max"  # ... ranked by their best score (V2) or "top2", their best two summed (V3)
    norm_topk_prob: bool = True  # the k weights renormalised to sum 1
    routed_scaling_factor: float = 1.0  # then multiplied by this
    # attention, Llama names (GQA)
    n_heads: int = 9
    n_kv_heads: int = 3
    head_dim: int = 64
    qkv_bias: bool = False  # Qwen2; for MLA: bias on q_a_proj and kv_a_proj_with_mqa
    o_bias: bool = False
    sliding_window: int | None = None  # Mistral: attend to at most this many past tokens
    # rotary embedding
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3" | "linear" | "yarn", ...} or None
    # MLA, DeepSeek names; kv_lora_rank > 0 switches every layer to MLA
    kv_lora_rank: int = 0  # R: latent values cached per token
    q_lora_rank: int = 0  # 0: full-rank query
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0  # r: the shared rope key cached per token
    v_head_dim: int = 0
    latent_norm_eps: float = 1e-6  # stock DeepSeek fixes the eps of kv_a_layernorm / q_a_layernorm
    # conversion only (convert.py's intermediate, exactly equivalent models): k_pe pair m rotates at
    # frequency number rope_pairs[m] of a head_dim RoPE instead of frequency m of a rope_dim RoPE
    rope_pairs: list[int] | None = None
    # which MLA path: "naive", "absorb", or "auto" (naive for multi-token prefill, absorbed for decode)
    mla_impl: str = "auto"
    extra: dict = field(default_factory=dict, repr=False)  # config fields kept for writing back

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    def is_moe(self, layer: int) -> bool:
        """Whether layer `layer` has a mixture of experts (DeepSeek's rule; Mixtral's: every layer)."""
        return self.n_experts > 0 and layer >= self.first_dense_layers

    @property
    def rope_dim(self) -> int:
        return self.qk_rope_head_dim if self.is_mla else self.head_dim


# ----------------------------------------------------------------------------- small pieces

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in float32 whatever the model dtype (bf16 squares overflow their precision)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_frequencies(dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """Inverse frequencies of the dim // 2 rotary pairs, float32 as every reference computes them."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        # Llama-3.1: leave high frequencies alone, divide low ones by `factor`, blend in between
        factor, old_len = scaling["factor"], scaling["original_max_position_embeddings"]
        lo, hi = scaling["low_freq_factor"], scaling["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
        inv_freq = torch.where(medium, blended, scaled)
    elif kind == "yarn":
        inv_freq = yarn_frequencies(inv_freq, dim, theta, scaling)
    elif kind != "default":
        raise ValueError(f"unsupported rope_type {kind!r}")
    return inv_freq


def yarn_frequencies(inv_freq: torch.Tensor, dim: int, theta: float, scaling: dict) -> torch.Tensor:
    """YaRN (Peng et al. 2023, arXiv 2309.00071, section 3.2, "NTK-by-parts"), as DeepSeek-V2/V3
    and transformers compute it: a pair that turns fewer than beta_slow times over the original
    context is interpolated (divided by `factor`), one that turns more than beta_fast times is
    left alone, and the pairs in between blend linearly, by pair index. Pair i turns
    L / (2 pi theta^(2i/dim)) times over L = original_max_position_embeddings, so the pair that
    turns b times is i(b) = dim ln(L / (2 pi b)) / (2 ln theta), rounded outward (`truncate`)."""
    factor, old_len = scaling["factor"], scaling["original_max_position_embeddings"]
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def pair_turning(turns):
        return dim * math.log(old_len / (turns * 2 * math.pi)) / (2 * math.log(theta))
    lo, hi = pair_turning(beta_fast), pair_turning(beta_slow)
    if scaling.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - lo) / max(hi - lo, 1e-3)).clamp(0, 1)  # 0: kept, 1: interpolated
    return inv_freq / factor * ramp + inv_freq * (1 - ramp)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature: 0.1 mscale ln(factor) + 1 (1 for factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_attention_factor(scaling: dict | None) -> float:
    """The gain YaRN puts on cos and sin (so on the rope part of every score, squared):
    `attention_factor` if given, else mscale(factor, mscale) / mscale(factor, mscale_all_dim) when
    both are set (DeepSeek: 1 when they are equal), else mscale(factor). 1 for other RoPEs."""
    if (scaling or {}).get("rope_type") != "yarn":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor, m, m_all = scaling["factor"], scaling.get("mscale"), scaling.get("mscale_all_dim")
    return yarn_mscale(factor, m) / yarn_mscale(factor, m_all) if m and m_all else yarn_mscale(factor)


def softmax_scale_factor(scaling: dict | None) -> float:
    """DeepSeek's correction of the softmax scale under YaRN: x mscale(factor, mscale_all_dim)^2 on
    every score (the nope part too), when mscale_all_dim is set. 1 otherwise."""
    if (scaling or {}).get("rope_type", "default") == "default" or not scaling.get("mscale_all_dim"):
        return 1.0
    return yarn_mscale(scaling["factor"], scaling["mscale_all_dim"]) ** 2


def model_rope(a: "ModelArgs", n_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The cos / sin tables (n_pos, rope_dim / 2) a model of config `a` rotates with: its frequencies
    (the pairs rope_pairs of a head_dim RoPE, for convert.py's intermediate models), times YaRN's
    gain where it has one."""
    if a.rope_pairs is None:
        inv_freq = rope_frequencies(a.rope_dim, a.rope_theta, a.rope_scaling)
    else:
        inv_freq = rope_frequencies(a.head_dim, a.rope_theta, a.rope_scaling)[torch.tensor(a.rope_pairs)]
    cos, sin = rope_table(inv_freq, n_pos)
    gain = rope_attention_factor(a.rope_scaling)  # YaRN's temperature, on cos and sin
    return cos * gain, sin * gain


def rope_table(inv_freq: torch.Tensor, n_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
    angles = torch.outer(torch.arange(n_pos, dtype=torch.float32, device=inv_freq.device), inv_freq)  # (n_pos, dim/2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, T, H, D) in the rotate_half layout: dims (i, i + D/2) form pair i.
    cos, sin: (T, D/2) for the positions of x."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)  # (T, 1, D/2)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, bias: bool = False):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=bias)  # gate
        self.w3 = nn.Linear(dim, hidden_dim, bias=bias)  # up
        self.w2 = nn.Linear(hidden_dim, dim, bias=bias)  # down

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Router(nn.Module):
    """Which k experts each token goes to, and with what weights (float32, whatever the model dtype).

    scores = softmax(W x) (Mixtral, DeepSeek-V2) or sigmoid(W x) (DeepSeek-V3). The choice: the
    top k of scores + e_score_correction_bias (V3: a bias balancing the experts' load, for the
    choice only), among the experts of the best topk_group of n_group groups (V2: a group ranks
    by its best expert; V3: by its best two summed). The weights: the chosen experts' unbiased
    scores, renormalised to sum 1 if norm_topk_prob, times routed_scaling_factor."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.k, self.score, self.norm, self.gain = (args.n_experts_per_tok, args.router_score, args.norm_topk_prob,
                                                    args.routed_scaling_factor)
        self.n_group, self.topk_group, self.group_score = args.n_group, args.topk_group, args.group_score
        self.weight = nn.Linear(args.dim, args.n_experts, bias=False).weight  # (n_experts, D)
        if args.router_bias:
            self.register_buffer("e_score_correction_bias", torch.zeros(args.n_experts))
        else:
            self.e_score_correction_bias = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, D) -> weights (N, k) float32, experts (N, k) int64."""
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.softmax(-1) if self.score == "softmax" else logits.sigmoid()
        choice = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias.float()
        if self.n_group > 1:
            groups = choice.view(len(x), self.n_group, -1)
            rank = groups.amax(-1) if self.group_score == "max" else groups.topk(2, -1).values.sum(-1)  # (N, n_group)
            kept = torch.zeros_like(rank, dtype=torch.bool).scatter_(1, rank.topk(self.topk_group, -1).indices, True)
            choice = choice.masked_fill(~kept.repeat_interleave(groups.shape[-1], 1), float("-inf"))
        experts = choice.topk(self.k, -1).indices
        weights = scores.gather(1, experts)
        if self.norm:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * self.gain, experts


class MoE(nn.Module):
    """A mixture of experts: each token through its k routed experts (SwiGLUs), weighted by the
    Router, plus DeepSeek's shared experts, which every token passes through.

    experts: the routed experts this module holds (default: all). Under expert parallelism each
    rank holds a range of them and its forward returns only their part of the sum; tpla.py adds
    the ranks' parts. The names stay global (experts.{e}.w1...), so loading is unchanged."""

    def __init__(self, args: ModelArgs, experts: range | None = None):
        super().__init__()
        self.n_experts = args.n_experts
        hidden = args.moe_hidden_dim or args.hidden_dim
        self.gate = Router(args)
        self.experts = nn.ModuleDict({str(e): FeedForward(args.dim, hidden)
                                      for e in (experts if experts is not None else range(args.n_experts))})
        self.shared = FeedForward(args.dim, args.n_shared_experts * hidden) if args.n_shared_experts else None

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, D)
        weights, experts = self.gate(x)  # (N, k)
        # dispatch grouped by expert: sort the N k (token, expert) pairs by expert, then each expert
        # runs once, on its contiguous run of pairs
        pairs = experts.flatten().argsort(stable=True)
        ends = experts.flatten().bincount(minlength=self.n_experts).cumsum(0).tolist()
        out = torch.zeros_like(x)
        for e, expert in self.experts.items():
            e = int(e)
            run = pairs[(ends[e - 1] if e else 0): ends[e]]
            if len(run):
                token = run // experts.shape[1]
                y = expert(x[token]) * weights.flatten()[run, None]
                out.index_add_(0, token, y.to(x.dtype))
        if self.shared is not None:
            out = out + self.shared(x)
        return out.view(shape)


# ----------------------------------------------------------------------------- caches

class KVCache(nn.Module):
    """GQA cache: keys and values of every KV head, 2 * n_kv_heads * head_dim values per token."""

    def __init__(self, batch: int, seq_len: int, n_kv_heads: int, head_dim: int, dtype, device=None):
        super().__init__()
        shape = (batch, n_kv_heads, seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        # index_copy_ with a position tensor keeps the compiled decode step shape-static
        self.k[: k.shape[0]].index_copy_(2, input_pos, k)
        self.v[: v.shape[0]].index_copy_(2, input_pos, v)
        return self.k[: k.shape[0]], self.v[: v.shape[0]]


class LatentCache(nn.Module):
    """MLA cache: per token the normed latent c (R values) and the roped shared key k_pe (r values),
    side by side in one buffer kv = [c ; k_pe], so absorbed attention scores read it in one matmul."""

    def __init__(self, batch: int, seq_len: int, kv_lora_rank: int, rope_dim: int, dtype, device=None):
        super().__init__()
        self.R = kv_lora_rank
        self.register_buffer("kv", torch.zeros(batch, seq_len, kv_lora_rank + rope_dim, dtype=dtype, device=device),
                             persistent=False)

    def update(self, input_pos: torch.Tensor, c: torch.Tensor, k_pe: torch.Tensor) -> torch.Tensor:
        kv = self.kv[: c.shape[0]]
        kv.index_copy_(1, input_pos, torch.cat([c, k_pe], dim=-1))
        return kv  # (B, S, R + r)


# ----------------------------------------------------------------------------- attention

class Attention(nn.Module):
    """Grouped-query attention: n_heads queries share n_kv_heads keys and values."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=args.qkv_bias)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=args.o_bias)
        self.cache: KVCache | None = None

    def kv_values_per_token(self) -> int:
        return 2 * self.n_kv_heads * self.head_dim

    def make_cache(self, batch: int, seq_len: int, dtype, device) -> KVCache:
        return KVCache(batch, seq_len, self.n_kv_heads, self.head_dim, dtype, device)

    def forward(self, x, cos, sin, mask, input_pos=None):
        B, T, _ = x.shape
        n_kv, G = self.n_kv_heads, self.n_heads // self.n_kv_heads
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, n_kv, self.head_dim)
        v = self.wv(x).view(B, T, n_kv, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, n_kv, T, D)
        if self.cache is not None:
            k, v = self.cache.update(input_pos, k, v)  # (B, n_kv, S, D): the whole cache, masked below
        # the G query heads of a KV head become G * T query rows against that head's keys, so each
        # key and value is read once per KV head (not once per query head, nor copied G times)
        q = q.view(B, T, n_kv, G, self.head_dim).permute(0, 2, 3, 1, 4).reshape(B, n_kv, G * T, -1)
        if mask is not None:
            mask = mask.repeat(G, 1)  # (G * T, S)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.head_dim ** -0.5)
        y = y.view(B, n_kv, G, T, self.head_dim).permute(0, 3, 1, 2, 4)  # (B, T, n_kv, G, D)
        return self.wo(y.reshape(B, T, -1))


def absorbed_attention(q_nope: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor, w_uk: torch.Tensor,
                       w_uv: torch.Tensor, scale: float, mask: torch.Tensor | None) -> torch.Tensor:
    """MLA's absorbed attention: every head attends over the cached latent as it is stored.

    Since q_h . (W_UK,h c) = (W_UK,h^T q_h) . c, each head's query moves into latent space, scores
    every cached [c ; k_pe] in one matmul, and its softmax-weighted latent comes back out through
    W_UV,h: the cache is never expanded to per-head keys and values. MLA's decode calls it on the
    whole latent; TPLA's on one rank's slice of it (tpla.py), the same function on fewer columns.
    q_nope (B, T, H, d_nope), q_pe (B, T, H, r) roped; kv (B, S, R + r) = [c ; k_pe];
    w_uk (H, d_nope, R), w_uv (H, d_v, R): the up-projections' columns of this latent;
    mask (T, S) boolean, the same for every head -> (B, T, H, d_v)."""
    B, T, H, _ = q_nope.shape
    R = w_uk.shape[-1]
    q_lat = torch.einsum("bthd,hdc->bthc", q_nope, w_uk)  # (B, T, H, R)
    q = torch.cat([q_lat, q_pe], dim=-1) * scale  # (B, T, H, R + r)
    scores = torch.bmm(q.reshape(B, T * H, -1), kv.transpose(1, 2)).view(B, T, H, -1)  # (B, T, H, S)
    if mask is not None:
        scores.masked_fill_(~mask[:, None, :], float("-inf"))
    # float32: in bf16 the exponentials summed over S keys lose the small probabilities
    p = F.softmax(scores, dim=-1, dtype=torch.float32).to(kv.dtype).view(B, T * H, -1)
    o_lat = torch.bmm(p, kv[..., :R]).view(B, T, H, R)  # the attention output, in latent space
    return torch.einsum("bthc,hdc->bthd", o_lat, w_uv)


class MLA(nn.Module):
    """Multi-head latent attention (DeepSeek-V2/V3).

    Keys and values come from one latent c = norm(W_DKV x) of R values per token plus one rope
    key k_pe of r values shared by all heads. Per head h:
        k_h = [W_UK,h c ; k_pe]      v_h = W_UV,h c      (W_UK, W_UV stacked in wkv_b)
    Naive: build k_h, v_h for every cached token. Absorbed: since q_h . W_UK,h c = (W_UK,h^T q_h) . c,
    fold W_UK into the query and W_UV into the output, and attend over c directly.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.n_heads
        self.R, self.r = args.kv_lora_rank, args.qk_rope_head_dim
        self.d_nope, self.d_v = args.qk_nope_head_dim, args.v_head_dim
        self.q_lora_rank = args.q_lora_rank
        self.impl = args.mla_impl
        q_out = args.n_heads * (self.d_nope + self.r)
        if self.q_lora_rank:
            self.wq_a = nn.Linear(args.dim, self.q_lora_rank, bias=args.qkv_bias)
            self.q_norm = RMSNorm(self.q_lora_rank, args.latent_norm_eps)
            self.wq_b = nn.Linear(self.q_lora_rank, q_out, bias=False)
        else:
            self.wq = nn.Linear(args.dim, q_out, bias=False)
        self.wkv_a = nn.Linear(args.dim, self.R + self.r, bias=args.qkv_bias)
        self.kv_norm = RMSNorm(self.R, args.latent_norm_eps)
        self.wkv_b = nn.Linear(self.R, args.n_heads * (self.d_nope + self.d_v), bias=False)
        self.wo = nn.Linear(args.n_heads * self.d_v, args.dim, bias=args.o_bias)
        self.scale = (self.d_nope + self.r) ** -0.5 * softmax_scale_factor(args.rope_scaling)  # YaRN: DeepSeek's
        self.cache: LatentCache | None = None

    def kv_values_per_token(self) -> int:
        return self.R + self.r

    def make_cache(self, batch: int, seq_len: int, dtype, device) -> LatentCache:
        return LatentCache(batch, seq_len, self.R, self.r, dtype, device)

    def project(self, x, cos, sin):
        """The queries of every head and this step's latent and rope key: q_nope (B, T, H, d_nope),
        q_pe (B, T, H, r), c (B, T, R), k_pe (B, T, r), the rope ones rotated."""
        B, T, _ = x.shape
        q = self.wq_b(self.q_norm(self.wq_a(x))) if self.q_lora_rank else self.wq(x)
        q_nope, q_pe = q.view(B, T, self.n_heads, -1).split([self.d_nope, self.r], dim=-1)
        c, k_pe = self.wkv_a(x).split([self.R, self.r], dim=-1)
        q_pe = apply_rope(q_pe, cos, sin)
        k_pe = apply_rope(k_pe.unsqueeze(2), cos, sin).squeeze(2)
        return q_nope, q_pe, self.kv_norm(c), k_pe

    def forward(self, x, cos, sin, mask, input_pos=None):
        B, T, _ = x.shape
        q_nope, q_pe, c, k_pe = self.project(x, cos, sin)
        if self.cache is None:
            kv = torch.cat([c, k_pe], dim=-1)  # (B, T, R + r)
        else:
            kv = self.cache.update(input_pos, c, k_pe)  # (B, S, R + r): the whole cache, masked below
        absorb = self.impl == "absorb" or (self.impl == "auto" and T == 1)
        y = self._absorbed(q_nope, q_pe, kv, mask) if absorb else self._naive(q_nope, q_pe, kv, mask)
        return self.wo(y.reshape(B, T, -1))

    def _naive(self, q_nope, q_pe, kv, mask):
        """Expand every cached latent into per-head keys and values, then ordinary attention."""
        B, S, _ = kv.shape
        c, k_pe = kv.split([self.R, self.r], dim=-1)
        k_nope, v = self.wkv_b(c).view(B, S, self.n_heads, -1).split([self.d_nope, self.d_v], dim=-1)
        k = torch.cat([k_nope, k_pe[:, :, None, :].expand(-1, -1, self.n_heads, -1)], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)  # (B, T, H, d_nope + r)
        if q.device.type == "cpu" and self.d_v < q.shape[-1]:
            # torch's fused CPU attention kernel needs the values' head dim equal to the keys': zero
            # columns make it so (exact), and training stores no (T, S) attention matrix per head
            v = F.pad(v, (0, q.shape[-1] - self.d_v))
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=mask, scale=self.scale)  # (B, H, T, v's head dim)
        return y.transpose(1, 2)[..., : self.d_v]

    def _absorbed(self, q_nope, q_pe, kv, mask):
        """Attend over the latent itself (absorbed_attention), through every head's up-projections."""
        w = self.wkv_b.weight.view(self.n_heads, self.d_nope + self.d_v, self.R)
        return absorbed_attention(q_nope, q_pe, kv, w[:, : self.d_nope], w[:, self.d_nope:], self.scale, mask)


# ----------------------------------------------------------------------------- the model

class Block(nn.Module):
    """Layer `layer` of the model. experts: the routed experts it holds if it is a MoE layer (all by default)."""

    def __init__(self, args: ModelArgs, layer: int = 0, experts: range | None = None):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = MLA(args) if args.is_mla else Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = (MoE(args, experts) if args.is_moe(layer)
                             else FeedForward(args.dim, args.hidden_dim, args.mlp_bias))

    def forward(self, x, cos, sin, mask, input_pos=None):
        x = x + self.attention(self.attention_norm(x), cos, sin, mask, input_pos)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = None if args.tie_embeddings else nn.Linear(args.dim, args.vocab_size, bias=False)
        self.cache_len = 0  # 0: no cache, every forward sees the whole sequence
        self.set_rope()

    def set_rope(self, n_pos: int | None = None, device=None):
        """The cos / sin tables of positions 0 ... n_pos - 1; by default of the trained context, at most
        4096 positions to start with (a 10M-token context would need gigabytes): setup_caches and
        forward grow them when a longer cache or sequence comes."""
        cos, sin = model_rope(self.args, n_pos or min(self.args.max_seq_len, 4096))
        self.register_buffer("rope_cos", cos.to(device), persistent=False)
        self.register_buffer("rope_sin", sin.to(device), persistent=False)

    def setup_caches(self, batch: int, seq_len: int, dtype=None, device=None):
        """Allocate every layer's cache for `batch` sequences of up to `seq_len` tokens."""
        dtype = dtype or self.tok_embeddings.weight.dtype
        device = device or self.tok_embeddings.weight.device
        for layer in self.layers:
            layer.attention.cache = layer.attention.make_cache(batch, seq_len, dtype, device)
        self.cache_len = seq_len
        if seq_len > self.rope_cos.shape[0]:
            self.set_rope(seq_len, device)

    def clear_caches(self):
        for layer in self.layers:
            layer.attention.cache = None
        self.cache_len = 0

    def kv_bytes_per_token(self, dtype: torch.dtype | None = None) -> int:
        """Cache bytes one token costs across all layers (GQA: 2 n_kv d_h; MLA: R + r per layer)."""
        dtype = dtype or self.tok_embeddings.weight.dtype
        per_layer = sum(layer.attention.kv_values_per_token() for layer in self.layers)
        return per_layer * torch.finfo(dtype).bits // 8

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, T) at positions input_pos (T,) -> logits (B, T, vocab).
        With caches set up, the tokens are written at input_pos and attend to every earlier
        cached position, so prefill can be split into chunks and decode is T = 1."""
        return self.logits(self.hidden(tokens, input_pos))

    def hidden(self, tokens: torch.Tensor, input_pos: torch.Tensor | None = None) -> torch.Tensor:
        """forward up to the final norm: (B, T, dim). finetune.py makes the logits a chunk at a time."""
        B, T = tokens.shape
        if input_pos is None:
            input_pos = torch.arange(T, device=tokens.device)
        if self.cache_len == 0 and T > self.rope_cos.shape[0]:
            self.set_rope(T, tokens.device)
        cos, sin = self.rope_cos[input_pos], self.rope_sin[input_pos]
        mask = self._mask(input_pos)
        x = self.tok_embeddings(tokens)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, input_pos)
        return self.norm(x)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.tok_embeddings.weight) if self.output is None else self.output(h)

    def _mask(self, input_pos: torch.Tensor) -> torch.Tensor:
        """The mask of the tokens at input_pos: the keys are the whole cache (S = cache_len) or,
        without a cache, the T tokens themselves."""
        key_pos = torch.arange(self.cache_len or input_pos.shape[0], device=input_pos.device)
        if not self.cache_len:
            key_pos = key_pos + input_pos[0]  # no cache: keys are exactly the queries' positions
        return attention_mask(input_pos, key_pos, self.args.sliding_window)


def attention_mask(query_pos: torch.Tensor, key_pos: torch.Tensor, sliding_window: int | None = None) -> torch.Tensor:
    """(T, S) boolean, True where the query at query_pos[i] may attend to the key at key_pos[j]:
    causal (key_pos <= query_pos), and within the last sliding_window positions if there is one.
    Positions, not indices, so it is right at any cache offset (a chunked prefill, a decode step)."""
    mask = key_pos[None, :] <= query_pos[:, None]
    if sliding_window:
        mask &= key_pos[None, :] > query_pos[:, None] - sliding_window
    return mask
