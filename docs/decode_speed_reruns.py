"""Compare two runs of bench.py's decode benchmark: every speed-up of MLA absorbed over GQA in both,
and how far apart they are (issue 21: within 10% on two consecutive runs).

    python bench.py --compile --json run1.json && python bench.py --compile --json run2.json
    python docs/decode_speed_reruns.py run1.json run2.json

Prints a Markdown table, one row per (mode, batch, context): each run's median speed-up with its
range over the rounds, and their relative difference |a - b| / min(a, b); then the largest one.
Exit status 1 when it is above --limit (default 0.10). --table: run 2 as the table of docs/speed.md.
"""
import argparse
import json
import sys


def speedups(path: str) -> dict:
    result = json.load(open(path))
    return {(r["compiled"], r["batch"], r["context"]): r for r in result["speedup"]}, result


def table(result: dict) -> str:
    """One run as the Markdown table of docs/speed.md: ms/token per model and mode (median over the
    rounds), the speed-ups with their ranges, and what the bytes allow."""
    ms = {(r["model"], r["compiled"], r["batch"], r["context"]): r for r in result["decode"]}
    up = {(r["compiled"], r["batch"], r["context"]): r for r in result["speedup"]}
    rows = ["| batch | context | GQA | GQA compiled | MLA naive | MLA absorbed | MLA absorbed compiled "
            "| MLA / GQA eager (range) | MLA / GQA compiled (range) | bytes allow |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for compiled, batch, context in sorted(k for k in up if not k[0]):
        def cell(model, comp):
            r = ms.get((model, comp, batch, context))
            return (f"{r['ms_per_token']:.1f}" if r['ms_per_token'] < 1000 else f"{r['ms_per_token']:.0f}") if r else ""

        def ratio(comp):
            r = up.get((comp, batch, context))
            return f"{r['measured']:.2f}x ({r['min']:.2f}-{r['max']:.2f})" if r else ""
        g, m = ms[("gqa", False, batch, context)], ms[("mla_absorbed", False, batch, context)]
        rows.append(f"| {batch} | {context // 1024}K | {cell('gqa', False)} | {cell('gqa', True)} | "
                    f"{cell('mla_naive', False)} | {cell('mla_absorbed', False)} | {cell('mla_absorbed', True)} | "
                    f"{ratio(False)} | **{ratio(True)}** | {g['memory_ms'] / m['memory_ms']:.2f}x |")
    return "\n".join(rows)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run1")
    p.add_argument("run2")
    p.add_argument("--limit", type=float, default=0.10, help="the largest relative difference allowed")
    p.add_argument("--table", action="store_true", help="also print run 2 as docs/speed.md's table")
    args = p.parse_args()
    (a, ra), (b, rb) = speedups(args.run1), speedups(args.run2)
    if a.keys() != b.keys():
        sys.exit(f"error: the runs measured different points: {sorted(a.keys() ^ b.keys())}")
    print("| mode | batch | context | run 1 | run 2 | difference |")
    print("|---|---:|---:|---|---|---:|")
    worst = 0.0
    for key in sorted(a):
        x, y = a[key], b[key]
        diff = abs(x["measured"] - y["measured"]) / min(x["measured"], y["measured"])
        worst = max(worst, diff)
        print(f"| {'compiled' if key[0] else 'eager'} | {key[1]} | {key[2]} | {x['measured']:.2f}x "
              f"({x['min']:.2f}-{x['max']:.2f}) | {y['measured']:.2f}x ({y['min']:.2f}-{y['max']:.2f}) | {diff:.1%} |")
    print(f"\nlargest relative difference between the runs: {worst:.1%} (limit {args.limit:.0%})")
    for name, r in (("run 1", ra), ("run 2", rb)):
        print(f"{name}: memory read {r['bandwidth_gbs']} GB/s at the start, {r.get('bandwidth_end_gbs')} at the end; "
              f"{len(r.get('warnings', []))} warnings")
    if args.table:
        print("\n" + table(rb))
    sys.exit(1 if worst > args.limit else 0)


if __name__ == "__main__":
    main()
