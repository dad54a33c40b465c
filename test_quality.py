"""Tests that fail when the method gets worse, where the equivalence ladder cannot see it.

    pytest test_quality.py -s        # -s prints each measured value beside its floor

At full rank every basis is exact, so test_equivalence.py cannot tell which components a lossy
conversion keeps. Here:
- each lossy step keeps what it claims on a tiny model: RoRoPE the leading key (or score)
  components of every frequency block, BKV-PCA the top-R eigenvalues of the balanced
  keys and values, the attention-weighted PCA the smallest weighted error any rank-R latent has;
- on the embedded model, the default conversion's perplexity stays under a ceiling set from its
  measured value, and each fit of the fitted method is no worse than its absence;
- fine-tuning lowers the distillation loss (for TPLA's split too, with --tpla), and the rotation
  fitted for TPLA lowers its held-out error.
"""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from checkpoint import load_model
from conftest import VOCAB, _converted, assert_close


@pytest.fixture(scope="module")
def layer0(tmp_path_factory):
    """Layer 0 of a tiny random Llama (4 query heads, 2 KV heads of 16 dims) in MLA form (step 1), with
    the second moments of its attention input over random hidden states."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from checkpoint import CheckpointReader
    from convert import gqa_as_mla, second_moments
    from model import Block
    folder = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    ref = LlamaForCausalLM(LlamaConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                       num_key_value_heads=2, intermediate_size=96, vocab_size=VOCAB))
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ref.save_pretrained(folder)
    reader = CheckpointReader(folder)
    with torch.device("meta"):
        block = Block(reader.args)
    reader.fill(block, "layers.0.")
    # hidden states with a few dominant directions, as real ones have: the PCAs have something to find
    g = torch.Generator().manual_seed(8)
    h = torch.randn(16, 32, 64, generator=g) @ (torch.randn(64, 64, generator=g) * torch.logspace(0, -1.5, 64))
    with torch.no_grad():
        cov = second_moments(block.attention_norm, h)
        exact = gqa_as_mla(block.attention, reader.args.n_kv_heads, reader.args.head_dim)
    return exact, cov, block, reader.args


def _energy(rows: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """E[(row . x1)^2] for each row: the second moment each output dim carries on the calibration inputs."""
    return torch.einsum("id,de,ie->i", rows, cov, rows)


def _top(m: torch.Tensor, k: int) -> torch.Tensor:
    return torch.linalg.eigvalsh(m).flip(0)[:k]


@pytest.mark.parametrize("select", ["key", "score"])
@torch.no_grad()
def test_rorope_keeps_the_leading_components(layer0, select):
    """RoRoPE (step 2), FreqFold 4 on 2 KV heads of 16 dims, RoPE kept on 4 of 16 pairs: in each block
    of F frequencies it keeps the components that carry the most key energy (select "key": the
    top eigenvalues of the block's key covariance, real and imaginary halves together) or the most
    score energy (select "score": E[q_i^2] E[k_i^2], the top eigenvalues of ck cq)."""
    from convert import rorope
    exact, cov, _, a = layer0
    F, r = 4, 8
    layer = rorope(exact, cov, r, F, a.n_kv_heads, select)
    n_pairs, block = exact.kpe.shape[0] // 2, a.n_kv_heads * F
    n_blocks, keep = n_pairs // block, r // 2 // (n_pairs // block)
    kept_re, kept_im = layer.kpe[: r // 2], layer.kpe[r // 2:]
    q_all = exact.qmap @ exact.wq  # (H, L, D + 1): every head's rope-space query, before RoRoPE
    q_kept = layer.qmap @ layer.wq  # (H, r, D + 1): after, the kept pairs only
    for b in range(n_blocks):
        s = slice(b * block, (b + 1) * block)
        re, im = exact.kpe[:n_pairs][s], exact.kpe[n_pairs:][s]
        ck = re @ cov @ re.T + im @ cov @ im.T
        k_energy = _energy(kept_re[b * keep:(b + 1) * keep], cov) + _energy(kept_im[b * keep:(b + 1) * keep], cov)
        if select == "key":
            got, want = k_energy, _top(ck, keep)
        else:
            si = slice(n_pairs + b * block, n_pairs + (b + 1) * block)
            cq = sum(q[s] @ cov @ q[s].T + q[si] @ cov @ q[si].T for q in q_all)
            qk = q_kept[:, list(range(b * keep, (b + 1) * keep)) + list(range(r // 2 + b * keep, r // 2 + (b + 1) * keep))]
            q_energy = sum(_energy(q[:keep], cov) + _energy(q[keep:], cov) for q in qk)
            got, want = k_energy * q_energy, torch.linalg.eigvals(ck @ cq).real.sort(descending=True).values[:keep]
        share = (want.sum() / (torch.linalg.eigvals(ck @ cq).real.sum() if select == "score" else ck.trace())).item()
        print(f"block {b}: kept {select} energy {got.sum().item():.6g}, top {keep} eigenvalues {want.sum().item():.6g} "
              f"({share:.0%} of the block)")
        assert_close(f"RoRoPE ({select}) block {b}: kept energy per component vs the top eigenvalues",
                     got.sort(descending=True).values / want[0], want / want[0], 1e-9)


@torch.no_grad()
def test_bkv_pca_keeps_the_top_eigenvalues(layer0):
    """BKV-PCA (step 3) at R = 8 of 56: the latent's energy is the sum of the top R eigenvalues of the
    balanced keys and values [k_nope / alpha ; v], alpha the ratio of their mean norms."""
    from convert import bkv_pca, rorope
    exact, cov, _, a = layer0
    partial = rorope(exact, cov, 8, 4, a.n_kv_heads)
    n = partial.n_lat_k
    k, v = partial.lat[:n], partial.lat[n:]
    alpha = _energy(k, cov).sqrt().mean() / _energy(v, cov).sqrt().mean()
    z = torch.cat([k / alpha, v])
    eig = torch.linalg.eigvalsh(z @ cov @ z.T).flip(0)
    for R in (4, 8, 24):
        kept = _energy(bkv_pca(partial, cov, R).lat, cov).sum()
        print(f"R = {R}: latent energy {kept.item():.6g}, top-{R} eigenvalues {eig[:R].sum().item():.6g} "
              f"({(eig[:R].sum() / eig.sum()).item():.0%} of {eig.sum().item():.6g})")
        assert abs(kept / eig[:R].sum() - 1) < 1e-9


def _attention_error(full, approx, cov: torch.Tensor, wo: torch.Tensor) -> tuple[float, float]:
    """What attention loses when `approx` (rank-R latent) stands for `full` (the exact latent), as
    fractions of what it computes: query-weighted key error sum_h E[(q_h . dk_h)^2] over sum_h
    E[(q_h . k_h)^2], and o_proj-weighted value error sum_h E|W_O,h dv_h|^2 over sum_h E|W_O,h v_h|^2."""
    H, d_h, _ = full.uk.shape
    wo_h = wo.double().view(-1, H, d_h).transpose(0, 1)  # (H, D, d_h)
    err_k = err_v = tot_k = tot_v = 0.0
    for h in range(H):
        cq = full.wq[h] @ cov @ full.wq[h].T  # E[q_h q_h^T], (d_h, d_h)
        k, v = full.uk[h] @ full.lat, full.uv[h] @ full.lat  # (d_h, D + 1) each
        dk, dv = k - approx.uk[h] @ approx.lat, v - approx.uv[h] @ approx.lat
        err_k += (cq @ dk @ cov @ dk.T).trace().item()
        tot_k += (cq @ k @ cov @ k.T).trace().item()
        err_v += (wo_h[h] @ dv @ cov @ dv.T @ wo_h[h].T).trace().item()
        tot_v += (wo_h[h] @ v @ cov @ v.T @ wo_h[h].T).trace().item()
    return err_k / tot_k, err_v / tot_v


@torch.no_grad()
def test_attention_pca_has_the_least_weighted_error(layer0):
    """The attention-weighted PCA (step 3, --latent-fit attention) at R = 8: its weighted error
    (key error share + value error share, _attention_error) is the least any rank-R latent can
    have, the sum of the dropped eigenvalues of G^1/2 C G^1/2 (G the error's quadratic form, C the
    latent's second moment), and below BKV-PCA's."""
    from convert import attention_pca, bkv_pca, rorope
    exact, cov, block, a = layer0
    wo = block.attention.wo.weight
    partial = rorope(exact, cov, 8, 4, a.n_kv_heads)
    H, d_h, n = partial.uk.shape
    wo_h = wo.double().view(-1, H, d_h).transpose(0, 1)
    gk = sum(partial.uk[h].T @ partial.wq[h] @ cov @ partial.wq[h].T @ partial.uk[h] for h in range(H))
    gv = sum(partial.uv[h].T @ wo_h[h].T @ wo_h[h] @ partial.uv[h] for h in range(H))
    C = partial.lat @ cov @ partial.lat.T
    G = gk / (gk @ C).trace() + gv / (gv @ C).trace()
    e, E = torch.linalg.eigh(G)
    G_half = (E * e.clamp_min(0).sqrt()) @ E.T
    eig = torch.linalg.eigvalsh(G_half @ C @ G_half).flip(0)
    for R in (4, 8, 16):
        fit = sum(_attention_error(partial, attention_pca(partial, cov, R, wo), cov, wo))
        bkv = sum(_attention_error(partial, bkv_pca(partial, cov, R), cov, wo))
        print(f"R = {R}: weighted error attention PCA {fit:.6g} (least possible {eig[R:].sum().item():.6g}), "
              f"BKV-PCA {bkv:.6g}")
        assert abs(fit / eig[R:].sum().item() - 1) < 1e-6
        assert fit < bkv


# ----------------------------------------------------------------------------- the embedded model

STEPS_1_5_CEILING = 60.0  # measured 56.52 (2026-12-01), 56.51 (2026-12-07): steps 1-5, 16 x 256 calibration tokens
BLOCK_FIT_STEPS = 50  # the default's block fit, shortened for the suite
FITTED_CEILING = 53.0  # measured 49.46 (2026-12-07, the latent on the original stream; 50.05 on the partial one): steps 1-5 and 50 block-fit steps


@torch.no_grad()
def test_embedded_conversion_quality_floors():
    """SmolLM2-135M at the default setting (R = 64, r = 32, F = 4) with 16 x 256 calibration tokens
    of the news split, perplexity on the first 2 x 1024 evaluation tokens (measured 2026-12-01:
    original 28.80, transmla 90.41, bkv + refit 57.95, attention 84.84, steps 1-5 56.52; 2026-12-07:
    the latent on the original stream 55.28, fitted 49.46). The default (fitted: steps 1-5 with the
    latent on the original stream and BLOCK_FIT_STEPS of block fit) stays under FITTED_CEILING,
    steps 1-5 under theirs; each fit is no worse than its absence, alone and on top of the others."""
    from checkpoint import CheckpointReader, load_model
    from cli import read_text
    from convert import Recipe, calibration_samples, convert_in_memory
    from evaluate import perplexity
    from fetch import ensure_default_model, ensure_texts
    from tokenizer import load_tokenizer
    folder = ensure_default_model()
    calib_path, eval_path = ensure_texts()
    tok = load_tokenizer(folder)
    calib = calibration_samples([d for d in read_text(calib_path).splitlines() if d.strip()], tok, 256, 16)
    ids = tok.encode(read_text(eval_path))[: 2 * 1024]
    ppl = {"original": perplexity(load_model(folder)[0], ids, 1024)["ppl"]}
    for name, latent_fit, stream, output_fit, block_fit in (
            ("transmla", "bkv", "partial", False, 0), ("bkv + refit", "bkv", "partial", True, 0),
            ("attention", "attention", "partial", False, 0), ("steps 1-5", "attention", "partial", True, 0),
            ("original stream", "attention", "original", True, 0), ("fitted", "attention", "original", True, BLOCK_FIT_STEPS)):
        recipe = Recipe(rope_dim=32, kv_lora_rank=64, freqfold=4, latent_fit=latent_fit, latent_stream=stream,
                        output_fit=output_fit, block_fit=block_fit)
        model = convert_in_memory(CheckpointReader(folder), calib, recipe)
        ppl[name] = perplexity(model, ids, 1024)["ppl"]
        print(f"{name:>15}: perplexity {ppl[name]:.2f} (original {ppl['original']:.2f})")
    assert ppl["fitted"] < FITTED_CEILING and ppl["steps 1-5"] < STEPS_1_5_CEILING
    assert ppl["bkv + refit"] <= ppl["transmla"] and ppl["steps 1-5"] <= ppl["attention"]  # the o_proj refit
    assert ppl["attention"] <= ppl["transmla"] and ppl["steps 1-5"] <= ppl["bkv + refit"]  # the weighted latent
    assert ppl["original stream"] <= ppl["steps 1-5"]  # the latent fitted on the original model's hidden states
    assert ppl["fitted"] <= ppl["original stream"]  # the block fit
    assert ppl["original"] < ppl["fitted"]


def test_calibration_sampler():
    """The calibration docs/accuracy.md states: 92 samples of 256 tokens from the embedded calibration
    split, the official sampler with seed 42 (the same samples on every run, others with another
    seed); each sample starts at the start of a document, and no document starts two."""
    from convert import calibration_samples
    from cli import read_text
    from fetch import ensure_default_model, ensure_texts
    from tokenizer import load_tokenizer
    tok = load_tokenizer(ensure_default_model())
    docs = [d for d in read_text(ensure_texts()[0]).splitlines() if d.strip()]
    calib = calibration_samples(docs, tok, 256, 128)
    assert calib.shape == (92, 256)
    assert torch.equal(calib, calibration_samples(docs, tok, 256, 128))
    assert not torch.equal(calib[:8], calibration_samples(docs, tok, 256, 8, seed=0))
    from collections import Counter
    encoded = [tuple(tok.encode(d)[:256]) for d in docs]  # the corpus holds a few documents twice
    starts = [next((e for e in encoded if tuple(s[:len(e)].tolist()) == e), None) for s in calib]
    print(f"{len(docs)} documents ({len(set(encoded))} distinct) -> {calib.shape[0]} samples of "
          f"{calib.shape[1]} tokens, each starting at a document")
    assert None not in starts
    assert all(n <= Counter(encoded)[e] for e, n in Counter(starts).items())  # no document used twice


# ----------------------------------------------------------------------------- fine-tuning and the fitted rotation lower what they fit

def test_finetune_lowers_distillation_loss(tiny, tmp_path):
    """A few AdamW steps on the attention of a lossy conversion lower its KL to the original model,
    measured on a fixed held-out batch."""
    from finetune import batch, distill_step, load_student
    folder = tiny["llama"][0]
    student_dir = _converted(folder, tmp_path / "mla", R=6)
    teacher, _ = load_model(folder)
    teacher.requires_grad_(False)
    ids = torch.randint(0, VOCAB, (4000,), generator=torch.Generator().manual_seed(9))
    held_out = torch.randint(0, VOCAB, (4, 33), generator=torch.Generator().manual_seed(10))
    gen = torch.Generator().manual_seed(0)
    student, unfolded, params = load_student(student_dir, "cpu", torch.float32, "attn", ids[:128].view(4, 32))
    opt = torch.optim.AdamW(params, lr=1e-3)
    ctx = torch.autocast("cpu", enabled=False)
    before, _ = distill_step(student, teacher, held_out[:, :-1], held_out[:, 1:], 0.0, ctx, backward=False)
    for _ in range(60):
        distill_step(student, teacher, *batch(ids, 4, 32, gen), 0.0, ctx, chunk=48)  # chunks: several per batch
        opt.step()
        opt.zero_grad()
    after, _ = distill_step(student, teacher, held_out[:, :-1], held_out[:, 1:], 0.0, ctx, backward=False)
    print(f"held-out KL(teacher || student): {before:.4f} -> {after:.4f} after 60 steps")
    assert after < 0.8 * before  # measured 0.065 -> 0.045


def _sharp_mla(tiny, tmp_path) -> Path:
    """tiny llama with its queries scaled up so that its attention is sharp, as a trained model's is
    (a random tiny model attends almost uniformly, and a per-shard softmax then costs little),
    saved in tmp_path / "gqa" and converted at R = 40 into tmp_path / "mla"."""
    import copy
    sharp = copy.deepcopy(tiny["llama"][1])
    with torch.no_grad():
        for layer in sharp.model.layers:
            layer.self_attn.q_proj.weight.mul_(6.0)
    sharp.save_pretrained(tmp_path / "gqa")
    return _converted(tmp_path / "gqa", tmp_path / "mla", R=40)


def test_finetune_for_tpla_lowers_its_loss(tiny, tmp_path):
    """finetune.py --tpla 2 (every second window's second half in simulated TPLA form), 60 steps, over
    6 seeds (data, held-out windows and batches all drawn anew): on held-out windows the KL to the
    teacher with the second halves in TPLA x2 form falls, and in MLA form does not rise, in every
    seed; averaged over the seeds the TPLA-form KL ends below that of the same steps in MLA form
    only. On the sharp tiny model: a uniform attention's per-shard softmax costs nothing."""
    import tpla
    from finetune import batch, distill_step, load_student
    student_dir = _sharp_mla(tiny, tmp_path)
    teacher, _ = load_model(tmp_path / "gqa")
    teacher.requires_grad_(False)
    ctx = torch.autocast("cpu", enabled=False)
    tpla_form = {1: [], 2: []}  # trained with --tpla 1 / 2: the TPLA-form KL after training, per seed
    for seed in range(6):
        ids = torch.randint(0, VOCAB, (4000,), generator=torch.Generator().manual_seed(100 + seed))
        held_out = torch.randint(0, VOCAB, (8, 33), generator=torch.Generator().manual_seed(200 + seed))
        for world in (1, 2):
            student, _, params = load_student(student_dir, "cpu", torch.float32, "attn", ids[:128].view(4, 32))

            def kl(form: int) -> float:  # held-out, the second halves in MLA form (1 shard) or TPLA x2 form
                tpla.simulate(student, form, start=16)
                return distill_step(student, teacher, held_out[:, :-1], held_out[:, 1:], 0.0, ctx, backward=False)[0]

            before = kl(1), kl(2)
            tpla.simulate(student, world, start=16, rows=torch.tensor([1, 3]) if world > 1 else None)
            opt, gen = torch.optim.AdamW(params, lr=1e-3), torch.Generator().manual_seed(seed)
            for _ in range(60):
                distill_step(student, teacher, *batch(ids, 4, 32, gen), 0.0, ctx)
                opt.step()
                opt.zero_grad()
            after = kl(1), kl(2)
            tpla_form[world].append(after[1])
            if world == 2:
                print(f"seed {seed}, --tpla 2: held-out KL in MLA form {before[0]:.5f} -> {after[0]:.5f}, in TPLA "
                      f"form {before[1]:.5f} -> {after[1]:.5f} (MLA-form training: {tpla_form[1][-1]:.5f})")
                assert after[1] < before[1] and after[0] <= before[0]
    mean = {w: sum(v) / len(v) for w, v in tpla_form.items()}
    print(f"TPLA-form KL after training, mean of 6 seeds: --tpla 2 {mean[2]:.5f}, MLA form only {mean[1]:.5f}")
    assert mean[2] < mean[1]  # measured 0.01610 < 0.01633


def test_rotation_fitted_for_tpla(tiny, tmp_path):
    """python tpla.py: the checkpoint with its latent rotated by fit_rotation is the same model on
    one device, and in TPLA x2 decode (simulated) on held-out tokens it is closer to the exact
    model than the checkpoint it came from. It keeps convert.py's scales, so finetune.py trains it
    as it trains the original: unfolded, its latent rows have the original's RMS (O(1)), not ~1e-7."""
    import tpla
    from finetune import load_student
    folder = _sharp_mla(tiny, tmp_path)
    calib = torch.randint(0, VOCAB, (32, 64), generator=torch.Generator().manual_seed(11))
    held_out = torch.randint(0, VOCAB, (8, 64), generator=torch.Generator().manual_seed(12))
    record = tpla.rotate_for_tpla(folder, tmp_path / "rotated", 2, calib, log=print)
    original, rotated = load_model(folder)[0], load_model(tmp_path / "rotated")[0]
    with torch.no_grad():
        exact = original(held_out)
        assert_close("rotated checkpoint vs original, one device", rotated(held_out), exact, 1e-5)
        kl = {}
        for name, model in (("original", original), ("rotated", rotated)):
            logits = tpla.simulate(model, 2, start=32)(held_out)
            kl[name] = F.kl_div(F.log_softmax(logits[:, 32:], -1), F.log_softmax(exact[:, 32:], -1),
                                log_target=True, reduction="batchmean").item()
    print(f"calibration error per layer {record['error_before']} -> {record['error_after']}; held-out KL of "
          f"TPLA x2 decode from the exact model: original {kl['original']:.5f}, rotated {kl['rotated']:.5f}")
    assert kl["rotated"] < 0.9 * kl["original"]  # measured 0.316 -> 0.258
    rms = {}
    for name, path in (("original", folder), ("rotated", tmp_path / "rotated")):
        student = load_student(path, "cpu", torch.float32, "attn", calib[:4])[0]
        rms[name] = torch.stack([b.attention.wkv_a.weight[: b.attention.R].pow(2).mean().sqrt()
                                 for b in student.layers])
    print(f"latent rows' RMS per layer, unfolded for training: original {rms['original'].tolist()}, "
          f"rotated {rms['rotated'].tolist()}")
    assert_close("unfolded latent rows' RMS, rotated vs original", rms["rotated"], rms["original"],
                 1e-5 * rms["original"].max().item())


def test_align_for_tpla(tiny, tmp_path):
    """python tpla.py --align: after the rotation, each layer's maps trained so that its TPLA x2
    and MLA outputs both match its MLA output (align_for_tpla). On held-out tokens TPLA decode
    (simulated) is closer to the exact model than with the rotation alone, and the aligned model
    on one device stays closer to the exact model than TPLA decode of the rotated one was."""
    import tpla
    folder = _sharp_mla(tiny, tmp_path)
    calib = torch.randint(0, VOCAB, (32, 64), generator=torch.Generator().manual_seed(11))
    held_out = torch.randint(0, VOCAB, (8, 64), generator=torch.Generator().manual_seed(12))
    tpla.rotate_for_tpla(folder, tmp_path / "rotated", 2, calib, log=print)
    record = tpla.rotate_for_tpla(folder, tmp_path / "aligned", 2, calib, log=print, align=200)
    with torch.no_grad():
        exact = load_model(folder)[0](held_out)[:, 32:]
        kl = {}
        for name in ("rotated", "aligned"):
            model = load_model(tmp_path / name)[0]
            kl[name, "one device"] = _kl(model(held_out)[:, 32:], exact)
            kl[name, "TPLA x2"] = _kl(tpla.simulate(model, 2, start=32)(held_out)[:, 32:], exact)
    print(f"align error per layer (before, after) {record['align_error']}; held-out KL from the exact model: "
          + ", ".join(f"{a} {b} {v:.5f}" for (a, b), v in kl.items()))
    assert all(after <= before for before, after in record["align_error"])
    assert any(after < before for before, after in record["align_error"])
    assert kl["aligned", "TPLA x2"] < 0.95 * kl["rotated", "TPLA x2"]  # measured 0.00726 against 0.00805
    assert kl["aligned", "one device"] < 0.1 * kl["rotated", "TPLA x2"]  # measured 0.00022


def _kl(logits: torch.Tensor, exact: torch.Tensor) -> float:
    """KL(exact || logits) per token, both (B, T, V)."""
    return F.kl_div(F.log_softmax(logits.flatten(0, 1), -1), F.log_softmax(exact.flatten(0, 1), -1),
                    log_target=True, reduction="batchmean").item()
