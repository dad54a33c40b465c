"""Tensor-parallel latent attention (TPLA, arXiv 2508.15881) and head-parallel MLA, over torch.distributed.

    torchrun --nproc_per_node=2 generate.py --prompt "The capital of France is" --temperature 0
    torchrun --nproc_per_node=2 generate.py --ckpt MLA_DIR --prompt "Hello" --tp heads
    torchrun --nproc_per_node=2 bench.py --ppl --tp tpla --tpla-transform pca-sorted
    torchrun --nproc_per_node=2 bench.py --contexts 32768 --batch 4     # tpla vs heads decode speed
    python tpla.py --ckpt MLA_DIR --world 2      # MLA_DIR-tpla2: the same model, its latent rotated for the split
    python tpla.py --align 60                    # ... then each layer trained to agree with itself under the split

The problem. Head-parallel tensor parallelism (DeepSeek's, `--tp heads`) gives each rank some of
the heads, but every MLA head reads the whole latent, so every rank caches, and reads at every
decode step, the whole latent cache: R + r values per token on each rank. Tensor parallelism
stops saving cache bandwidth exactly where MLA needs it.

TPLA splits the latent instead. With g ranks, rank i keeps the slice P_i of the latent (R / g
values per token) plus the rope key k_pe, and runs attention for all heads on its slice:
    s_i = q_lat[P_i] . c[P_i] + q_pe . k_pe        p_i = softmax(s_i * scale)
    y_i = W_O  W_UV[:, P_i] (p_i . c[P_i])          y = all_reduce_sum(y_i)
That is absorbed MLA on a slice of the latent, and TPLA's decode calls exactly that function
(model.absorbed_attention) on its shard's columns. Exact for g = 1; for g > 1 each shard has a
softmax of its own (that is the approximation): if every p_i were the same p, y would be exactly
MLA's. An orthogonal transform Q of the latent (c' = Q c, up-projections W Q^T: exact), chosen
before slicing, decides what each shard holds: `hadamard` (every latent dim in every shard),
`pca` (the eigenvectors of the calibration latents' second moment, dealt round-robin so that
each shard gets an equal share of the energy), `pca-sorted` (the top half on rank 0), `none`
(the default: convert.py's latent is energy-sorted already), or a rotation fitted to the split
itself (`python tpla.py`, fit_rotation). `--align N` then trains each layer's maps for the split
(align_for_tpla: the paper's "align" stage as a local fit, the same fit as convert.py's step 6).
The latent RMSNorm is computed on the whole latent, before slicing: every rank holds the (small)
down-projection and normalises each new token's latent itself. Its elementwise weight is not rotation invariant, so all of it but its RMS (a
uniform factor, which is) moves into the up-projection first. Every rank keeps the whole rope key.

Prefill runs in plain MLA form (exact, nothing split across ranks but the heads): each rank
runs its heads over the whole latent of the prompt, then caches only its slice. Decode (and any
later chunk of a chunked prefill) runs in TPLA form. Every rank computes the full query of all
heads, and o_proj over all heads.

The rest is ordinary Megatron tensor parallelism: the feed-forward's w1 / w3 split by output
rows and w2 by input columns; embeddings, norms and the output head are replicated. A mixture
of experts (DeepSeek-V2/V3, Kimi-K2) is expert-parallel: each rank holds and reads only its
contiguous share of the routed experts (ParallelMoE), so a checkpoint whose experts exceed one
rank's memory still runs. Each layer does two all-reduces (after attention, after the
feed-forward). They cannot be merged: the feed-forward's RMSNorm needs the complete attention
output, the next layer's needs the complete feed-forward output. Biases of row-parallel outputs
(o_proj, w2) are added on rank 0 only. Heads split contiguously, unevenly where they do not
divide (9 heads on 2 ranks: 4 + 5). GQA checkpoints run head-parallel too: with fewer ranks than
KV heads the KV groups are dealt to the ranks; with more, a KV head is replicated on the ranks
that share its query heads.

What is in here, top to bottom: TPLA, one rank's attention; the head-parallel modules;
SimulatedTPLA, every rank of TPLA decode in one process (what finetune.py --tpla trains
through); the latent transforms and the fitted rotation (`python tpla.py`); sharding a layer and
loading a checkpoint split over the ranks (load_parallel); place(), a checkpoint on one device or
split over torchrun's ranks, as generate.py and bench.py open it. What each choice was measured
to cost (the transforms, the rope key, per-shard scaling, where the loss is, the speed on a
CPU): docs/tpla.md.
"""
import argparse
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from checkpoint import CheckpointReader, args_from_config, find_checkpoint, load_model, read_config
from cli import UserError, first_on_rank_0, init_distributed, launched, progress_bar, read_text, run
from fetch import default_or, ensure_default_conversion, ensure_texts
from model import (MLA, Attention, Block, FeedForward, LatentCache, ModelArgs, MoE, Transformer, absorbed_attention,
                   attention_mask)
from tokenizer import load_tokenizer
from writer import check_output, earlier_output, write_model

MODES = ("tpla", "heads")
TRANSFORMS = ("none", "hadamard", "pca", "pca-sorted")  # pca-sorted: shard 0 gets the top half of the energy
DEFAULT_TRANSFORM = "none"  # convert.py's latent is energy-sorted: the split that costs least (docs/tpla.md)


# ----------------------------------------------------------------------------- one rank's latent attention

class TPLA(MLA):
    """MLA whose cache holds this rank's latent slice; prefill in MLA form, decode in TPLA form.
    Parameters are the whole (transformed) MLA's: all heads' queries and o_proj, as decode needs."""

    def __init__(self, args: ModelArgs, rank: int, world: int):
        super().__init__(args)
        self.h0, self.h1 = split(self.n_heads, rank, world)  # heads this rank runs in prefill
        self.lat = slice(*split(self.R, rank, world))  # this rank's latent dims P_i

    def shard(self):
        """After loading: this rank's columns of the up-projections, contiguous, for decode."""
        w = self.wkv_b.weight.view(self.n_heads, self.d_nope + self.d_v, self.R)[..., self.lat]
        self.register_buffer("w_uk", w[:, : self.d_nope].contiguous(), persistent=False)  # (H, d_nope, R/g)
        self.register_buffer("w_uv", w[:, self.d_nope:].contiguous(), persistent=False)  # (H, d_v, R/g)
        return self

    def kv_values_per_token(self) -> int:
        return self.lat.stop - self.lat.start + self.r

    def make_cache(self, batch: int, seq_len: int, dtype, device) -> LatentCache:
        return LatentCache(batch, seq_len, self.lat.stop - self.lat.start, self.r, dtype, device)

    def forward(self, x, cos, sin, mask, input_pos=None):
        B, T, _ = x.shape
        q_nope, q_pe, c, k_pe = self.project(x, cos, sin)  # all heads; the whole latent is normed, then sliced
        if self.cache is not None:  # cache only this rank's shard: c[P_i] and the rope key
            kv = self.cache.update(input_pos, c[..., self.lat], k_pe)  # (B, S, R/g + r)
        if self.cache is None or input_pos[0] == 0:  # nothing cached before: the exact MLA form
            y = self._prefill(q_nope, q_pe, c, k_pe, mask)
        else:  # absorbed MLA on this rank's slice of the latent: every head, a softmax of its own
            y = absorbed_attention(q_nope, q_pe, kv, self.w_uk, self.w_uv, self.scale, mask)  # (B, T, H, d_v)
            y = self.wo(y.reshape(B, T, -1))
        dist.all_reduce(y)  # prefill: the sum over heads; decode: the sum over latent shards
        return y

    def _prefill(self, q_nope, q_pe, c, k_pe, mask):
        """Naive MLA for heads h0..h1 over the whole latent of these T tokens, through their o_proj columns."""
        B, T, H, _ = q_nope.shape
        h, n = slice(self.h0, self.h1), self.h1 - self.h0
        w = self.wkv_b.weight.view(H, self.d_nope + self.d_v, self.R)[h]
        k_nope, v = torch.einsum("btc,hdc->bthd", c, w).split([self.d_nope, self.d_v], dim=-1)
        k = torch.cat([k_nope, k_pe[:, :, None, :].expand(-1, -1, n, -1)], dim=-1)  # (B, T, n, d_nope + r)
        q = torch.cat([q_nope[:, :, h], q_pe[:, :, h]], dim=-1)
        if mask is not None:
            mask = mask[:, :T]  # the keys are these T tokens, at positions 0 ... T-1
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=mask, scale=self.scale).transpose(1, 2)  # (B, T, n, d_v)
        wo = self.wo.weight[:, self.h0 * self.d_v: self.h1 * self.d_v]
        return F.linear(y.reshape(B, T, -1), wo, self.wo.bias)  # the bias is zero except on rank 0


# ----------------------------------------------------------------------------- whole heads (and experts) per rank

class HeadParallelMLA(MLA):
    """DeepSeek's TP: an MLA of this rank's heads over the whole latent, so the whole cache on every rank.
    Its absorbed path is MLA's unchanged, for H/g heads."""

    def forward(self, x, cos, sin, mask, input_pos=None):
        y = super().forward(x, cos, sin, mask, input_pos)  # this rank's heads through their o_proj columns
        dist.all_reduce(y)  # the sum over ranks is every head through the whole o_proj
        return y


class HeadParallelAttention(Attention):
    """GQA, head-parallel: this rank's query heads and the KV heads they read."""

    def forward(self, x, cos, sin, mask, input_pos=None):
        y = super().forward(x, cos, sin, mask, input_pos)
        dist.all_reduce(y)
        return y


class ParallelFeedForward(FeedForward):
    """Megatron's MLP: this rank's hidden units (w1, w3 rows; w2 columns) give a partial sum."""

    def forward(self, x):
        y = super().forward(x)
        dist.all_reduce(y)
        return y


class ParallelMoE(MoE):
    """Expert parallelism: this rank's routed experts and its share of the shared experts' hidden
    units (built so by load_parallel and shard_feed_forward) give a partial sum of the layer's output.
    Every rank routes every token (the router is replicated and deterministic, so all agree), runs
    the tokens routed to its own experts, and the all-reduce the layer makes anyway adds the parts:
    no all-to-all, since tensor-parallel attention leaves every rank with every token."""

    def forward(self, x):
        y = super().forward(x)
        dist.all_reduce(y)
        return y


# ----------------------------------------------------------------------------- every rank in one process

def all_shards(q_nope, q_pe, c, k_pe, w, d_nope: int, scale: float, mask, world: int):
    """What g ranks of TPLA decode compute, in one process: rank i attends on its latent slice
    c[P_i] (and the whole rope key) with a softmax of its own; the sum is the all-reduce's.
    w: the whole up-projection (H, d_nope + d_v, R) -> (B, T, H, d_v)."""
    y = 0
    for i in range(world):
        P = slice(*split(c.shape[-1], i, world))
        y = y + absorbed_attention(q_nope, q_pe, torch.cat([c[..., P], k_pe], dim=-1), w[:, :d_nope, P],
                                   w[:, d_nope:, P], scale, mask)
    return y


class SimulatedTPLA(MLA):
    """All g ranks of TPLA decode in one process, differentiable, for fine-tuning a checkpoint to
    tolerate the split (finetune.py --tpla) and for measuring it without torchrun. No cache: in a
    forward over whole windows, the queries at positions >= start attend in TPLA form (each latent
    shard with a softmax of its own, then the sum the all-reduce makes), the earlier ones in MLA
    form. That is what teacher-forced decode after a `start`-token prefill computes on g ranks with
    `--tpla-transform none` (test_tp_two_ranks compares the two). rows: the batch rows that take the
    TPLA form (None: all); the others stay plain MLA. Set up by simulate()."""
    world, start, rows = 1, 0, None

    def forward(self, x, cos, sin, mask, input_pos=None):
        B, T, _ = x.shape
        q_nope, q_pe, c, k_pe = self.project(x, cos, sin)
        y = self._naive(q_nope, q_pe, torch.cat([c, k_pe], dim=-1), mask)  # (B, T, H, d_v): MLA form
        rows = torch.arange(B, device=x.device) if self.rows is None else self.rows
        if len(rows) == 0:  # none of this batch's windows takes the TPLA form (finetune.py: this rank's share)
            return self.wo(y.reshape(B, T, -1))
        s = self.start
        w = self.wkv_b.weight.view(self.n_heads, self.d_nope + self.d_v, self.R)
        decode = all_shards(q_nope[rows, s:], q_pe[rows, s:], c[rows], k_pe[rows], w, self.d_nope, self.scale,
                            mask[s:], self.world)
        y = y.index_copy(0, rows, torch.cat([y[rows, :s], decode], dim=1))
        return self.wo(y.reshape(B, T, -1))


def simulate(model: Transformer, world: int, start: int, rows: torch.Tensor | None = None) -> Transformer:
    """Turn every MLA layer of `model`, in place, into a SimulatedTPLA of `world` ranks (same weights)."""
    check_parallel(model.args, "tpla", world)
    for layer in model.layers:
        layer.attention.__class__ = SimulatedTPLA
        layer.attention.world, layer.attention.start, layer.attention.rows = world, start, rows
    return model


# ----------------------------------------------------------------------------- the orthogonal transform

def hadamard(n: int) -> torch.Tensor:
    """Sylvester's Hadamard matrix of order n (a power of two), scaled to be orthogonal."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h / n ** 0.5


def pca_basis(cov: torch.Tensor, world: int, interleave: bool = True) -> torch.Tensor:
    """Q whose rows are the eigenvectors of the latents' second moment, largest first. Interleaved,
    shard i (rows i R/g ... (i+1) R/g) gets components i, i + g, i + 2g, ...: equal shares of energy."""
    _, vecs = torch.linalg.eigh(cov)
    vecs = vecs.flip(-1)  # columns, largest eigenvalue first
    R = cov.shape[0]
    order = [k for i in range(world) for k in range(i, R, world)] if interleave else list(range(R))
    return vecs[:, order].T.contiguous()


@torch.no_grad()
def fold_transform(attn: MLA, Q: torch.Tensor):
    """Make the cached latent c' = Q c, exactly: RMSNorm(c) = w * c / rms(c), and rms is rotation
    invariant but the elementwise weight w is not, so w / m moves into the up-projection first and
    the norm keeps the uniform weight m = rms(w), which commutes with Q; then Q rotates the
    down-projection's latent rows and Q^T the up-projection. (Keeping m, not 1, keeps convert.py's
    scales: its norm weight is uniform, ~1e6, so nothing moves; finetune.py's unfold needs that.)"""
    R = attn.R
    Q = Q.double()
    for p in (attn.wkv_a.weight, attn.wkv_a.bias):
        if p is not None:
            p[:R] = (Q @ p[:R].double()).to(p.dtype)  # (R, D): rows of the latent
    w = attn.kv_norm.weight.double()
    m = w.pow(2).mean().sqrt()
    attn.wkv_b.weight.copy_(attn.wkv_b.weight.double() * (w / m) @ Q.T)  # (H * (d_nope + d_v), R)
    attn.kv_norm.weight.fill_(m.item())


@torch.no_grad()
def latent_moment(attn: MLA, x: torch.Tensor) -> torch.Tensor:
    """E[c c^T] in float64 of the normed latents of the attention inputs x (N, T, D)."""
    c = attn.kv_norm(attn.wkv_a(x)[..., : attn.R]).reshape(-1, attn.R).double()
    return c.T @ c / len(c)


# ----------------------------------------------------------------------------- a rotation fitted for the split

def calibration_ids(folder: Path, n_tokens: int = 2048, seq_len: int = 512, text: str | None = None) -> torch.Tensor:
    """(n_tokens / seq_len, seq_len) token ids from the start of `text` (a file; default: the
    embedded calibration split)."""
    ids = load_tokenizer(folder).encode(read_text(text or ensure_texts()[0]))[:n_tokens]
    return torch.tensor(ids[: len(ids) // seq_len * seq_len]).view(-1, seq_len)


def fit_rotation(attn: MLA, x: torch.Tensor, cos, sin, world: int, start: int, stride: int = 1, steps: int = 40,
                 lr: float = 3e-3):
    """The orthogonal Q = exp(A - A^T) under which TPLA decode best matches this layer's exact
    attention: Adam from Q = I (the `none` transform) on the squared error after o_proj of the
    queries at start, start + stride, ... (decode steps), relative to the exact output's, over the
    inputs x (N, T, D) (the layer's normed inputs in the exact model). Only the split matters:
    rotations within a shard change nothing, the ones that move latent directions between shards
    do. The layer's latent norm weight must be uniform already (fold_transform with I). Returns
    the best Q seen and the relative error at I and at that Q."""
    T = x.shape[1]
    pos = torch.arange(T, device=x.device)
    mask = attention_mask(pos, pos)
    steps_at = slice(start, T, stride)
    with torch.no_grad():
        q_nope, q_pe, c, k_pe = attn.project(x, cos, sin)
        q_nope, q_pe = q_nope[:, steps_at], q_pe[:, steps_at]  # only the fitted queries, over every key
        exact = attn._naive(q_nope, q_pe, torch.cat([c, k_pe], dim=-1), mask[steps_at])  # (N, n, H, d_v)
        wo = attn.wo.weight.view(-1, attn.n_heads, attn.d_v)  # o_proj per head (D, H, d_v)
        want = torch.einsum("bthd,ehd->bte", exact, wo)
        w = attn.wkv_b.weight.view(attn.n_heads, attn.d_nope + attn.d_v, attn.R).detach()
    A = torch.zeros(attn.R, attn.R, device=x.device, requires_grad=True)
    opt = torch.optim.Adam([A], lr=lr)
    errors = []
    for step in range(steps + 1):
        Q = torch.linalg.matrix_exp(A - A.T)
        y = all_shards(q_nope, q_pe, c @ Q.T, k_pe, torch.einsum("hdc,ec->hde", w, Q), attn.d_nope,
                       attn.scale, mask[steps_at], world)  # the rotated layer's TPLA decode
        err = (torch.einsum("bthd,ehd->bte", y, wo) - want).pow(2).sum() / want.pow(2).sum()
        errors.append(err.item())
        if errors[-1] <= min(errors):
            best = Q.detach().double()
        if step < steps:
            opt.zero_grad()
            err.backward()
            opt.step()
    return best, errors[0], min(errors)


def rotate_for_tpla(path: str | Path, out: str | Path, world: int, calib: torch.Tensor, queries: int = 1024,
                    steps: int = 40, lr: float = 3e-3, log=print, inputs=(), align: int = 0,
                    align_lr: float = 1e-2) -> dict:
    """Write `out`: the MLA checkpoint at `path` with every layer's latent rotated by fit_rotation,
    fitted on calibration ids (N, T) on about `queries` decode steps spread evenly over the second
    halves of the windows (the cost of a step grows with the queries; many windows, each with a
    few queries, fit a rotation that holds on other text better than a few windows with many).
    On one device it is the same model (a rotation of the latent is exact); under `--tp tpla`
    with `world` ranks (transform none) its shards' softmaxes agree better. With align > 0 each
    rotated layer is then aligned (align_for_tpla, `align` Adam steps): no longer the same model
    on one device, but close to it, and closer to it under TPLA. Returns the per-layer errors."""
    reader = CheckpointReader(path)
    check_parallel(reader.args, "tpla", world)
    model, folder = load_model(reader.folder)
    model.requires_grad_(False)
    N, T = calib.shape
    stride = max(1, N * (T - T // 2) // queries)
    h = model.tok_embeddings(calib)
    model.set_rope(max(T, model.rope_cos.shape[0]))
    cos, sin = model.rope_cos[:T], model.rope_sin[:T]
    mask = attention_mask(torch.arange(T), torch.arange(T))
    before, after, aligned = [], [], []
    bar = progress_bar(total=len(model.layers), desc=f"fit the rotation for TPLA x{world}", unit="layer")
    for i, block in enumerate(model.layers):
        attn = block.attention
        with torch.no_grad():
            fold_transform(attn, torch.eye(attn.R))
            x = block.attention_norm(h)
        Q, e0, e1 = fit_rotation(attn, x, cos, sin, world, T // 2, stride, steps, lr)
        with torch.no_grad():
            fold_transform(attn, Q)
        if align:
            aligned.append(align_for_tpla(attn, x, (cos, sin), mask, world, align, align_lr))
        with torch.no_grad():
            h = block(h, cos, sin, mask)  # the next layer's inputs (the rotation changes nothing; an alignment little)
        before.append(e0)
        after.append(e1)
        bar.update()
        bar.set_postfix_str(f"layer {i}: error {e0:.4f} -> {e1:.4f}")
        log(f"layer {i}: TPLA x{world} relative error of the attention output {e0:.4f} -> {e1:.4f}")
    bar.close()
    record = {"world": world, "calib_tokens": calib.numel(), "query_stride": stride, "steps": steps, "lr": lr,
              "error_before": [round(e, 5) for e in before], "error_after": [round(e, 5) for e in after]}
    if align:
        record.update(align_steps=align, align_error=[[round(e, 5) for e in pair] for pair in aligned])
    write_model(model, folder, Path(out), reader.stored_dtype(), {"tpla_rotation": record}, inputs)
    return record


def align_for_tpla(attn: MLA, x: torch.Tensor, rope: tuple, mask: torch.Tensor, world: int, steps: int,
                   lr: float = 1e-2, batch: int = 2) -> tuple[float, float]:
    """TPLA's "align" stage as a local fit: attn's maps (q, kv_a, kv_b, o) trained by
    convert.fit_output so that, on the normed inputs x (N, T, D), its output in TPLA form over
    `world` ranks (the queries of each window's second half decoded after an MLA-form prefill,
    SimulatedTPLA) and in MLA form both match its MLA output before the fit: in each batch of
    `batch` windows the first half take the TPLA form, the others the MLA form, so the model
    stays itself on one device while its shards learn to agree. Edits attn in place; returns the
    error of that mix before and after (relative mean squared error)."""
    from convert import fit_output
    T = x.shape[1]
    with torch.no_grad():
        want = torch.cat([attn(x[b:b + batch], *rope, mask) for b in range(0, len(x), batch)])
    attn.__class__ = SimulatedTPLA
    attn.world, attn.start, attn.rows = world, T // 2, torch.arange(batch // 2, device=x.device)
    try:
        return fit_output(attn, x, want, rope, mask, steps, lr, batch)
    finally:
        attn.__class__ = MLA
        del attn.world, attn.start, attn.rows


# ----------------------------------------------------------------------------- sharding one layer

def split(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rank's contiguous share [a, b) of n items, sizes differing by at most one (9 on 2: 4 + 5)."""
    return rank * n // world, (rank + 1) * n // world


def _rows(t: torch.Tensor, a: int, b: int, per: int) -> torch.Tensor:
    return t[a * per: b * per].clone()  # clone: the full tensor's storage can then be freed


def _build(make, state: dict, rank: int):
    """make() builds the module on the meta device; it then takes `state`. A row-parallel output's
    bias (o_proj, w2) is kept on rank 0 only, since the all-reduce adds the ranks' outputs."""
    with torch.device("meta"):
        m = make()
    for k in ("wo.bias", "w2.bias"):
        if k in state and rank != 0:
            state[k] = torch.zeros_like(state[k])
    m.load_state_dict(state, strict=True, assign=True)
    return m


def shard_attention(attn, args: ModelArgs, mode: str, rank: int, world: int):
    """This rank's part of one attention module: TPLA, or whole heads (MLA or GQA)."""
    s = attn.state_dict()
    if mode == "tpla":
        return _build(lambda: TPLA(args, rank, world), s, rank).shard()
    if args.is_mla:
        h0, h1 = split(args.n_heads, rank, world)
        local = replace(args, n_heads=h1 - h0, n_kv_heads=h1 - h0)
        q = "wq_b.weight" if args.q_lora_rank else "wq.weight"
        s[q] = _rows(s[q], h0, h1, args.qk_nope_head_dim + args.qk_rope_head_dim)
        s["wkv_b.weight"] = _rows(s["wkv_b.weight"], h0, h1, args.qk_nope_head_dim + args.v_head_dim)
        s["wo.weight"] = _rows(s["wo.weight"].T, h0, h1, args.v_head_dim).T.contiguous()
        return _build(lambda: HeadParallelMLA(local), s, rank)
    # GQA: whole KV groups per rank, or (more ranks than KV heads) a KV head shared by a few ranks
    n_kv, G, d = args.n_kv_heads, args.n_heads // args.n_kv_heads, args.head_dim
    if world <= n_kv:
        k0, k1 = split(n_kv, rank, world)
        h0, h1 = k0 * G, k1 * G
    else:
        k0 = rank * n_kv // world
        k1 = k0 + 1
        sharing = [j for j in range(world) if j * n_kv // world == k0]  # ranks on KV head k0
        a, b = split(G, sharing.index(rank), len(sharing))
        h0, h1 = k0 * G + a, k0 * G + b
    local = replace(args, n_heads=h1 - h0, n_kv_heads=k1 - k0)
    s["wq.weight"] = _rows(s["wq.weight"], h0, h1, d)
    for k in ("wk", "wv"):
        for p in ("weight", "bias"):
            if f"{k}.{p}" in s:
                s[f"{k}.{p}"] = _rows(s[f"{k}.{p}"], k0, k1, d)
    if "wq.bias" in s:
        s["wq.bias"] = _rows(s["wq.bias"], h0, h1, d)
    s["wo.weight"] = _rows(s["wo.weight"].T, h0, h1, d).T.contiguous()
    return _build(lambda: HeadParallelAttention(local), s, rank)


def _swiglu_share(ffn: FeedForward, rank: int, world: int, cls=FeedForward) -> FeedForward:
    """Megatron's split of a SwiGLU: this rank's hidden units (w1, w3 rows; w2 columns)."""
    s = ffn.state_dict()
    a, b = split(s["w1.weight"].shape[0], rank, world)
    for k in ("w1.weight", "w1.bias", "w3.weight", "w3.bias"):
        if k in s:
            s[k] = _rows(s[k], a, b, 1)
    s["w2.weight"] = s["w2.weight"][:, a:b].contiguous()
    return _build(lambda: cls(ffn.w1.in_features, b - a, ffn.w1.bias is not None), s, rank)


def shard_feed_forward(ffn, rank: int, world: int):
    """A dense feed-forward split by hidden units; a mixture of experts built with this rank's
    experts only (load_parallel) keeps them whole, and its shared experts are split by hidden units.
    Why whole experts (expert parallel) and not each expert's hidden units: a rank then reads
    and multiplies E / g experts, not a g-th of all E (E small matmuls per rank), and a reader sees
    one idea, each expert on one rank. The cost: a rank whose experts draw more tokens works more."""
    if isinstance(ffn, MoE):
        if ffn.shared is not None:
            ffn.shared = _swiglu_share(ffn.shared, rank, world)
        ffn.__class__ = ParallelMoE
        return ffn
    return _swiglu_share(ffn, rank, world, ParallelFeedForward)


# ----------------------------------------------------------------------------- loading

def check_parallel(args: ModelArgs, mode: str, world: int, transform: str = "none"):
    """Say in one line why this checkpoint cannot be split this way (the same on every rank)."""
    kind = args.extra.get("model_type", "?")
    if mode == "tpla" and not args.is_mla:
        raise UserError(f"--tp tpla needs an MLA checkpoint, this one is GQA ({kind}): convert it with "
                        "convert.py, or run it with --tp heads")
    if world > args.n_heads:
        raise UserError(f"world size {world} exceeds the {args.n_heads} attention heads: every rank needs a head")
    if not args.n_experts and args.hidden_dim % world:
        raise UserError(f"world size {world} does not divide the feed-forward hidden size {args.hidden_dim}")
    if mode == "tpla":
        R = args.kv_lora_rank
        if R % world:
            raise UserError(f"world size {world} does not divide the latent (kv_lora_rank {R}): "
                            "TPLA gives each rank R / world of it")
        if transform == "hadamard" and R & (R - 1):
            raise UserError(f"--tpla-transform hadamard needs a power-of-two kv_lora_rank, this one is {R}: "
                            "use pca or none")


@torch.no_grad()
def load_parallel(path: str | Path, mode: str, rank: int, world: int, device: str = "cpu",
                  dtype: torch.dtype = torch.float32, transform: str = DEFAULT_TRANSFORM,
                  calib: torch.Tensor | None = None) -> tuple[Transformer, Path]:
    """This rank's part of one unsharded checkpoint, read layer by layer (memory: one layer, of its
    routed experts only this rank's, plus this rank's shards). For tpla with pca, calibration ids (N, T) stream through the
    whole model alongside, one layer at a time, to measure each layer's latents."""
    reader = CheckpointReader(path)
    args = reader.args
    check_parallel(args, mode, world, transform)
    with torch.device("meta"):
        model = Transformer(args)
    for name in ("tok_embeddings", "norm") + (() if model.output is None else ("output",)):
        reader.fill(getattr(model, name), f"{name}.", device, dtype)
    model.set_rope(device=device)
    pca = mode == "tpla" and transform.startswith("pca")
    if pca:
        calib = (calib if calib is not None else calibration_ids(reader.folder)).to(device)
        h = model.tok_embeddings(calib)  # (N, T, D) hidden states of the whole model
        T = calib.shape[1]
        model.set_rope(max(T, model.rope_cos.shape[0]), device)
        pos = torch.arange(T, device=device)
        rope_cs, mask = (model.rope_cos[:T], model.rope_sin[:T]), attention_mask(pos, pos)
    for i in range(args.n_layers):
        experts = range(*split(args.n_experts, rank, world)) if args.is_moe(i) else None
        with torch.device("meta"):
            block = Block(args, i, experts)  # a MoE layer with this rank's experts only: the others are never read
        reader.fill(block, f"layers.{i}.", device, dtype)
        block.feed_forward = shard_feed_forward(block.feed_forward, rank, world)
        if mode == "tpla" and transform != "none":
            if pca:
                fold_transform(block.attention, torch.eye(args.kv_lora_rank))  # a uniform norm weight first
                Q = pca_basis(latent_moment(block.attention, block.attention_norm(h)), world,
                              interleave=transform == "pca")
                Q = Q.to(device)
                dist.broadcast(Q, src=0)  # eigh's signs must not differ between ranks
                h = block(h, *rope_cs, mask)  # the next layer's input: exact MLA, before any change
            else:
                Q = hadamard(args.kv_lora_rank)
            fold_transform(block.attention, Q)
        block.attention = shard_attention(block.attention, args, mode, rank, world)
        model.layers[i] = block
    return model.eval(), reader.folder


# ----------------------------------------------------------------------------- one device, or split over the ranks

@dataclass
class Placement:
    """Where a checkpoint runs: one device (mode None), or split over torchrun's ranks, mode "tpla"
    (each rank a slice of the latent) or "heads" (whole heads per rank)."""
    folder: Path
    args: ModelArgs  # from its config.json, before any weight is read
    device: str
    mode: str | None = None
    rank: int = 0
    world: int = 1
    transform: str = DEFAULT_TRANSFORM  # of the latent, before TPLA splits it

    def load(self, dtype: torch.dtype, mode: str | None = None) -> Transformer:
        """The model, this rank's part of it (in `mode` if given, else this placement's)."""
        mode = mode or self.mode
        if mode is None:
            return load_model(self.folder, device=self.device, dtype=dtype)[0]
        return load_parallel(self.folder, mode, self.rank, self.world, self.device, dtype, self.transform)[0]

    def describe(self) -> str:
        return "one device" if self.mode is None else f"--tp {self.mode} on {self.world} rank{'s' * (self.world > 1)}"


def place(ckpt: str | None, tp: str | None, transform: str, device: str) -> Placement:
    """Where --ckpt runs, checked before any weight is read. Under torchrun (or with --tp: a group
    of one) this process joins the group, the default checkpoint is the embedded model's MLA
    conversion (made by rank 0 first, on first use), the mode defaults to tpla for MLA and heads
    for GQA, and the split is checked (check_parallel). Otherwise one device, and the default is
    the embedded model itself. UserError, in one line, for what cannot run."""
    if not (launched() or tp):
        folder = default_or(ckpt)
        return Placement(folder, args_from_config(read_config(folder)), device)
    rank, world, device = init_distributed(device)
    folder = find_checkpoint(ckpt) if ckpt else first_on_rank_0(ensure_default_conversion)
    args = args_from_config(read_config(folder))
    mode = tp or ("tpla" if args.is_mla else "heads")
    check_parallel(args, mode, world, transform)
    return Placement(folder, args, device, mode, rank, world, transform)


def add_placement_flags(p: argparse.ArgumentParser):
    """--device, --dtype, --tp and --tpla-transform: how generate.py and bench.py run a checkpoint (place())."""
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", help="float32, bfloat16 or float16 (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--tp", choices=MODES, help="tensor parallelism over torchrun's processes: tpla (each rank a "
                                               "slice of the latent) or heads (whole heads per rank); default under "
                                               "torchrun: tpla for MLA, heads for GQA (bench.py's speed run: both)")
    p.add_argument("--tpla-transform", choices=TRANSFORMS, default=DEFAULT_TRANSFORM,
                   help="orthogonal transform of the latent before TPLA splits it (a checkpoint rotated by "
                        "python tpla.py has its fitted one already: use none)")


# ----------------------------------------------------------------------------- command line: fit the rotation

def main():
    p = argparse.ArgumentParser(description="Rotate an MLA checkpoint's latent for a TPLA split of --world "
                                "ranks (fit_rotation); the result is the same model on one device.")
    p.add_argument("--ckpt", help="MLA checkpoint (default: the embedded model's default conversion)")
    p.add_argument("--world", type=int, default=2, help="the number of TPLA ranks to fit the split for")
    p.add_argument("--out", help="output folder (default: the checkpoint's name + '-tplaG', beside it)")
    p.add_argument("--calib-text", help="calibration text file (default: the embedded calibration split)")
    p.add_argument("--calib-tokens", type=int, default=16384, help="calibration tokens, from the start of the text")
    p.add_argument("--calib-len", type=int, default=1024, help="tokens per window; the second half is decoded")
    p.add_argument("--queries", type=int, default=1024, help="decode steps per layer to fit on, spread over the windows")
    p.add_argument("--steps", type=int, default=40, help="Adam steps per layer")
    p.add_argument("--lr", type=float, default=3e-3, help="Adam's learning rate for the rotation's generator")
    p.add_argument("--align", type=int, default=0,
                   help="then Adam steps per layer aligning the weights for the split (align_for_tpla; 0: none, "
                        "the same model on one device)")
    a = p.parse_args()
    if a.world < 2:
        raise UserError(f"--world {a.world}: with one rank TPLA is exact already, there is no split to fit")
    if a.align < 0:
        raise UserError(f"--align {a.align}: the number of Adam steps per layer, 0 or more (0: no alignment)")
    folder = find_checkpoint(a.ckpt) if a.ckpt else ensure_default_conversion()
    check_parallel(CheckpointReader(folder).args, "tpla", a.world)  # before reading any text
    out = Path(a.out) if a.out else folder.parent / f"{folder.name}-tpla{a.world}"
    inputs = [a.calib_text] if a.calib_text else []
    check_output(out, [folder, *inputs])
    replacing = earlier_output(out)
    calib = calibration_ids(folder, a.calib_tokens, a.calib_len, a.calib_text)
    if len(calib) == 0:
        raise UserError(f"the calibration text has fewer than --calib-len {a.calib_len} tokens")
    record = rotate_for_tpla(folder, out, a.world, calib, a.queries, a.steps, a.lr, log=lambda line: None,
                             inputs=inputs, align=a.align)  # the bar shows each layer's errors as it goes
    before, after = (sum(record[k]) / len(record[k]) for k in ("error_before", "error_after"))
    print(f"TPLA x{a.world} relative error of the attention output, mean over {len(record['error_before'])} "
          f"layers: {before:.4f} -> {after:.4f}")
    if a.align:
        mix = [sum(pair[i] for pair in record["align_error"]) / len(record["align_error"]) for i in (0, 1)]
        print(f"aligned ({a.align} steps per layer): relative error of TPLA and MLA forms together, mean "
              f"{mix[0]:.4f} -> {mix[1]:.4f}; on one device no longer the same model, but close to it")
    print(f"written {out}{' (it replaced the earlier output there)' if replacing else ''}: run it with "
          f"--tp tpla --tpla-transform none on {a.world} ranks")


if __name__ == "__main__":
    run(main)
