"""Benchmarks: decode speed and memory against context length (the reason to convert), and perplexity.

    python bench.py                                   # embedded GQA model vs its default MLA conversion
    python bench.py --compile --plot bench.png        # eager and compiled, and a plot
    python bench.py --ckpt MLA_DIR --baseline GQA_DIR --contexts 1024,8192 --batch 1
    python bench.py --ppl                             # perplexity on the embedded evaluation split
    torchrun --nproc_per_node=2 bench.py --synthetic deepseek-v2-lite --contexts 32768 --batch 4 --dtype bfloat16

Speed. For each model, batch and context: the KV-cache bytes per token, prefill tokens/s (a real
prefill of --prefill tokens), and decode ms/token. Contexts longer than the prefill are reached
by filling the cache with random entries: decode cost does not depend on the values. MLA is
timed in both forms: naive (expand the latent into per-head keys and values every step) and
absorbed (attend over the latent itself). The same run measures the machine: memory read
bandwidth and matmul throughput. Every decode point gets its roofline bound: a step must read
every weight once and the whole cache once (memory_ms = bytes / bandwidth) and do its
multiply-adds (compute_ms = flops / matmul throughput); roofline_ms is the larger. With
--transformers, its Llama (GQA at 8K) and DeepSeek-V3 (MLA at 16K) code run the same weights in
the same run, the baseline users have today.

Repeatable ratios: both models are loaded, then --rounds rounds (3) time every point; at each
point the two models' decode steps alternate one by one (GQA, MLA, MLA, GQA, ...) after a warm-up
that reaches steady state, so the machine slowing down for a second slows both, and a round's
speed-up is the median over its pairs of steps (interleaved_rounds, time_decode). A point's
ms/token is the median over the rounds with its range; so is its speed-up. Naive MLA and the
prefills run after the rounds. The memory bandwidth and the matmul rate are measured at the start
and the end; a warning says when either moved by more than 15%, or when a speed-up's range over
the rounds is wider than its distance from 1 (the machine was too busy to tell).

Under torchrun (or with --tp) the same protocol compares TPLA with head-parallel MLA on the same
checkpoint and ranks (tp_speed); --synthetic times the paper's setting, the first --layers layers
of DeepSeek-V2-Lite's shape (R = 512, r = 64, 16 heads, 64 routed experts of which 6 per token, 2
shared, a dense first layer) with random weights, written once under assets/synthetic/ (nothing
can be downloaded here; decode time does not depend on the values), each rank's weights and peak
memory reported against the whole checkpoint's size.

Perplexity: evaluate.py's protocol (non-overlapping windows of --ctx tokens); under --tp tpla the
second half of every window is scored by real TPLA decode steps.

The last stdout line is one JSON object with the headline figures (perplexity; each speed-up,
median and range); --json FILE writes the whole record (every point, the machine, the roofline).
"""
import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

import tpla
from checkpoint import load_model
from cli import (UserError, first_on_rank_0, init_distributed, launched, peak_rss_mb, pick_device, pick_dtype,
                 read_text, run)
from evaluate import WindowBar, perplexity
from fetch import SYNTHETIC, default_or, ensure_default_conversion, ensure_synthetic
from model import MLA, MoE, Router
from writer import check_output_file


# ----------------------------------------------------------------------------- the machine

def sig(x: float, digits: int = 4) -> float:
    """x to `digits` significant digits: milliseconds of a 100 KB model and of a 32K cache alike."""
    return float(f"{x:.{digits}g}")


def sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_seconds(fn, device: str, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def memory_bandwidth(device: str) -> float:
    """Read bandwidth in GB/s: summing 1 GiB, far larger than any CPU cache."""
    x = torch.ones(2 ** 28, device=device)
    return x.numel() * 4 / median_seconds(x.sum, device, 7) / 1e9


def matmul_throughput(device: str, dtype: torch.dtype) -> float:
    """GFLOP/s of a large square matmul in the model's dtype: the most a decode step can get."""
    a = torch.randn(2048, 2048, device=device).to(dtype)
    return 2 * 2048 ** 3 / median_seconds(lambda: a @ a, device, 7) / 1e9


def latent_score_throughput(attn: MLA, device: str, dtype: torch.dtype, tokens: int = 8192, batch: int = 4) -> float:
    """GFLOP/s of absorbed MLA's score matmul at its decode shape: per sequence, H query rows
    of width R + r against `tokens` cached rows. So few rows that a CPU's GEMM runs it far
    below the square rate: this, not the bytes, is what bounds absorbed decode on a CPU."""
    q = torch.randn(batch, attn.n_heads, attn.R + attn.r, device=device).to(dtype)
    kv = torch.randn(batch, tokens, attn.R + attn.r, device=device).to(dtype)
    flops = 2 * batch * attn.n_heads * (attn.R + attn.r) * tokens
    return flops / median_seconds(lambda: torch.bmm(q, kv.mT), device, 7) / 1e9


# ----------------------------------------------------------------------------- what one decode step must do

def _routed(model):
    """Per MoE layer: (experts held, experts in all, k per token, parameters of one expert)."""
    for layer in model.layers:
        ffn = layer.feed_forward
        if isinstance(ffn, MoE) and len(ffn.experts):
            one = sum(p.numel() for p in next(iter(ffn.experts.values())).parameters())
            yield len(ffn.experts), ffn.n_experts, ffn.gate.k, one


def weight_bytes(model, batch: int | None = None) -> int:
    """Bytes of weights one decode step reads: all of them, except that an untied embedding
    table is only indexed (one row per token) while a tied one is read whole by the output. With
    `batch`, a mixture of experts' routed experts count as many as the batch's tokens reach: k of E
    per token, so E (1 - (1 - k/E)^batch) distinct ones if routing is uniform (of them, this
    rank's share of the experts); without, every expert held."""
    n = sum(p.numel() * p.element_size() for p in model.parameters())
    if model.output is not None:
        e = model.tok_embeddings.weight
        n -= e.numel() * e.element_size()
    size = model.tok_embeddings.weight.element_size()
    for held, n_experts, k, one in _routed(model) if batch else ():
        reached = n_experts * (1 - (1 - k / n_experts) ** batch)
        n -= round(held * (1 - reached / n_experts) * one * size)
    return n


def step_bytes(model, context: int, batch: int) -> int:
    """The least a decode step must read: every weight it uses once and every cached token once."""
    return weight_bytes(model, batch) + batch * context * model.kv_bytes_per_token()


def step_flops(model, context: int, batch: int) -> int:
    """Multiply-adds x 2 of one decode step: the matmuls of the weights (of a mixture of experts,
    the router and per token k / E of the routed experts held), then attention over `context`
    cached tokens (per layer, per cached token, per sequence)."""
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, (torch.nn.Linear, Router)))
    for held, n_experts, k, one in _routed(model):
        matmul -= round(held * (1 - k / n_experts) * one)
    if model.output is None:
        matmul += model.tok_embeddings.weight.numel()
    attn = 0
    for layer in model.layers:
        a = layer.attention
        if not isinstance(a, MLA):
            attn += 2 * a.n_heads * a.head_dim  # q.k and p.v for every query head
        elif isinstance(a, tpla.TPLA):  # every head, over this rank's latent shard and rope dims
            attn += a.n_heads * (2 * a.w_uk.shape[-1] + a.r)
        elif a.impl == "naive":  # expand the latent into keys and values, then attend per head
            attn += a.R * a.n_heads * (a.d_nope + a.d_v) + a.n_heads * (a.d_nope + a.r + a.d_v)
        else:  # q.[c; k_pe] and p.c per head
            attn += a.n_heads * (2 * a.R + a.r)
    return 2 * batch * (matmul + context * attn)


# ----------------------------------------------------------------------------- timing our models

def fill_cache(model, context: int):
    """Stand-in for a prefill of `context` tokens: random cache entries (decode time does not
    depend on them), one random block of 256 tokens repeated, so filling 6 GB costs a copy, not a
    random number per value; the later steps write at positions context, context + 1, ..."""
    g = torch.Generator(device=model.tok_embeddings.weight.device).manual_seed(0)
    for layer in model.layers:
        for buf in layer.attention.cache.buffers():  # tokens are the second-last dim of every cache
            block = torch.empty_like(buf.narrow(-2, 0, min(256, context))).normal_(generator=g)
            for a in range(0, context, block.shape[-2]):
                n = min(block.shape[-2], context - a)
                buf.narrow(-2, a, n).copy_(block.narrow(-2, 0, n))


@torch.no_grad()
def time_decode(step, models: list, context: int, batch: int, steps: int, device: str, budget_s: float = 20.0,
                lockstep: bool = False) -> list[list[float]]:
    """ms of single decode steps, `context` tokens already cached, of each of `models` (given
    as a list, so that one model may appear once), their steps alternating one by one (A B, B A,
    A B, ...): a change of the machine's speed, within seconds, falls on all of them alike, and
    the i-th steps of two models form a pair. First a warm-up that reaches steady state: at least
    2 steps of each (the first compiles, when compiling) and until every model's last two agree
    within 10% (at most 8), so what ran before (other caches, a compile) is not timed. Then
    `steps` timed steps of each, fewer for slow points (naive MLA at long context) once
    `budget_s` is spent. lockstep (ranks of one model under torchrun, whose collectives must
    match): exactly 3 warm-up steps and all `steps`, whatever the clock says.
    Every model's cache is allocated at once (the embedded model's GQA and MLA at 32K, batch 4: 6.0 + 1.5 GB).
    Returns each model's list of ms, in order."""
    for model in models:
        model.setup_caches(batch, context + steps + 10)
        fill_cache(model, context)
    token = [torch.zeros(batch, 1, dtype=torch.long, device=device) for _ in models]
    pos = [context] * len(models)
    graphs = device.startswith("cuda")  # CUDA graphs reuse their outputs: say a new step begins

    def one(i):
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        sync(device)
        t0 = time.perf_counter()
        token[i] = step(models[i], token[i], torch.tensor([pos[i]], device=device), 0.0, None).clone()
        sync(device)
        pos[i] += 1
        return time.perf_counter() - t0

    rounds = 0

    def round_():  # one step of each model; every other round in the reverse order
        nonlocal rounds
        out = [0.0] * len(models)
        for i in range(len(models)) if rounds % 2 == 0 else reversed(range(len(models))):
            out[i] = one(i)
        rounds += 1
        return out

    def steady(warm):
        return len(warm) >= 2 and all(abs(b / a - 1) <= 0.1 for a, b in zip(warm[-2], warm[-1]))
    warm = [round_() for _ in range(3)] if lockstep else []
    while not lockstep and not steady(warm) and len(warm) < 8:
        warm.append(round_())
        if sum(map(sum, warm)) > budget_s and len(warm) >= 2:
            break
    times = []
    for _ in range(steps):
        times.append(round_())
        if not lockstep and len(times) >= 3 and sum(map(sum, times)) > budget_s:
            break
    for model in models:
        model.clear_caches()
    return [[1e3 * t[i] for t in times] for i in range(len(models))]


def time_decode_ms(step, model, context: int, batch: int, steps: int, device: str) -> float:
    """Median ms of one model's decode step (time_decode with one model)."""
    return statistics.median(time_decode(step, [model], context, batch, steps, device)[0])


@torch.no_grad()
def prefill_tokens_per_s(model, batch: int, n_tokens: int, device: str) -> float:
    model.setup_caches(batch, n_tokens)
    tokens = torch.randint(0, model.args.vocab_size, (batch, n_tokens), device=device)
    pos = torch.arange(n_tokens, device=device)
    seconds = median_seconds(lambda: model(tokens, pos), device, 2)
    model.clear_caches()
    return batch * n_tokens / seconds


def set_mla_impl(model, impl: str):
    for layer in model.layers:
        if isinstance(layer.attention, MLA):
            layer.attention.impl = impl


# ----------------------------------------------------------------------------- transformers, same weights

@torch.no_grad()
def transformers_decode_ms(folder: Path, context: int, batch: int, steps: int, dtype) -> float:
    """transformers' own decode with a cache of `context` random entries, grown by its DynamicCache."""
    from transformers import AutoModelForCausalLM, DynamicCache
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    cfg, g = model.config, torch.Generator().manual_seed(0)
    cache = DynamicCache(config=cfg)
    for i in range(cfg.num_hidden_layers):
        if hasattr(cfg, "kv_lora_rank"):  # DeepSeek caches the normed latent and the rope key
            shapes = (batch, 1, context, cfg.kv_lora_rank), (batch, 1, context, cfg.qk_rope_head_dim)
        else:
            d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
            shapes = ((batch, cfg.num_key_value_heads, context, d),) * 2
        cache.update(*(torch.randn(s, generator=g).to(dtype) for s in shapes), i)
    token = torch.zeros(batch, 1, dtype=torch.long)
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        out = model(input_ids=token, past_key_values=cache, cache_position=torch.tensor([context + i]),
                    position_ids=torch.tensor([[context + i]] * batch), use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


# ----------------------------------------------------------------------------- the speed benchmarks

def speed(args, device: str, dtype: torch.dtype) -> dict:
    """GQA against its MLA conversion, decode ms/token at every (batch, context): both models
    loaded first, then --rounds rounds over every point (eager, and compiled with --compile), each
    timing GQA's and MLA absorbed's decode steps alternately, one by one (interleaved_rounds).
    Naive MLA, the slow reference, runs once per point after the rounds, and the prefills last, so
    their multi-gigabyte expansions cannot slow what is compared."""
    from generate import compile_decode_step, decode_one_token
    folders = {"gqa": default_or(args.baseline), "mla": Path(args.ckpt) if args.ckpt else ensure_default_conversion()}
    result, machine = new_result(args, device, dtype)
    if max(args.contexts) > args.prefill:
        print(f"contexts above {args.prefill} tokens are reached by filling the cache with random entries")
    models = {name: load_model(folder, device=device, dtype=dtype)[0] for name, folder in folders.items()}
    if not models["mla"].args.is_mla or models["gqa"].args.is_mla:
        raise UserError("bench.py compares a GQA --baseline with an MLA --ckpt")
    for name, model in models.items():
        result["kv_bytes_per_token"][name] = model.kv_bytes_per_token()
        result["weight_bytes"][name] = weight_bytes(model)
    rate = latent_score_throughput(models["mla"].layers[0].attention, device, dtype)
    result["latent_score_gflops"] = round(rate, 1)
    print(f"absorbed MLA's score matmul ({models['mla'].layers[0].attention.n_heads} rows per sequence) "
          f"runs at {rate:.0f} GFLOP/s here, {rate / machine[1]:.0%} of the square rate")
    set_mla_impl(models["mla"], "absorb")
    steps = {"eager": decode_one_token}
    if args.compile:
        torch._dynamo.config.cache_size_limit = 256  # one graph per cache shape, by design
        steps["compiled"] = compile_decode_step(device)
    times, ratios = interleaved_rounds(steps, {"gqa": models["gqa"], "mla_absorbed": models["mla"]}, args, device)
    warnings = machine_drift(result, device, dtype)  # measured again, now that the compared points are done
    times.update(naive_and_prefill(result, models, args, device, decode_one_token))
    for (label, batch, context, mode), ms in sorted(times.items(), key=lambda kv: (kv[0][0], kv[0][3], kv[0][1], kv[0][2])):
        model = models["gqa" if label == "gqa" else "mla"]
        set_mla_impl(model, "naive" if label == "mla_naive" else "absorb")
        result["decode"].append(point(machine, model, model.kv_bytes_per_token(), label, batch, context, ms,
                                      compiled=mode == "compiled"))
    for mode, batch, context in ((m, b, c) for m in steps for b in args.batch for c in args.contexts):
        record, warning = speedup(ratios[batch, context, mode], args.rounds, f"{mode} batch {batch} context {context}")
        result.setdefault("speedup", []).append({"batch": batch, "context": context, "compiled": mode == "compiled",
                                                 **record})
        warnings += [warning] if warning else []
    if args.transformers:
        result["transformers"] = against_transformers(result, models, folders, args, device, dtype)
    print_points(result, f"({args.rounds} rounds)")
    print(speedup_table(result))
    finish_warnings(result, warnings)
    result["peak_rss_mb"] = round(peak_rss_mb())
    return result


def tp_speed(args, device: str, dtype: torch.dtype) -> dict:
    """Under torchrun: decode ms/token of head-parallel MLA and of TPLA, same checkpoint, same
    ranks, one run, by the same protocol (interleaved_rounds, in lockstep: the ranks' collectives
    must match). Times are rank 0's (the all-reduces keep the ranks in step); bytes are per rank,
    the cache the largest rank's (heads split unevenly: what has to fit)."""
    from generate import decode_one_token
    rank, world, device = init_distributed(device)
    say = print if rank == 0 else (lambda *a, **k: None)
    ckpt = first_on_rank_0(ensure_synthetic, args.synthetic, args.layers, dtype) if args.synthetic else args.ckpt
    where = tpla.place(ckpt, args.tp, args.tpla_transform, device)
    result, machine = new_result(args, device, dtype, world, say)
    result.update(world_size=world, tpla_transform=args.tpla_transform)
    models = {}
    for mode in [args.tp] if args.tp else ["heads", "tpla"]:
        models[mode] = model = where.load(dtype, mode)
        per_rank = gather(model.kv_bytes_per_token(), world)  # heads split unevenly (SmolLM2's 3 KV heads on 2 ranks)
        result.setdefault("kv_bytes_per_token_per_rank", {})[mode] = per_rank
        result["kv_bytes_per_token"][mode] = max(per_rank)
        result["weight_bytes"][mode] = weight_bytes(model)
        if "ranks" not in result:  # what each rank holds after loading one model
            report_ranks(result, model, where.folder, rank, world, say)
    times, ratios = interleaved_rounds({"eager": decode_one_token}, models, args, device, lockstep=True,
                                       reverse_models=True, say=say)
    torch.distributed.barrier()
    warnings = machine_drift(result, device, dtype)
    for mode, batch, context in ((m, b, c) for m in models for b in args.batch for c in args.contexts):
        result["decode"].append(point(machine, models[mode], result["kv_bytes_per_token"][mode], mode, batch, context,
                                      times[mode, batch, context, "eager"], world_size=world))
    print_points(result, f"(rank 0's times and bytes, the largest rank's cache; {world} ranks, {args.rounds} rounds)", say)
    for batch, context in ((b, c) for b in args.batch for c in args.contexts if len(models) == 2):
        record, warning = speedup(ratios[batch, context, "eager"], args.rounds, f"batch {batch} context {context}")
        m = step_bytes(models["heads"], context, batch) / step_bytes(models["tpla"], context, batch)
        f = step_flops(models["heads"], context, batch) / step_flops(models["tpla"], context, batch)
        result.setdefault("tpla_speedup", []).append({"batch": batch, "context": context, **record,
                                                      "in_bytes": sig(m, 3), "in_flops": sig(f, 3)})
        say(f"tpla over heads, batch {batch} context {context}: {record['measured']:.2f}x measured "
            f"({record['min']:.2f}-{record['max']:.2f} over {args.rounds} rounds), {m:.2f}x in bytes, {f:.2f}x in flops")
        warnings += [warning] if warning else []
    finish_warnings(result, warnings, say)
    return result


def new_result(args, device: str, dtype: torch.dtype, world: int = 1, say=print) -> tuple[dict, tuple]:
    """The run's record, and the machine measured at the start: (memory read bandwidth in GB/s,
    every rank at once: its share of the machine's; matmul GFLOP/s in the models' dtype)."""
    if world > 1:
        torch.distributed.barrier()
    bw = memory_bandwidth(device)
    if world > 1:
        torch.distributed.barrier()
    flops = matmul_throughput(device, dtype)
    say(f"machine{f', per rank with {world} ranks running' if world > 1 else ''}: {torch.get_num_threads()} "
        f"threads, memory read {bw:.1f} GB/s, {dtype} matmul {flops:.0f} GFLOP/s")
    return {"bandwidth_gbs": round(bw, 2), "matmul_gflops": round(flops, 1), "device": device,
            "dtype": str(dtype).removeprefix("torch."), "threads": torch.get_num_threads(), "rounds": args.rounds,
            "synthetic_cache": True, "kv_bytes_per_token": {}, "weight_bytes": {}, "prefill": [], "decode": []}, (bw, flops)


def interleaved_rounds(steps: dict, models: dict, args, device: str, lockstep: bool = False,
                       reverse_models: bool = False, say=print):
    """--rounds rounds over every (batch, context, step) point; at each, the models' decode steps
    alternate one by one (time_decode), and every other round takes the steps (with
    reverse_models, the models too) in the reverse order, so neither always runs first. Returns each (model, batch, context, step)'s
    medians, one per round, and each (batch, context, step)'s speed-ups of the first model over
    the second (when there are two), one per round: the median over the round's pairs of steps."""
    times, ratios = {}, {}
    for rnd in range(args.rounds):
        order = list(models)[::-1] if reverse_models and rnd % 2 else list(models)
        for batch in args.batch:
            for context in args.contexts:
                for mode in steps if rnd % 2 == 0 else list(steps)[::-1]:
                    ms = dict(zip(order, time_decode(steps[mode], [models[m] for m in order], context, batch,
                                                     args.new_tokens, device, lockstep=lockstep)))
                    for name in models:
                        times.setdefault((name, batch, context, mode), []).append(statistics.median(ms[name]))
                    line = ", ".join(f"{name} {statistics.median(ms[name]):.1f}" for name in models) + " ms/token"
                    if len(models) == 2:
                        a, b = (ms[name] for name in models)
                        ratios.setdefault((batch, context, mode), []).append(statistics.median(x / y for x, y in zip(a, b)))
                        line += f", {ratios[batch, context, mode][-1]:.2f}x"
                    say(f"round {rnd + 1}/{args.rounds}: {mode} batch {batch} context {context}: {line}", file=sys.stderr)
    return times, ratios


def naive_and_prefill(result: dict, models: dict, args, device: str, step) -> dict:
    """After the compared rounds: naive MLA once per point (its times, to add to the points), and
    every model's prefill tokens/s (into result["prefill"])."""
    set_mla_impl(models["mla"], "naive")
    times = {}
    for batch in args.batch:
        for context in args.contexts:
            ms = time_decode_ms(step, models["mla"], context, batch, args.new_tokens, device)
            times["mla_naive", batch, context, "eager"] = [ms]
            print(f"mla_naive eager batch {batch} context {context}: {ms:.1f} ms/token", file=sys.stderr)
    for name, model in models.items():
        for batch in args.batch:
            tps = prefill_tokens_per_s(model, batch, args.prefill, device)
            result["prefill"].append({"model": name, "batch": batch, "tokens": args.prefill, "tokens_per_s": round(tps, 1)})
            print(f"{name}: prefill {args.prefill} tokens x batch {batch}: {tps:.0f} tokens/s", file=sys.stderr)
    return times


def point(machine: tuple, model, kv_bytes: int, label: str, batch: int, context: int, ms: list, **extra) -> dict:
    """One decode point of the record: ms/token (median and range over the rounds) against its
    roofline, from the machine measured at the start (bandwidth, matmul rate), the model's weights
    and kv_bytes per token."""
    bw, flops = machine
    mem_ms = (weight_bytes(model, batch) + batch * context * kv_bytes) / bw / 1e6
    comp_ms = step_flops(model, context, batch) / flops / 1e6
    s_ = spread(ms)
    return {"model": label, "context": context, "batch": batch, "compiled": extra.pop("compiled", False),
            "ms_per_token": s_["median"], "ms_min": s_["min"], "ms_max": s_["max"],
            "roofline_ms": sig(max(mem_ms, comp_ms)), "memory_ms": sig(mem_ms), "compute_ms": sig(comp_ms),
            "cache_mb": sig(batch * context * kv_bytes / 1e6), **extra}


def speedup(ratios: list, rounds: int, where: str) -> tuple[dict, str | None]:
    """A speed-up's median and range over the rounds, and a warning when the range is wider than
    its distance from 1 (the machine was too busy to tell)."""
    s_ = spread(ratios)
    record = {"measured": s_["median"], "min": s_["min"], "max": s_["max"]}
    if rounds > 1 and s_["max"] - s_["min"] > abs(s_["median"] - 1):
        return record, (f"{where}: the speed-up's range over the rounds ({s_['min']:.2f}-{s_['max']:.2f}) is wider "
                        "than its distance from 1")
    return record, None


def print_points(result: dict, note: str, say=print):
    say(f"{'model':<13}{'batch':>6}{'context':>9}{'mode':>10}{'ms/token':>10}{'range':>17}{'memory_ms':>11}"
        f"{'compute_ms':>12}{'x roofline':>12}{'cache MB':>10}   {note}")
    for r in result["decode"]:
        say(f"{r['model']:<13}{r['batch']:>6}{r['context']:>9}{'compiled' if r['compiled'] else 'eager':>10}"
            f"{r['ms_per_token']:>10.1f}{r['ms_min']:>8.1f}-{r['ms_max']:<8.1f}{r['memory_ms']:>11.1f}"
            f"{r['compute_ms']:>12.1f}{r['ms_per_token'] / r['roofline_ms']:>12.2f}{r['cache_mb']:>10.0f}")


def finish_warnings(result: dict, warnings: list, say=print):
    for w in warnings:
        say(f"warning: {w}", file=sys.stderr)
    result["warnings"] = warnings


def gather(value, world: int) -> list:
    """Every rank's value, on every rank."""
    out = [None] * world
    torch.distributed.all_gather_object(out, value)
    return out


def report_ranks(result: dict, model, folder: Path, rank: int, world: int, say):
    """What each rank holds after loading, against the whole checkpoint: its weights and peak memory."""
    held = gather({"rank": rank, "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
                   "peak_rss_mb": round(peak_rss_mb())}, world)
    whole = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    result.update(checkpoint_bytes=whole, ranks=held)
    for h in held:
        say(f"rank {h['rank']}: weights {h['param_bytes'] / 1e9:.2f} GB ({h['param_bytes'] / whole:.0%} of the "
            f"checkpoint's {whole / 1e9:.2f} GB), peak memory after loading {h['peak_rss_mb'] / 1e3:.2f} GB")


def against_transformers(result: dict, models: dict, folders: dict, args, device: str, dtype: torch.dtype) -> list:
    """transformers' own decode of the same weights (Llama at 8K, DeepSeek-V3 at 16K, batch 1)
    against ours at the same point (measured now if it is not on the grid)."""
    from generate import decode_one_token
    rows = []
    for kind, name, context, ours in (("llama", "gqa", 8192, "gqa"), ("deepseek_v3", "mla", 16384, "mla_absorbed")):
        theirs = transformers_decode_ms(folders[name], context, 1, min(args.new_tokens, 4), dtype)
        mine = next((r["ms_per_token"] for r in result["decode"] if r["model"] == ours
                     and r["context"] == context and r["batch"] == 1 and not r["compiled"]), None)
        if mine is None:  # not on the grid: measure ours at the same point
            set_mla_impl(models[name], "absorb")
            mine = time_decode_ms(decode_one_token, models[name], context, 1, args.new_tokens, device)
        rows.append({"model": kind, "context": context, "batch": 1, "ms_per_token": round(theirs, 1),
                     "ours_ms_per_token": round(mine, 1), "speedup": round(theirs / mine, 2)})
        print(f"transformers {kind}, context {context}, batch 1: {theirs:.1f} ms/token; ours {mine:.1f} "
              f"({theirs / mine:.2f}x)", file=sys.stderr)
    return rows


# ----------------------------------------------------------------------------- perplexity

def ppl(args, device: str, dtype: torch.dtype) -> dict:
    """Perplexity of --ckpt on --ppl's text (evaluate.perplexity); under --tp tpla the second half of
    every window by TPLA decode steps (TPLA is exact in its prefill form only)."""
    from fetch import ensure_texts
    from tokenizer import load_tokenizer
    path = args.ppl or ensure_texts()[1]
    text = read_text(path)
    where = tpla.place(args.ckpt, args.tp, args.tpla_transform, device)
    ids = load_tokenizer(where.folder).encode(text)[: args.max_tokens]
    model = where.load(dtype)
    t0 = time.perf_counter()
    bar = WindowBar("perplexity" + (f" ({where.mode} x{where.world})" if where.mode else ""), disable=where.rank != 0)
    result = perplexity(model, ids, args.ctx, bar, decode_form=where.mode == "tpla")
    result.update(ckpt=str(where.folder), text=str(path), seconds=round(time.perf_counter() - t0, 1))
    if where.mode:
        result.update(tp=where.mode, world_size=where.world)
        if where.mode == "tpla":
            result.update(tpla_transform=where.transform)
    if where.rank == 0:
        print(f"perplexity {result['ppl']:.4f} over {result['tokens']} predicted tokens "
              f"({result['windows']} windows of {args.ctx}), {result['ppl_decode']:.4f} over the "
              f"{result['tokens_decode']} of the second halves, in {result['seconds']}s")
    return result


# ----------------------------------------------------------------------------- the report

def machine_drift(result: dict, device: str, dtype: torch.dtype, limit: float = 0.15) -> list[str]:
    """Measure the memory bandwidth and the matmul rate again at the end of a run (into result's
    bandwidth_end_gbs, matmul_end_gflops) and warn where either moved by more than `limit` from
    the start: other work on the machine took its share while the points were timed."""
    bw, flops = memory_bandwidth(device), matmul_throughput(device, dtype)
    result.update(bandwidth_end_gbs=round(bw, 2), matmul_end_gflops=round(flops, 1))
    warnings = []
    for what, start, end, unit in (("memory bandwidth", result["bandwidth_gbs"], bw, "GB/s"),
                                   ("matmul rate", result["matmul_gflops"], flops, "GFLOP/s")):
        if abs(end / start - 1) > limit:
            warnings.append(f"the {what} moved from {start:.1f} to {end:.1f} {unit} during the run: "
                            f"a busy machine? the timings may not mean much")
    return warnings


def spread(xs: list[float]) -> dict:
    """Median and range of repeated measurements."""
    return {"median": sig(statistics.median(xs)), "min": sig(min(xs)), "max": sig(max(xs))}


def speedup_table(result: dict) -> str:
    """GQA ms / MLA-absorbed ms at every (batch, context, mode), per round: median and range;
    beside it what the bytes and the roofline allow."""
    t = {(r["model"], r["batch"], r["context"], r["compiled"]): r for r in result["decode"]}
    lines = ["speed-up of MLA absorbed over GQA, median (range over the rounds), and what the bytes and the roofline allow:"]
    for s_ in result.get("speedup", []):
        g, m = (t[name, s_["batch"], s_["context"], s_["compiled"]] for name in ("gqa", "mla_absorbed"))
        lines.append(f"  batch {s_['batch']} context {s_['context']:>6} {'compiled' if s_['compiled'] else 'eager   '}: "
                     f"{s_['measured']:.2f}x ({s_['min']:.2f}-{s_['max']:.2f}) measured, "
                     f"{g['memory_ms'] / m['memory_ms']:.2f}x in bytes, {g['roofline_ms'] / m['roofline_ms']:.2f}x by the roofline")
    return "\n".join(lines)


def pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install matplotlib") from None
    return plt


def plot(result: dict, path: str):
    plt = pyplot()
    fig, axes = plt.subplots(1, len({r["batch"] for r in result["decode"]}), figsize=(11, 4.5), squeeze=False)
    for ax, batch in zip(axes[0], sorted({r["batch"] for r in result["decode"]})):
        series = {}
        for r in result["decode"]:
            if r["batch"] == batch:
                series.setdefault((r["model"], r["compiled"]), []).append(r)
        for (model, compiled), rs in sorted(series.items()):
            y = [r["ms_per_token"] for r in rs]  # the median, a bar over the range of the rounds
            spread = [[m - r.get("ms_min", m) for m, r in zip(y, rs)], [r.get("ms_max", m) - m for m, r in zip(y, rs)]]
            line = ax.errorbar([r["context"] for r in rs], y, yerr=spread, fmt="o-", capsize=3,
                               label=model + (" compiled" if compiled else ""))[0]
            if not compiled and model != "mla_naive":  # the roofline, in the model's colour
                ax.plot([r["context"] for r in rs], [r["roofline_ms"] for r in rs], ":", color=line.get_color())
        ax.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="decode ms / token",
               title=f"batch {batch} (dotted: roofline)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"decode, {result['device']} {result['dtype']}, {result['threads']} threads, "
                 f"{result['bandwidth_gbs']} GB/s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


HEADLINE = ("ppl", "tokens", "ppl_decode", "tokens_decode", "tp", "world_size", "device", "dtype", "bandwidth_gbs",
            "bandwidth_end_gbs", "kv_bytes_per_token", "speedup", "tpla_speedup", "warnings")


def headline(result: dict, json_path: str | None) -> dict:
    """The last stdout line: the figures a script reads (perplexity; each speed-up with its range;
    the caches' bytes; the warnings), not every point; --json writes the whole record (and its
    path is the last key)."""
    keep = {k: result[k] for k in HEADLINE if k in result}
    for key in ("speedup", "tpla_speedup"):  # not the bytes' and flops' ratios: those are in the record
        if key in keep:
            keep[key] = [{k: v for k, v in r.items() if k in ("batch", "context", "compiled", "measured", "min", "max")}
                         for r in keep[key]]
    return {**keep, "json": json_path} if json_path else keep


# ----------------------------------------------------------------------------- command line

def main():
    args = parse_args()
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    if args.ppl is not None:
        result = ppl(args, device, dtype)
    elif launched() or args.tp or args.synthetic:
        result = tp_speed(args, device, dtype)
    else:
        result = speed(args, device, dtype)
    if launched() and int(os.environ["RANK"]):
        return  # rank 0 reports
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    if args.plot and "decode" in result:
        plot(result, args.plot)
    print(json.dumps(headline(result, args.json)))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="checkpoint (speed: the MLA model, default the embedded model's default "
                                  "conversion; --ppl: the model to score, default the embedded model)")
    p.add_argument("--baseline", help="GQA checkpoint to compare against (default: the embedded model)")
    p.add_argument("--contexts", default="1024,4096,16384,32768", help="comma-separated context lengths")
    p.add_argument("--batch", default="1,4", help="comma-separated batch sizes")
    p.add_argument("--new-tokens", type=int, default=8, help="timed decode steps per point and model (after a "
                                                             "warm-up to steady state)")
    p.add_argument("--rounds", type=int, default=3, help="rounds over every point, the compared models interleaved")
    p.add_argument("--prefill", type=int, default=1024, help="tokens of the real prefill that is timed")
    p.add_argument("--compile", action="store_true", help="also time the torch.compile'd decode step")
    p.add_argument("--transformers", action="store_true",
                   help="also time transformers' own decode of the same weights (Llama at 8K, DeepSeek-V3 at 16K, batch 1)")
    p.add_argument("--json", help="also write the JSON result here")
    p.add_argument("--plot", help="write a plot of ms/token against context to this PNG")
    p.add_argument("--ppl", nargs="?", const="", metavar="TEXT",
                   help="measure perplexity on this text file instead (no file: the embedded evaluation split)")
    p.add_argument("--ctx", type=int, default=1024, help="perplexity window length in tokens")
    p.add_argument("--max-tokens", type=int, help="perplexity: use only the first N tokens of the text")
    p.add_argument("--synthetic", choices=sorted(k for k, c in SYNTHETIC.items() if c["model_type"].startswith("deepseek")),
                   help="time TPLA against head-parallel on this real model's shape with random weights "
                        "(written once under assets/synthetic/), instead of --ckpt")
    p.add_argument("--layers", type=int, default=4, help="--synthetic: how many of the model's layers")
    tpla.add_placement_flags(p)
    args = p.parse_args()
    check_args(args)
    return args


def check_args(args: argparse.Namespace):
    """Everything about the command line that can fail, before any work; --contexts and --batch
    become lists of ints."""
    inputs = [p_ for p_ in (args.ckpt, args.baseline, args.ppl) if p_]
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path:
            check_output_file(path, inputs, flag)
    if args.synthetic and args.ppl is not None:
        raise UserError("--synthetic has random weights: its perplexity means nothing; give --ckpt with --ppl")
    if args.synthetic and not 1 <= args.layers <= SYNTHETIC[args.synthetic]["num_hidden_layers"]:
        raise UserError(f"--layers {args.layers}: {args.synthetic} has {SYNTHETIC[args.synthetic]['num_hidden_layers']} layers")
    if args.ppl is not None:
        if args.ctx < 3:
            raise UserError("--ctx must be at least 3")
        return
    try:
        args.contexts = [int(c) for c in args.contexts.split(",")]
        args.batch = [int(b) for b in args.batch.split(",")]
    except ValueError:
        raise UserError("--contexts and --batch take comma-separated integers, e.g. 1024,4096") from None
    if min(args.contexts + args.batch) < 1 or min(args.new_tokens, args.prefill, args.layers, args.rounds) < 1:
        raise UserError("contexts, batch sizes, --new-tokens, --prefill, --layers and --rounds must be positive")
    if args.synthetic and args.ckpt:
        raise UserError("--synthetic and --ckpt: give one of them")
    if args.plot:
        pyplot()  # fail now, not after the benchmark
    if args.transformers and importlib.util.find_spec("transformers") is None:
        raise UserError("--transformers needs transformers: pip install transformers")


if __name__ == "__main__":
    run(main)
