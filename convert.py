"""TransMLA: convert a GQA checkpoint (Llama, Qwen2, Mistral, Mixtral) into a stock MLA one:
DeepSeek-V3 for dense models, Mistral4 (DeepSeek's MLA + Mixtral's router) for Mixtral.

    python convert.py                                  # embedded SmolLM2-135M: 384 -> 96 cache values/token/layer
    python convert.py --ckpt llama.safetensors --out llama-mla --kv-lora-rank 512 --rope-dim 64 --freqfold 4
    python convert.py --method transmla                # the official method, step for step

The steps, each one function below (test_equivalence.py proves the exact ones exact):
1. gqa_as_mla   GQA is an MLA: keys become the rope key k_pe (all of them), values the latent,
                query heads pick their group through the maps qmap / uv. Exact.
2. rorope       per-frequency PCA across KV heads rotates the keys so the first components carry
                the most energy (exact: a rotation shared by the real and imaginary halves commutes
                with RoPE), then keeps RoPE on r dims only; the rest join the latent without RoPE.
                FreqFold F treats F adjacent frequencies as one, so each kept pair stands for F.
3. bkv_pca      balance the no-RoPE keys against the values (alpha), then one joint PCA of both
                into R latent dims. Exact at full rank.           (--latent-fit bkv, TransMLA)
   attention_pca  the same joint latent, but the PCA is weighted by what attention reads of it:
                key errors by the queries that score them, value errors by o_proj. Exact at full
                rank.                                              (--latent-fit attention, default)
4. to_deepseek  the stock layout: softmax-scale compensation, an optional low-rank query
                (--q-lora-rank), the latent RMSNorm made linear, q biases carried exactly.
5. refit_output o_proj refitted by least squares on the calibration activations, so that each
                converted layer's attention output matches the original layer's: one linear map
                that absorbs what the dropped RoPE and the dropped latent dims did to the scores
                and the values, as far as it can.               (--output-fit, default)

Every map acts on x1 = [x ; 1], so biases (Qwen2) ride through every step as a last column.
Statistics are float64 second moments of the attention input, gathered layer by layer while the
calibration text streams through the original model: peak memory is one layer plus activations.

Written with stock DeepSeek in mind (transformers, vLLM, SGLang load it without custom code):
- Stock DeepSeek always applies RMSNorm (eps 1e-6) to the latent. We scale the latent down to an
  RMS of 3e-5 (--latent-rms): there RMSNorm(c) = w * c / sqrt(eps + mean(c^2)) is linear to
  0.045% for a token of average size, and w = sqrt(eps) / scale undoes the scaling. The smallness
  is shared between the attention's input (its norm weight times s1, q_proj and
  kv_a_proj_with_mqa divided by s1) and kv_a_proj_with_mqa's latent rows, so that neither falls
  below what float16 and llama.cpp's 8-bit blocks hold (balance_input). The trade, measured in
  docs/latent_scale.md: smaller is more exact in fp32 (1e-10: to fp32 precision, for fp32 and
  bf16 only); larger makes the norm less linear; 3e-5 costs fp32 nothing measurable and fp16 and
  q8_0 no more than they cost the original (test_engines.py).
- Engines read that eps differently (transformers fixes 1e-6; vLLM, SGLang and llama.cpp take
  rms_norm_eps), so the folder's rms_norm_eps is 1e-6 (ENGINE_EPS) and the residual stream is
  scaled by alpha = sqrt(1e-6 / source eps) (embeddings, o_proj, down_proj): RMSNorm(alpha h;
  alpha^2 eps) = RMSNorm(h; eps), so every norm computes what it did. lm_head is always written
  (vLLM never ties DeepSeek's); dense layers are declared with 0 experts and no expert groups,
  which transformers, vLLM and llama.cpp all read as dense.
- Stock DeepSeek has no q bias without q_lora_rank. A q bias forces a q_lora path whose latent
  has a constant channel (q_a_proj's bias) that q_b_proj turns into the bias; exact, same cache.
- Mixtral's router renormalises its top-k softmax weights. Stock DeepSeek-V2 does not renormalise
  and V3 scores with a sigmoid, but stock Mistral4 has V3's attention and, with one expert group,
  no shared expert and scaling 1, exactly Mixtral's router: Mixtral becomes a mistral4 folder, its
  router and expert weights unchanged, the experts stacked as Mistral4 stores them (see
  mistral4_config for what else must be set, and why). transformers 5.23 loads it with
  Mistral4ForCausalLM (it does not list mistral4 under AutoModelForCausalLM).
- Mistral's and Mixtral's sliding window is dropped (neither format has one): the converted model
  attends to the whole context, identical to the original within the window.
"""
import argparse
import itertools
import json
import math
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from checkpoint import CheckpointReader, args_from_config, checkpoint_tensors, hf_name, load_model
from cli import UserError, peak_rss_mb, pick_device, pick_dtype, progress_bar, run
from model import Block, ModelArgs, Transformer, rope_frequencies, rope_table
from writer import CheckpointWriter, check_output, earlier_output

# the precision of the statistics and fits (second moments, eigendecompositions, least squares):
# float64, since the eigenvalues they rank span ten or more orders of magnitude. In float32 the
# embedded model's conversion scores perplexity 180.8 instead of 50.3 (docs/fit_precision.py)
FIT = torch.float64

# RMS of the latent before its (stock, unavoidable) RMSNorm, far enough below sqrt(eps) = 1e-3 that
# the norm is linear, high enough that float16 and 8-bit blocks hold it (docs/latent_scale.md): the
# norm then divides by sqrt(eps + s^2) instead of sqrt(eps), off by s^2 / (2 eps) = 0.045% for a token
# of average size; 1e-10 is linear to fp32 precision but underflows float16 and q8_0 to zeros
LATENT_RMS = 3e-5
FP16_LATENT_RMS = 1e-5  # the smallest latent RMS float16 stores without losing the latent
# the one RMSNorm eps every engine agrees on: transformers builds DeepSeek's latent norms with a
# fixed 1e-6, vLLM, SGLang and llama.cpp with rms_norm_eps; the written rms_norm_eps is this
ENGINE_EPS = 1e-6

# --method: a recipe of the choices below; single flags override it. "transmla" is the official
# method, kept as the reference; "fitted" fits the latent and o_proj to what attention computes.
METHODS = {
    "transmla": dict(rope_select="key", latent_fit="bkv", output_fit=False),
    "fitted": dict(rope_select="key", latent_fit="attention", output_fit=True),
}


@dataclass
class LayerMLA:
    """One attention layer in MLA form, float64; every map acts on x1 = [x ; 1].

    query head h:  q_nope = wq[h] x1 (d_h dims, no RoPE),  q_pe = qmap[h] q_nope (r dims, RoPE)
    keys:          k_pe = kpe x1 (r dims, rotate_half; pair m turns at frequency number pairs[m]
                   of the original head_dim RoPE), latent c = lat x1 (R dims)
    per head:      k_nope[h] = uk[h] c,  v[h] = uv[h] c
    score(h) = (q_nope . k_nope + q_pe . k_pe) / sqrt(d_h), the original model's scale.
    """
    wq: torch.Tensor  # (H, d_h, D+1)
    qmap: torch.Tensor  # (H, r, d_h)
    kpe: torch.Tensor  # (r, D+1)
    pairs: list
    lat: torch.Tensor  # (R, D+1)
    n_lat_k: int  # the first n_lat_k latent rows are (no-RoPE) key dims, the rest values
    uk: torch.Tensor  # (H, d_h, R)
    uv: torch.Tensor  # (H, d_h, R)


def _affine(linear: torch.nn.Linear) -> torch.Tensor:
    """[W | b] as one float64 matrix acting on x1 = [x ; 1]."""
    w = linear.weight.to(FIT)
    b = linear.bias.to(FIT) if linear.bias is not None else torch.zeros(w.shape[0], dtype=FIT)
    return torch.cat([w, b[:, None]], dim=1)


def top_eigvecs(cov: torch.Tensor, k: int) -> torch.Tensor:
    """The k leading eigenvectors of a symmetric matrix, as columns, largest eigenvalue first."""
    _, vecs = torch.linalg.eigh(cov)
    return vecs.flip(-1)[:, :k]


# ----------------------------------------------------------------------------- step 1

def gqa_as_mla(attn, n_kv: int, d_h: int) -> LayerMLA:
    """GQA as MLA, exact. k_pe holds every key dim, reordered so pairs of the same frequency
    sit together: real halves [f0: head0..head(n_kv-1), f1: ...], then imaginary halves."""
    H = attn.n_heads
    g = H // n_kv
    wq = _affine(attn.wq).view(H, d_h, -1)
    wk = _affine(attn.wk).view(n_kv, d_h, -1)
    wv = _affine(attn.wv).view(n_kv * d_h, -1)
    half = d_h // 2
    re = wk[:, :half].transpose(0, 1).reshape(half * n_kv, -1)  # row f * n_kv + j: head j, frequency f
    im = wk[:, half:].transpose(0, 1).reshape(half * n_kv, -1)
    pairs = [f for f in range(half) for _ in range(n_kv)]
    L = n_kv * d_h
    qmap = torch.zeros(H, L, d_h, dtype=FIT)
    uv = torch.zeros(H, d_h, L, dtype=FIT)
    for h in range(H):
        j = h // g  # the KV head this query head reads
        for f in range(half):
            qmap[h, f * n_kv + j, f] = 1.0
            qmap[h, L // 2 + f * n_kv + j, half + f] = 1.0
        uv[h, :, j * d_h:(j + 1) * d_h] = torch.eye(d_h, dtype=FIT)
    return LayerMLA(wq=wq, qmap=qmap, kpe=torch.cat([re, im]), pairs=pairs, lat=wv, n_lat_k=0,
                    uk=torch.zeros(H, d_h, L, dtype=FIT), uv=uv)


# ----------------------------------------------------------------------------- step 2

def rorope(layer: LayerMLA, cov: torch.Tensor, rope_dim: int, freqfold: int, n_kv: int,
           select: str = "key") -> LayerMLA:
    """RoRoPE + FreqFold: mix each block of `freqfold` frequencies (n_kv * freqfold pairs) so that the
    leading components matter most, keep RoPE on the leading rope_dim / 2 pairs overall, move the
    rest to the latent. Any invertible mixing T of a block's pairs commutes with RoPE (RoPE turns
    every pair of one frequency by the same angle) if the queries get T^-T: scores are unchanged.
    select "key": T is the PCA of the keys (TransMLA's RoRoPE; orthogonal, by key energy alone).
    select "score": T orders the components by their share of the scores, E[q_i^2] E[k_i^2]."""
    n_pairs = layer.kpe.shape[0] // 2
    block = n_kv * freqfold
    n_blocks = n_pairs // block
    keep = rope_dim // 2 // n_blocks  # pairs kept per block
    re, im = layer.kpe[:n_pairs], layer.kpe[n_pairs:]
    q_re, q_im = layer.qmap[:, :n_pairs], layer.qmap[:, n_pairs:]
    if select == "score":  # every query head's rope-space query, q = qmap[h] wq[h] x1: (H, L, D+1)
        q_all = layer.qmap @ layer.wq
        cq_full = torch.einsum("hid,de,hje->ij", q_all, cov, q_all)  # (L, L), summed over heads
    kept, dropped, q_kept, q_dropped, pairs = [], [], [], [], []
    for b in range(n_blocks):
        s = slice(b * block, (b + 1) * block)
        # real and imaginary halves are two samples of the same n_kv*F features: RoPE only rotates within a pair
        ck = re[s] @ cov @ re[s].T + im[s] @ cov @ im[s].T
        if select == "score":
            si = slice(n_pairs + b * block, n_pairs + (b + 1) * block)
            T, Tq = score_basis(ck, cq_full[s, s] + cq_full[si, si])
        else:
            T = Tq = top_eigvecs(ck, block).T  # (block, block), orthogonal: T^-T = T
        r_re, r_im = T @ re[s], T @ im[s]
        qr_re, qr_im = Tq @ q_re[:, s], Tq @ q_im[:, s]  # the inverse transpose on the query side
        kept.append((r_re[:keep], r_im[:keep]))
        dropped.append((r_re[keep:], r_im[keep:]))
        q_kept.append((qr_re[:, :keep], qr_im[:, :keep]))
        q_dropped.append((qr_re[:, keep:], qr_im[:, keep:]))
        # kept pair j of block b turns at one of the block's frequencies, spread evenly: with
        # keep = F / C this is frequency (b * keep + j) * C, ordinary RoPE of dim rope_dim
        first = layer.pairs[b * block]
        pairs += [first + j * freqfold // keep for j in range(keep)]
    kpe = torch.cat([torch.cat([k[0] for k in kept]), torch.cat([k[1] for k in kept])])
    qmap = torch.cat([torch.cat([q[0] for q in q_kept], 1), torch.cat([q[1] for q in q_kept], 1)], 1)
    k_drop = torch.cat([torch.cat([k[0] for k in dropped]), torch.cat([k[1] for k in dropped])])
    q_drop = torch.cat([torch.cat([q[0] for q in q_dropped], 1), torch.cat([q[1] for q in q_dropped], 1)], 1)
    # without RoPE, q_drop . k_drop = q_nope . (q_drop_map^T k_drop): a key up-projection from the latent
    n = k_drop.shape[0]
    H, d_h = layer.uk.shape[:2]
    return replace(layer, kpe=kpe, qmap=qmap, pairs=pairs,
                   lat=torch.cat([k_drop, layer.lat]), n_lat_k=n,
                   uk=torch.cat([q_drop.transpose(1, 2), layer.uk], 2),
                   uv=torch.cat([torch.zeros(H, layer.uv.shape[1], n, dtype=FIT), layer.uv], 2))


def score_basis(ck: torch.Tensor, cq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """T and T^-T for keys k' = T k and queries q' = T^-T q that diagonalise both second moments:
    E[k' k'^T] = E[q' q'^T] = diag(sqrt(lam)), lam descending, where lam_i = E[q'_i^2] E[k'_i^2] is
    component i's score energy (the eigenvalues of ck cq). Split evenly between query and key, so a
    key's size says how much it matters to the scores, whatever fits the latent next."""
    e, E = torch.linalg.eigh(ck)
    e = e.clamp_min(e.max() * 1e-12)
    S, S_inv = (E * e.sqrt()) @ E.T, (E / e.sqrt()) @ E.T  # ck^(1/2), ck^(-1/2)
    lam, W = torch.linalg.eigh(S @ cq @ S)  # whitened keys: the query energy is the score energy
    lam, W = lam.flip(0).clamp_min(lam.max() * 1e-12), W.flip(1)
    return (lam ** 0.25)[:, None] * (W.T @ S_inv), (lam ** -0.25)[:, None] * (W.T @ S)


# ----------------------------------------------------------------------------- step 3

def bkv_pca(layer: LayerMLA, cov: torch.Tensor, rank: int) -> LayerMLA:
    """Balanced joint PCA of the no-RoPE keys and the values into `rank` latent dims (TransMLA)."""
    k, v = layer.lat[: layer.n_lat_k], layer.lat[layer.n_lat_k:]
    alpha = 1.0
    if layer.n_lat_k:  # keys are larger than values: without balancing they would own the PCA
        norm = lambda m: torch.einsum("id,de,ie->i", m, cov, m).clamp_min(0).sqrt().mean()
        alpha = (norm(k) / norm(v)).item()
    scale = torch.ones(layer.lat.shape[0], dtype=FIT)
    scale[: layer.n_lat_k] = 1 / alpha
    z = scale[:, None] * layer.lat
    W = top_eigvecs(z @ cov @ z.T, rank)  # (R_old, rank)
    return replace(layer, lat=W.T @ z, n_lat_k=0, uk=(layer.uk / scale) @ W, uv=(layer.uv / scale) @ W)


def attention_pca(layer: LayerMLA, cov: torch.Tensor, rank: int, wo: torch.Tensor) -> LayerMLA:
    """The rank-`rank` latent that best preserves what attention computes from it, instead of the
    keys and values themselves: a latent error e costs sum_h E[(q_h . W_UK,h e)^2] in the scores
    and sum_h |W_O,h W_UV,h e|^2 in the output. Both are quadratic forms e^T G e, so the best latent
    is the PCA of G^(1/2) lat x1 (whitened PCA); the two terms are weighted to an equal share of
    the total, as BKV balances keys against values. Exact at full rank."""
    H, d_h, n = layer.uk.shape
    cq = torch.einsum("hid,de,hje->hij", layer.wq, cov, layer.wq)  # (H, d_h, d_h): E[q_h q_h^T]
    wo_h = wo.to(FIT).view(-1, H, d_h).transpose(0, 1)  # (H, D, d_v): head h's columns of W_O
    gk = torch.einsum("hia,hij,hjb->ab", layer.uk, cq, layer.uk)  # (n, n)
    gv = torch.einsum("hia,hij,hjb->ab", layer.uv, wo_h.transpose(1, 2) @ wo_h, layer.uv)
    c = layer.lat @ cov @ layer.lat.T  # (n, n): second moment of the latent
    # (a term nothing reads, as under an all-zero o_proj, has no share; with neither, plain PCA)
    terms = [t / share for t in (gk, gv) if (share := (t * c).sum()) > 0]
    g = sum(terms) if terms else torch.eye(n, dtype=FIT)
    e, E = torch.linalg.eigh(g)
    e = e.clamp_min(e.max() * 1e-10)  # directions nothing reads: cheap to keep, free to drop
    g_half, g_inv_half = (E * e.sqrt()) @ E.T, (E / e.sqrt()) @ E.T
    P = top_eigvecs(g_half @ c @ g_half, rank)  # (n, rank)
    up = g_inv_half @ P  # lat x1 ~ up (P^T G^(1/2) lat x1)
    return replace(layer, lat=P.T @ g_half @ layer.lat, n_lat_k=0, uk=layer.uk @ up, uv=layer.uv @ up)


# ----------------------------------------------------------------------------- step 4

def to_deepseek(layer: LayerMLA, attn, cov: torch.Tensor, q_lora_rank: int, bias: bool, eps: float,
                latent_rms: float = LATENT_RMS) -> dict:
    """Our MLA module's parameters (float64) for a LayerMLA, in the stock DeepSeek-V3 layout.
    bias: the source has attention biases (then kv_a_proj_with_mqa, o_proj and the q path get them).
    The latents (kv, and q where there is a q_lora path) are scaled to RMS latent_rms on the
    calibration tokens and their RMSNorm weights to sqrt(eps) / scale: RMSNorm(c) = w c / sqrt(eps +
    mean(c^2)) is then c times 1 - mean(c^2) / (2 eps) + ..., the original latent to that factor."""
    H, d_h, _ = layer.wq.shape
    r = layer.kpe.shape[0]
    D = layer.wq.shape[2] - 1
    # DeepSeek scales scores by (d_nope + r)^-0.5; the GQA model used d_h^-0.5
    q = torch.cat([layer.wq, layer.qmap @ layer.wq], 1) * math.sqrt((d_h + r) / d_h)  # (H, d_h + r, D+1)
    q = q.reshape(H * (d_h + r), D + 1)
    p = {}
    if q_lora_rank or bias:
        if q_lora_rank:  # low-rank query: PCA of the query outputs
            P = top_eigvecs(q @ cov @ q.T, q_lora_rank)  # (n_q, Q)
            qa, qb = P.T @ q, P
        elif D + 1 <= q.shape[0]:  # exact: q latent = [x ; 1], its constant channel carries the bias
            qa, qb = torch.eye(D + 1, dtype=FIT), q
        else:
            qa, qb = q, torch.eye(q.shape[0], dtype=FIT)
        s = latent_rms / _rms(qa, cov)
        p["wq_a.weight"], p["wq_a.bias"] = s * qa[:, :D], s * qa[:, D]
        p["q_norm.weight"] = torch.full((qa.shape[0],), math.sqrt(eps) / s, dtype=FIT)
        p["wq_b.weight"] = qb
    else:
        p["wq.weight"] = q[:, :D]
    s = latent_rms / _rms(layer.lat, cov)
    kv_a = torch.cat([s * layer.lat, layer.kpe])
    p["wkv_a.weight"] = kv_a[:, :D]
    p["kv_norm.weight"] = torch.full((layer.lat.shape[0],), math.sqrt(eps) / s, dtype=FIT)
    p["wkv_b.weight"] = torch.cat([layer.uk, layer.uv], 1).reshape(-1, layer.lat.shape[0])
    p["wo.weight"] = attn.wo.weight.to(FIT)
    if bias:  # stock DeepSeek's attention_bias covers q_a_proj, kv_a_proj_with_mqa and o_proj alike
        p["wkv_a.bias"] = kv_a[:, D]
        p["wo.bias"] = attn.wo.bias.to(FIT) if attn.wo.bias is not None else torch.zeros(D, dtype=FIT)
    elif q_lora_rank:
        del p["wq_a.bias"]  # zero anyway: the source has no biases
    return p


def _rms(rows: torch.Tensor, cov: torch.Tensor) -> float:
    """RMS over rows and calibration tokens of rows @ x1."""
    return math.sqrt(max(torch.einsum("id,de,ie->", rows, cov, rows).item() / rows.shape[0], 1e-30))


def mla_args(gqa: ModelArgs, layer: LayerMLA, params: dict) -> ModelArgs:
    """ModelArgs of the converted model; rope_pairs only where the pairs are not ordinary RoPE."""
    H, d_h, _ = layer.wq.shape
    r, R = layer.kpe.shape[0], layer.lat.shape[0]
    ordinary = all(p * r == m * d_h for m, p in enumerate(layer.pairs))
    has_bias = "wkv_a.bias" in params
    return replace(gqa, kv_lora_rank=R, q_lora_rank=params["wq_a.weight"].shape[0] if "wq_a.weight" in params else 0,
                   qk_nope_head_dim=d_h, qk_rope_head_dim=r, v_head_dim=d_h, head_dim=d_h, qkv_bias=has_bias,
                   o_bias=has_bias, rope_pairs=None if ordinary else list(layer.pairs), n_kv_heads=H,
                   sliding_window=None)  # stock DeepSeek has no sliding window: attend to everything


# ----------------------------------------------------------------------------- streaming the model

def calibration_samples(documents: list[str], tokenizer, length: int, max_samples: int | None = None,
                        seed: int = 42) -> torch.Tensor:
    """Calibration samples of `length` tokens, built as the official code builds them: start at a
    random unused document, append the following unused ones ("\n\n" between) until the sample
    is long enough, truncate, and drop a sample that runs out of documents before that."""
    torch.manual_seed(seed)
    left, samples = list(range(len(documents))), []
    while left and (max_samples is None or len(samples) < max_samples):
        start = int(torch.randint(0, len(left), (1,)))
        ids, end = [], start
        while len(ids) < length and end < len(left):
            ids += tokenizer.encode(("\n\n" if ids else "") + documents[left[end]])
            end += 1
        left = left[:start] + left[end:]
        if len(ids) >= length:
            samples.append(ids[:length])
    if not samples:
        raise UserError(f"the calibration text has no run of documents as long as {length} tokens")
    return torch.tensor(samples)


def second_moments(norm, h: torch.Tensor) -> torch.Tensor:
    """E[x1 x1^T] in float64, x1 = [norm(h) ; 1]: every statistic the steps need, since each map is linear in x1."""
    cov = torch.zeros(h.shape[-1] + 1, h.shape[-1] + 1, dtype=FIT)
    for b in range(0, len(h), 8):
        x = norm(h[b:b + 8]).reshape(-1, h.shape[-1]).to(FIT)
        x1 = torch.cat([x, torch.ones(len(x), 1, dtype=FIT)], 1)
        cov += x1.T @ x1
    return cov / (h.shape[0] * h.shape[1])


def refit_output(block: Block, converted: Block, h: torch.Tensor, rope_gqa: tuple, rope: tuple,
                 mask: torch.Tensor, damp: float = 1e-3) -> torch.Tensor:
    """o_proj's weight (float64) refitted by least squares: what the original attention outputs at
    the hidden states h, from what the converted heads output there (o_proj's input).
    Every head's output, attention weights included, is a linear function of o_proj's input, so this
    corrects the scores' and the values' errors together, as far as one linear map can."""
    attn = converted.attention
    seen = []
    hook = attn.wo.register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
    n = attn.wo.weight.shape[1]
    own, cross = torch.zeros(n, n, dtype=FIT), torch.zeros(attn.wo.weight.shape[0], n, dtype=FIT)
    for b in range(0, len(h), 8):
        want = block.attention(block.attention_norm(h[b:b + 8]), *rope_gqa, mask)  # (B, T, D)
        attn(converted.attention_norm(h[b:b + 8]), *rope, mask)  # its input scaled (balance_input)
        if attn.wo.bias is not None:  # the bias stays; the weight fits the rest
            want = want - attn.wo.bias
        v = seen.pop().reshape(-1, n).to(FIT)  # (B*T, H*d_v)
        own += v.T @ v
        cross += want.reshape(-1, want.shape[-1]).to(FIT).T @ v
    hook.remove()
    ridge = damp * own.diagonal().mean() * torch.eye(n, dtype=FIT)
    return torch.linalg.solve(own + ridge, cross.T).T


def balance_input(params: dict, rest: dict, cov: torch.Tensor, R: int) -> float:
    """Share the latent's smallness between the attention's input and the latent rows of
    kv_a_proj_with_mqa: the input norm's weight times s1, every map reading it (q_proj or q_a_proj,
    kv_a_proj_with_mqa; their bias columns not) divided by s1, with s1 chosen so the input (over
    the calibration tokens) and the latent rows have the same RMS. Exact; both then sit far above
    float16's smallest normal (6e-5) and q8_0's block scales, where latent rows of RMS ~1e-6
    would not. Edits params and rest in place; returns s1."""
    D = cov.shape[0] - 1
    x_rms = math.sqrt(cov.diagonal()[:D].sum().item() / D)
    w_rms = params["wkv_a.weight"][:R].pow(2).mean().sqrt().item()
    s1 = math.sqrt(w_rms / x_rms)
    rest["attention_norm.weight"] = (rest["attention_norm.weight"].double() * s1).float()
    for k in ("wq.weight", "wq_a.weight", "wkv_a.weight"):
        if k in params:
            params[k] = params[k] / s1
    return s1


def mla_block(gqa: ModelArgs, layer: LayerMLA, block: Block, cov: torch.Tensor, q_lora_rank: int,
              latent_rms: float = LATENT_RMS):
    """A float32 Block with MLA attention for `layer` and the rest of `block`; also its params, args
    and the scale balance_input put on the attention's input."""
    params = to_deepseek(layer, block.attention, cov, q_lora_rank, gqa.qkv_bias or gqa.o_bias,
                         ModelArgs.latent_norm_eps, latent_rms)
    args = mla_args(gqa, layer, params)
    rest = {k: v for k, v in block.state_dict().items() if not k.startswith("attention.")}
    input_scale = balance_input(params, rest, cov, layer.lat.shape[0])
    with torch.device("meta"):
        new = Block(args)
    new.load_state_dict({**{f"attention.{k}": v.float() for k, v in params.items()}, **rest}, assign=True)
    return new, params, rest, args, input_scale


def _run(block: Block, h: torch.Tensor, rope: tuple, mask: torch.Tensor) -> torch.Tensor:
    for b in range(0, len(h), 8):
        h[b:b + 8] = block(h[b:b + 8], *rope, mask)
    return h


@torch.no_grad()
def convert_layers(reader: CheckpointReader, calib: torch.Tensor, rope_dim: int, kv_lora_rank: int,
                   freqfold: int, q_lora_rank: int = 0, upto: str = "bkv_pca", progress=None,
                   rope_select: str = "key", latent_fit: str = "bkv", output_fit: bool = False,
                   latent_rms: float = LATENT_RMS, device: str = "cpu"):
    """Stream the calibration samples through the model one layer at a time and convert each layer;
    yield (i, converted attention params, the layer's other params, converted ModelArgs, the
    attention input's scale (balance_input), the converted float32 Block), all on the CPU.

    As in the official code, RoRoPE is fitted on the original model's activations and the latent
    on the partial-RoPE model's own (each layer sees what the partial-RoPE layers before it
    produce), so two streams of hidden states run side by side.
    rope_select picks rorope's basis (key or score), latent_fit the latent (bkv_pca or
    attention_pca); output_fit refits o_proj on the original model's activations (refit_output);
    latent_rms is the latent's size under its RMSNorm (to_deepseek).

    device: where the work runs (a CUDA GPU: minutes for a 7B model). The hidden states and one
    layer live there; the forward passes are float32, the statistics (second_moments) and every
    fit (eigendecompositions, least squares) float64, where float32's 7 digits would not do: the
    eigenvalues that RoRoPE and the PCA rank span 10 or more orders of magnitude. Each converted
    layer comes back to the CPU for the writer."""
    gqa = reader.args
    with torch.device("meta"):
        emb = torch.nn.Embedding(gqa.vocab_size, gqa.dim)
    reader.fill(emb, "tok_embeddings.", device=device)
    h = emb(calib.to(device))  # (N, T, D) hidden states of the original model
    h_partial = h.clone() if upto == "bkv_pca" else None  # ... and of the partial-RoPE model
    del emb
    for i in range(gqa.n_layers):
        with torch.device(device):  # every tensor the steps make, on the device; not while we yield
            done, h, h_partial = _convert_layer(reader, i, h, h_partial, rope_dim, kv_lora_rank, freqfold,
                                                       q_lora_rank, upto, rope_select, latent_fit, output_fit,
                                                       latent_rms)
        params, rest, args, input_scale, converted = done
        yield (i, {k: v.cpu() for k, v in params.items()}, {k: v.cpu() for k, v in rest.items()}, args,
               input_scale, converted.to("cpu"))
        if progress:
            progress()


def _convert_layer(reader, i, h, h_partial, rope_dim, kv_lora_rank, freqfold, q_lora_rank, upto, rope_select,
                   latent_fit, output_fit, latent_rms):
    """Layer i of convert_layers, run where h is; returns what it yields and the next hidden states."""
    gqa = reader.args
    T = h.shape[1]
    inv_freq = rope_frequencies(gqa.head_dim, gqa.rope_theta, gqa.rope_scaling).to(h.device)
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    rope_gqa = rope_table(inv_freq, T)  # the original model's RoPE
    with torch.device("meta"):
        block = Block(gqa)
    reader.fill(block, f"layers.{i}.", device=h.device)
    cov = second_moments(block.attention_norm, h)
    layer = gqa_as_mla(block.attention, gqa.n_kv_heads, gqa.head_dim)
    if upto in ("rorope", "bkv_pca"):
        layer = rorope(layer, cov, rope_dim, freqfold, gqa.n_kv_heads, rope_select)
    rope = rope_table(inv_freq[torch.tensor(layer.pairs)], T)
    if upto == "bkv_pca":
        partial, *_ = mla_block(gqa, layer, block, cov, 0)
        cov = second_moments(block.attention_norm, h_partial)
        h_partial = _run(partial, h_partial, rope, mask)
        if latent_fit == "attention":
            layer = attention_pca(layer, cov, kv_lora_rank, block.attention.wo.weight)
        else:
            layer = bkv_pca(layer, cov, kv_lora_rank)
    converted, params, rest, args, input_scale = mla_block(gqa, layer, block, cov, q_lora_rank, latent_rms)
    if output_fit:
        w = refit_output(block, converted, h, rope_gqa, rope, mask)
        params["wo.weight"] = w
        converted.attention.wo.weight.data.copy_(w)
    h = _run(block, h, rope_gqa, mask)
    return (params, rest, args, input_scale, converted), h, h_partial


def convert_in_memory(reader: CheckpointReader, calib: torch.Tensor, **kw) -> Transformer:
    """The converted model as one in-memory Transformer (float32): for tests and small models."""
    blocks = list(convert_layers(reader, calib, **kw))
    args = blocks[0][3]
    with torch.device("meta"):
        model = Transformer(args)
    reader.fill(model.tok_embeddings, "tok_embeddings.")
    reader.fill(model.norm, "norm.")
    if model.output is not None:
        reader.fill(model.output, "output.")
    for i, *_, block in blocks:
        model.layers[i] = block
    model.set_rope()
    return model.eval()


# ----------------------------------------------------------------------------- writing the checkpoint

def _mla_config(args: ModelArgs, dtype: torch.dtype) -> dict:
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
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", **_mla_config(args, dtype),
        "intermediate_size": args.hidden_dim, "moe_intermediate_size": args.hidden_dim,
        # every layer dense, in the form each engine reads as dense: transformers and vLLM by
        # first_k_dense_replace, llama.cpp by 0 experts (it requires fewer expert groups than
        # experts, and no groups at all for 0)
        "first_k_dense_replace": args.n_layers, "moe_layer_freq": 1,
        "n_routed_experts": 0, "n_shared_experts": 0, "num_experts_per_tok": None, "n_group": None, "topk_group": None,
        "rope_parameters": rope, "num_nextn_predict_layers": 0,
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
        "architectures": ["Mistral4ForCausalLM"], "model_type": "mistral4", **_mla_config(args, dtype),
        "intermediate_size": args.hidden_dim, "moe_intermediate_size": args.hidden_dim,
        "n_routed_experts": args.n_experts, "num_experts_per_tok": args.n_experts_per_tok,
        "n_shared_experts": 0, "n_group": 1, "topk_group": 1, "norm_topk_prob": True, "routed_scaling_factor": 1.0,
        "first_k_dense_replace": 0, "rope_parameters": rope, "pad_token_id": args.extra.get("pad_token_id"),
    }


def _fraction(part: int, whole: int) -> float:
    """part / whole, nudged up where needed so that int(whole * f) == part, as transformers computes the rotary dim."""
    f = part / whole
    return f if int(whole * f) == part else math.nextafter(f, 1.0)


def target_config(args: ModelArgs, dtype: torch.dtype, settings: dict) -> dict:
    """The written config.json: stock DeepSeek-V3, or Mistral4 for a mixture of experts."""
    return {**(mistral4_config if args.n_experts else deepseek_config)(args, dtype), "transmla": settings}


def write_checkpoint(reader: CheckpointReader, out: Path, layers, dtype: torch.dtype, settings: dict,
                     inputs=(), finish=None) -> dict:
    """Stream converted layers into a stock folder at `out`, atomically (CheckpointWriter); returns its
    config. finish(folder, config), if given, runs on the complete folder before it is put in
    place and returns the extra files to add (name -> text): convert.py's report."""
    layers = iter(layers)
    first = next(layers)
    src = first[3]
    # what every engine reads alike: rms_norm_eps = ENGINE_EPS, and a lm_head of its own (vLLM
    # never ties DeepSeek's). The residual stream is scaled by alpha (embeddings, and o_proj and
    # down_proj, which write into it): RMSNorm(alpha h; alpha^2 eps) = RMSNorm(h; eps) exactly, so
    # every norm, the final one too, sees what it saw with the source's eps.
    alpha = math.sqrt(ENGINE_EPS / src.norm_eps)
    args = replace(src, norm_eps=ENGINE_EPS, tie_embeddings=False)
    config = target_config(args, dtype, settings)
    config["transmla"] = {**settings, "residual_scale": alpha, "source_rms_norm_eps": src.norm_eps}
    with CheckpointWriter(out, config, args, inputs=[reader.folder, *inputs]) as writer:
        embedding = reader.get(hf_name("tok_embeddings.weight"))
        writer.add("tok_embeddings.weight", (embedding.double() * alpha).to(dtype))
        writer.add("norm.weight", reader.get(hf_name("norm.weight")).to(dtype))
        writer.add("output.weight", (embedding if src.tie_embeddings else reader.get(hf_name("output.weight"))).to(dtype))
        scales = config["transmla"]["attention_input_scale"] = []  # written with config.json at stage()
        for i, params, rest, _, input_scale, _ in itertools.chain([first], layers):
            scales.append(input_scale)
            tensors = {**{f"attention.{k}": v for k, v in params.items()}, **rest}
            for k in tensors:
                if k in ("attention.wo.weight", "attention.wo.bias") or k.endswith("w2.weight"):
                    tensors[k] = tensors[k].double() * alpha
            writer.add_layer(i, tensors, dtype)
        staged = writer.stage(source=reader.folder)
        writer.commit(extra_files=finish(staged, config) if finish else None)
    return config


def check_source(reader: CheckpointReader, rope_dim: int, kv_lora_rank: int, q_lora_rank: int):
    """Every tensor of the source has a place in the stock folder, or the run is refused naming it
    before any work: the attention's (q, k, v, o and their biases) are what the conversion
    transforms; every other one must exist, with its shape, in the target the config will declare.
    (Stock DeepSeek-V3 and Mistral4 have no MLP biases, for one: a Llama with mlp_bias cannot be
    written as either without changing what it computes.)"""
    gqa = reader.args
    reader.check()
    d_h = gqa.head_dim
    target = replace(gqa, kv_lora_rank=kv_lora_rank, q_lora_rank=q_lora_rank, qk_nope_head_dim=d_h,
                     qk_rope_head_dim=rope_dim, v_head_dim=d_h, n_kv_heads=gqa.n_heads, sliding_window=None)
    config = target_config(target, reader.stored_dtype(), {})
    declared = checkpoint_tensors(args_from_config(config))
    for ours, (theirs, shape) in checkpoint_tensors(gqa).items():
        if ours.startswith("layers.") and ours.split(".")[2] == "attention":
            continue
        if declared.get(ours, (None, None))[1] != shape:
            raise UserError(f"{reader.folder}: {theirs} has no place in a stock {config['architectures'][0]} "
                            f"checkpoint; converting would drop it and change the model, so nothing is written")


def check_request(args: ModelArgs, rope_dim: int, kv_lora_rank: int, freqfold: int, q_lora_rank: int):
    """Say in one line what is wrong with the request, before any work is done."""
    kind = args.extra.get("model_type")
    if args.is_mla:
        raise UserError(f"this checkpoint is already MLA ({kind}, kv_lora_rank {args.kv_lora_rank}): "
                        "nothing to convert; run it with generate.py or bench.py")
    d_h, L = args.head_dim, args.n_kv_heads * args.head_dim
    if rope_dim <= 0 or rope_dim % 2 or d_h % rope_dim:
        raise UserError(f"--rope-dim {rope_dim}: must be even and divide head_dim {d_h} (e.g. {d_h // 2})")
    collapse = d_h // rope_dim
    if freqfold <= 0 or freqfold % collapse or (d_h // 2) % freqfold:
        raise UserError(f"--freqfold {freqfold}: must be a multiple of head_dim / rope_dim = {collapse} "
                        f"and divide head_dim / 2 = {d_h // 2}")
    if not 0 < kv_lora_rank <= 2 * L - rope_dim:
        raise UserError(f"--kv-lora-rank {kv_lora_rank}: must be between 1 and 2 * n_kv_heads * head_dim "
                        f"- rope_dim = {2 * L - rope_dim} for this model (no compression at the maximum)")
    if q_lora_rank < 0 or q_lora_rank > args.dim:
        raise UserError(f"--q-lora-rank {q_lora_rank}: must be between 0 (full-rank query) and hidden size {args.dim}")


def mla_kernels(kv_lora_rank: int, rope_dim: int) -> str:
    """Which engines run a latent of R + r = kv_lora_rank + rope_dim with their MLA kernels, as
    their sources check it (vLLM 0.33: mla_attention.py's supported head sizes, cpu_mla.py,
    flashattn_mla.py; llama.cpp: ggml-cuda/fattn.cu). transformers runs any size."""
    size = kv_lora_rank + rope_dim
    if size == 576:
        return "R + r = 576 (512 + 64): every MLA kernel of vLLM (GPU and CPU) and llama.cpp's CUDA flash attention"
    vllm = ("vLLM's GPU MLA backends (FlashMLA, FlashInfer, CUTLASS) but not its CPU one or FlashAttention-MLA"
            if size in (320, 512) else "vLLM's Triton MLA backend on GPU only; on CPU set VLLM_MLA_DISABLE=1")
    cpp = "llama.cpp's CUDA flash attention" if size == 320 else "llama.cpp without CUDA flash attention"
    return f"R + r = {size}: {vllm}; {cpp}; 512 + 64 runs everywhere"


# ----------------------------------------------------------------------------- what a run costs

def conversion_memory(args: ModelArgs, n_samples: int, length: int, device: str) -> dict:
    """Bytes a conversion holds at its peak beyond what the process holds before it starts, from the
    config alone: {"device": where the work runs, "host": the CPU's share when that is a GPU (the
    writer), "hidden": the calibration activations alone}. The terms, each a phase's tensors:
    - hidden states: the original model's and the partial-RoPE model's, N x T x D float32 each;
    - at the start, the embedding table (float32) beside them;
    - per layer: the original, partial and converted blocks (float32), the layer's MLA form and its
      fits in float64 (about three copies of q, the up-projections and the latent maps), the
      second moments ((D+1)^2 float64, three), and one chunk of 8 samples in flight (its
      attention scores 8 x H x T x T, its MLP activations);
    - the writer (on the CPU): the embedding as stored, in float64 (scaled), and as written."""
    D, H, d_h, T, V = args.dim, args.n_heads, args.head_dim, length, args.vocab_size
    L = args.n_kv_heads * d_h
    layer = sum(math.prod(shape) for ours, (_, shape) in checkpoint_tensors(args).items() if ours.startswith("layers.0."))
    hidden = 2 * n_samples * T * D * 4
    embedding = V * D * 4
    mla64 = 3 * 8 * (2 * H * d_h * (D + 1) + 3 * H * d_h * L + 2 * L * (D + 1))
    ffn = args.hidden_dim * max(1, args.n_experts_per_tok) if args.n_experts else args.hidden_dim
    chunk = 8 * T * 4 * (6 * D + 3 * ffn + 4 * H * d_h) + 8 * H * T * T * 4
    work = max(hidden + embedding, hidden + 3 * layer * 4 + mla64 + 3 * (D + 1) ** 2 * 8 + chunk)
    writer = V * D * (4 + 8 + 4) + 2 * layer * 8
    if device.startswith("cpu"):
        return {"device": max(work, hidden + writer), "host": 0, "hidden": hidden}
    return {"device": work, "host": writer, "hidden": hidden}


def available_memory(device: str) -> int:
    """Bytes free for a new allocation: the GPU's free memory, or the CPU's MemAvailable."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_fits(need: dict, free: int, device: str, n_samples: int, length: int):
    """UserError, in one line, when the work clearly cannot fit where it runs."""
    if need["device"] <= free:
        return
    fewer = int(n_samples * (free - (need["device"] - need["hidden"])) / need["hidden"] / 1.2)  # activations scale with N
    what = (f"use fewer samples (--calib-tokens {fewer * length}) or another --device" if fewer >= 1 else
            "one layer alone does not fit: use another --device")
    raise UserError(f"converting needs about {need['device'] / 2**30:.1f} GiB on {device} (one layer, its fits and "
                    f"{n_samples} calibration samples x {length} tokens of activations, {need['hidden'] / 2**30:.1f} "
                    f"GiB of them), {free / 2**30:.1f} GiB is free: {what}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="GQA checkpoint: folder, .safetensors or index file (default: embedded SmolLM2)")
    p.add_argument("--out", help="output folder (default: the checkpoint folder's name + '-mla', beside it)")
    p.add_argument("--kv-lora-rank", type=int, default=64, help="R: latent values cached per token per layer")
    p.add_argument("--rope-dim", type=int, default=32, help="r: dims of the shared rope key (qk_rope_head_dim)")
    p.add_argument("--freqfold", type=int, default=4, help="F: adjacent RoPE frequencies folded into one PCA")
    p.add_argument("--q-lora-rank", type=int, default=0, help="low-rank query of this rank (0: full rank)")
    p.add_argument("--method", default="fitted", choices=list(METHODS),
                   help="recipe: 'transmla' is the official method (RoRoPE, FreqFold, BKV-PCA); 'fitted' "
                        "(default) is --latent-fit attention --output-fit on top of it")
    p.add_argument("--latent-fit", choices=("bkv", "attention"),
                   help="the joint latent: 'bkv' balanced key/value PCA (TransMLA), 'attention' PCA weighted "
                        "by what the queries and o_proj read of it")
    p.add_argument("--output-fit", action=argparse.BooleanOptionalAction,
                   help="refit o_proj by least squares so each layer's attention output matches the original's")
    p.add_argument("--rope-select", choices=("key", "score"),
                   help="RoRoPE's basis: 'key' energy (TransMLA) or 'score' energy (queries and keys together)")
    p.add_argument("--calib-text", help="calibration text file (default: the embedded calibration split)")
    p.add_argument("--calib-tokens", type=int, default=128 * 256,
                   help="calibration budget in tokens: at most this // --calib-len samples (documents: one per line)")
    p.add_argument("--calib-len", type=int, default=256, help="tokens per calibration sample")
    p.add_argument("--eval-text", help="text for perplexity before and after (default: the embedded "
                                       "evaluation split for the default model; 'none' to skip)")
    p.add_argument("--dtype", help="dtype of the written weights (default: the input's)")
    p.add_argument("--device", help="where the calibration and fits run: cpu, cuda, cuda:1 (default: cuda if "
                                    "available); the output is the same to float rounding")
    p.add_argument("--latent-rms", type=float, default=LATENT_RMS,
                   help="the latent's RMS under its RMSNorm (default %(default)g; 1e-10: linear to fp32 "
                        "precision, for fp32 and bf16 only; at most 1e-4)")
    args = p.parse_args()

    from evaluate import WindowBar, perplexity
    from fetch import default_or, ensure_texts, read_text
    from tokenizer import load_tokenizer
    t_start = time.perf_counter()
    device = pick_device(args.device)
    folder = default_or(args.ckpt)
    reader = CheckpointReader(folder)
    check_request(reader.args, args.rope_dim, args.kv_lora_rank, args.freqfold, args.q_lora_rank)
    out = Path(args.out) if args.out else folder.parent / f"{folder.name}-mla"
    texts = [t for t in (args.calib_text, args.eval_text) if t and t != "none"]
    out = check_output(out, [folder, *texts])
    replacing = earlier_output(out)
    check_source(reader, args.rope_dim, args.kv_lora_rank, args.q_lora_rank)
    dtype = pick_dtype(args.dtype, "cpu") if args.dtype else reader.stored_dtype()
    if not 0 < args.latent_rms <= 1e-4:  # sqrt(eps) / 10: the norm then is off linear by 0.5%
        raise UserError(f"--latent-rms {args.latent_rms:g}: must be above 0 and at most 1e-4 (the latent norm's "
                        f"sqrt(eps) is 1e-3; beyond 1e-4 it stops being linear)")
    if dtype == torch.float16 and args.latent_rms < FP16_LATENT_RMS:
        why = f"float16 cannot hold a latent of RMS {args.latent_rms:g} (at least {FP16_LATENT_RMS:g})"
        if args.dtype:
            raise UserError(f"--dtype float16: {why}; use bfloat16 or float32, or a larger --latent-rms")
        print(f"note: the source is float16, but {why}: writing bfloat16", file=sys.stderr)
        dtype = torch.bfloat16
    if args.calib_text is None or (args.eval_text is None and args.ckpt is None):
        calib_default, eval_default = ensure_texts()
    calib_text = read_text(args.calib_text or calib_default)
    eval_path = args.eval_text if args.eval_text else (eval_default if args.ckpt is None else None)
    if eval_path == "none":
        eval_path = None
    tok = load_tokenizer(folder)
    documents = [line for line in calib_text.splitlines() if line.strip()]
    calib = calibration_samples(documents, tok, args.calib_len, max(1, args.calib_tokens // args.calib_len))
    eval_ids = tok.encode(read_text(eval_path)) if eval_path else None
    a = reader.args
    if max([calib.max().item(), *(eval_ids or [])]) >= a.vocab_size:
        raise UserError(f"the tokenizer gives ids past the model's vocab_size {a.vocab_size} on the calibration "
                        f"or evaluation text: tokens the checkpoint has no embedding for")
    recipe = {k: default if getattr(args, k) is None else getattr(args, k) for k, default in METHODS[args.method].items()}
    settings = {"method": args.method, **recipe, "kv_lora_rank": args.kv_lora_rank, "rope_dim": args.rope_dim,
                "freqfold": args.freqfold, "q_lora_rank": args.q_lora_rank, "latent_rms": args.latent_rms,
                "calibration": f"{len(calib)} samples x {args.calib_len} tokens"}
    report = {"settings": settings, "source": str(folder), "out": str(out), "device": device}
    need = conversion_memory(a, len(calib), args.calib_len, device)
    free = available_memory(device)
    rss_before = peak_rss_mb()  # on a CPU the conversion's memory comes on top of what this process holds
    report["estimate"] = {"peak_mb": round(need["device"] / 2**20 + (rss_before if device.startswith("cpu") else 0))}
    print(f"cost: about {report['estimate']['peak_mb'] / 1024:.2f} GiB at the peak on {device}"
          + (f" ({rss_before / 1024:.2f} GiB held already + {need['device'] / 2**30:.2f} for the conversion)"
             if device.startswith("cpu") else "")
          + (f" and {need['host'] / 2**30:.2f} GiB on the CPU" if need["host"] else "")
          + f"; {len(calib)} samples x {args.calib_len} tokens: {need['hidden'] / 2**30:.2f} GiB of activations; "
          f"{free / 2**30:.1f} GiB free there"
          + ("; the time follows after two layers" if a.n_layers > 2 else ""), file=sys.stderr)
    check_fits(need, free, device, len(calib), args.calib_len)
    if need["host"] > available_memory("cpu"):  # the writer's share, on the CPU
        raise UserError(f"writing the output needs about {need['host'] / 2**30:.1f} GiB of CPU memory, "
                        f"{available_memory('cpu') / 2**30:.1f} GiB is free")
    before, after = 2 * a.n_kv_heads * a.head_dim, args.kv_lora_rank + args.rope_dim
    report.update(kv_values_per_token_per_layer={"before": before, "after": after},
                  compression=round(before / after, 2))
    bar = progress_bar(total=a.n_layers, desc="calibrate + convert", unit="layer")
    t_layers = time.perf_counter()

    done_at = []  # perf_counter at the end of each of the first two layers

    def progress():
        """Layers done, time per layer and the expected end (tqdm's bar); after the second layer (the
        first pays one-time costs: allocations, kernels' first calls), the whole run's time: the
        set-up and the first layer as they took, every other layer as the second."""
        bar.update()
        if len(done_at) < 2:
            done_at.append(time.perf_counter())
        if bar.n == min(2, a.n_layers):
            now = done_at[-1]
            first = done_at[0] - t_layers
            later = now - done_at[0] if len(done_at) == 2 else first
            total = (t_layers - t_start) + first + later * (a.n_layers - 1)
            report["estimate"]["seconds"] = round(total, 1)
            end = time.strftime("%H:%M:%S", time.localtime(time.time() + total - (now - t_start)))
            if a.n_layers > 2:  # with no layer left there is nothing to foretell
                bar.write(f"layer 0 took {first:.1f} s, layer 1 {later:.1f} s: about {total / 60:.1f} min for all "
                          f"{a.n_layers} layers{' (before the evaluation)' if eval_ids is not None else ''}, "
                          f"done about {end}", file=sys.stderr)

    def finish(staged: Path, config: dict) -> dict:
        """The report, written into the folder before it is put in place (evaluated on it where it stands)."""
        bar.close()
        report["convert_seconds"] = round(time.perf_counter() - t_start, 1)
        report["convert_peak_rss_mb"] = round(peak_rss_mb())
        if device.startswith("cuda"):
            report["convert_peak_device_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20)
        if eval_ids is not None:
            for name, path, what in (("ppl_before", folder, "the original"), ("ppl_after", staged, "the conversion")):
                model, _ = load_model(path, device=device)
                report[name] = round(perplexity(model, eval_ids, 1024, WindowBar(f"perplexity of {what}"))["ppl"], 4)
                del model
            report["eval_text"] = str(eval_path)
        report["total_seconds"] = round(time.perf_counter() - t_start, 1)
        report["peak_rss_mb"] = round(peak_rss_mb())
        return {"convert_report.json": json.dumps(report, indent=2) + "\n"}

    layers = convert_layers(reader, calib, args.rope_dim, args.kv_lora_rank, args.freqfold, args.q_lora_rank,
                            progress=progress, latent_rms=args.latent_rms, device=device, **recipe)
    config = write_checkpoint(reader, out, layers, dtype, settings, inputs=texts, finish=finish)

    rows = [("KV cache values / token / layer", f"{before} -> {after}"), ("compression", f"{before / after:.2f}x")]
    if eval_ids is not None:
        rows.append(("perplexity (eval text)", f"{report['ppl_before']:.2f} -> {report['ppl_after']:.2f}"))
    rows += [("conversion time", f"{report['convert_seconds']}s (estimated {report['estimate'].get('seconds')}s"
                                   + (f"; with evaluation {report['total_seconds']}s)" if eval_ids is not None else ")")),
             ("peak memory", f"{report['convert_peak_rss_mb']} MB converting, {report['peak_rss_mb']} MB overall"
                             + (f"; {report['convert_peak_device_mb']} MB on {device}" if "convert_peak_device_mb" in report else "")
                             + f" (estimated {report['estimate']['peak_mb']} MB)"),
             ("written", f"{out} (stock {config['architectures'][0]}"
                         + ("; it replaced the earlier output there)" if replacing else ")")),
             ("serving", mla_kernels(args.kv_lora_rank, args.rope_dim))]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


if __name__ == "__main__":
    run(main)
