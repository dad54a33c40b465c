"""How long a user waits for the tokenizer: load_tokenizer and encode of each embedded text.

    python docs/tokenizer_speed.py       # ~10 s on 2 CPU cores; prints the table in docs/tokenizers.md

Times the first load_tokenizer of the embedded SmolLM2 folder (with the import of tokenizer.py
and the tokenizer libraries, as a script pays them once; torch is imported before the clock
starts), then each next load, then encode of each text under assets/ (the calibration and
evaluation splits convert.py and bench.py --ppl read, wiki_train.txt that finetune.py tokenizes,
wiki_eval.txt), with whatever engine load_tokenizer picks. A later number is the best of 3 runs
(the quietest, on a machine shared with other work). It calls nothing but load_tokenizer and
encode, so it runs unchanged against an older tokenizer.py put first on PYTHONPATH (the
repository is appended to the path, not put before it); the first line names the file imported:

    mkdir /tmp/oldtok && git show 3b37097:tokenizer.py > /tmp/oldtok/tokenizer.py
    cp cli.py /tmp/oldtok/ && PYTHONPATH=/tmp/oldtok python docs/tokenizer_speed.py
"""
import importlib
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT))
TEXTS = ("lee_calib.txt", "lee_eval.txt", "wiki_train.txt", "wiki_eval.txt")


def best_of(runs: int, fn):
    """(fastest wall time in seconds, fn's result) over `runs` calls."""
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main():
    folder = ROOT / "assets" / "SmolLM2-135M-Instruct"
    importlib.import_module("cli")  # torch, which every script has imported by then: not timed
    first, _ = best_of(1, lambda: importlib.import_module("tokenizer").load_tokenizer(folder))
    tokenizer = sys.modules["tokenizer"]
    seconds, tok = best_of(3, lambda: tokenizer.load_tokenizer(folder))
    print(f"{tokenizer.__file__}: engine {getattr(tok.engine, 'name', type(tok.engine).__name__)}")
    print("| step | MB | tokens | ms |\n|---|---:|---:|---:|")
    print(f"| import + first load_tokenizer | | | {first * 1e3:.0f} |")
    print(f"| load_tokenizer | | | {seconds * 1e3:.0f} |")
    for name in TEXTS:
        text = (ROOT / "assets" / name).read_text()
        seconds, ids = best_of(3, lambda: tok.encode(text))
        print(f"| encode {name} | {len(text.encode()) / 1e6:.2f} | {len(ids):,} | {seconds * 1e3:.0f} |")


if __name__ == "__main__":
    main()
