"""What the smaller cache buys in llama.cpp: decode speed of the embedded SmolLM2-135M (original)
and its default conversion (R 64 + r 32) at 4K and 16K tokens of context, timed by llama.cpp's own
llama-bench (same threads; `-d` fills the context by a real prefill before the timed tokens), next
to bench.py's figures for the same two models on the same machine, run right after. (--contexts
takes more: each repetition prefills its depth, and on the 2-core machine of docs/engines.md a 32K
prefill of the f32 model takes minutes, so 4K-32K at 2 repetitions ran past 13 minutes for the
original alone.)

    python docs/llama_bench.py --llama-cpp LLAMA_CPP_DIR --converter-python CONV/bin/python \
        --llama-bench llama-build/bin/llama-bench --json docs/llama_bench.json

Both GGUFs are f32 weights made by the documented sequence (docs/quantization.py's f32_gguf), with
llama.cpp's default f16 cache and flash attention left to llama.cpp ("auto"); bench.py runs its
default (float32, eager, batch 1). llama-bench's t/s is turned into ms/token.
"""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]

from quantization import f32_gguf, folders  # noqa: E402


def llama_bench(binary: str, gguf: Path, contexts: list[int], tokens: int, reps: int, threads: int) -> dict:
    """{str(context): (ms/token mean, its standard deviation)} from llama-bench's JSON."""
    out = subprocess.run([binary, "-m", str(gguf), "-p", "0", "-n", str(tokens), "-d", ",".join(map(str, contexts)),
                          "-t", str(threads), "-r", str(reps), "-o", "json"], check=True, capture_output=True,
                         text=True).stdout
    rows = {}
    for r in json.loads(out):
        ts, sd = r["avg_ts"], r["stddev_ts"]
        rows[str(r["n_depth"])] = (1000 / ts, 1000 * sd / ts ** 2)  # keyed as JSON keys them
    return rows


def bench_py(contexts: list[int], work: Path) -> dict:
    """{context: {"gqa": ms, "mla": ms}} of bench.py's decode on the same two models."""
    path = work / "bench.json"
    subprocess.run([sys.executable, str(ROOT / "bench.py"), "--contexts", ",".join(map(str, contexts)), "--batch", "1",
                    "--json", str(path)], check=True, cwd=ROOT)
    return json.loads(path.read_text())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llama-cpp", type=Path, required=True, help="llama.cpp source tree (convert_hf_to_gguf.py)")
    p.add_argument("--converter-python", default=sys.executable)
    p.add_argument("--llama-bench", default="llama-bench")
    p.add_argument("--contexts", default="4096,16384")
    p.add_argument("--tokens", type=int, default=16, help="decoded tokens per timing")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    original, converted = folders(sys.executable)
    result = {"contexts": contexts, "threads": args.threads}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name, folder in (("original", original), ("converted", converted)):
            gguf = work / f"{name}.gguf"
            f32_gguf(folder, gguf, args.llama_cpp, args.converter_python)
            result[name] = llama_bench(args.llama_bench, gguf, contexts, args.tokens, args.reps, args.threads)
            print(name, result[name], flush=True)
        result["bench.py"] = bench_py(contexts, work)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    print_table(result)


def print_table(result: dict) -> None:
    """Markdown rows: llama.cpp's ms/token (mean +- standard deviation over the repetitions) and
    bench.py's (median over its rounds, MLA absorbed), each model and the speed-up."""
    decode = {(d["model"], d["context"]): d["ms_per_token"] for d in result["bench.py"]["decode"]
              if d["batch"] == 1 and not d.get("compiled") and d["model"] in ("gqa", "mla_absorbed")}
    print("| context | llama.cpp: original / converted ms per token | speed-up | bench.py: original / converted | speed-up |")
    print("|---:|---:|---:|---:|---:|")
    for c in result["contexts"]:
        (o, so), (m, sm) = result["original"][str(c)], result["converted"][str(c)]
        g, a = decode[("gqa", c)], decode[("mla_absorbed", c)]
        print(f"| {c} | {o:.2f} +- {so:.2f} / {m:.2f} +- {sm:.2f} | {o / m:.2f}x | {g:.2f} / {a:.2f} | {g / a:.2f}x |")


if __name__ == "__main__":
    main()
