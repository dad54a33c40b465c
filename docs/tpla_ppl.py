"""Perplexity of MLA checkpoints on one device and under TPLA decode, in one process (docs/tpla.md).

    python docs/tpla_ppl.py assets/SmolLM2-135M-Instruct-mla assets/SmolLM2-135M-Instruct-mla-tpla2

For each checkpoint and each text (the embedded evaluation split and the held-out Wikipedia
articles, the first --max-tokens of each, windows of --ctx): `ppl` and `ppl_decode` on one device,
and the same with the second half of every window decoded in TPLA form over --world ranks
(tpla.simulate: what `torchrun --nproc_per_node=2 bench.py --ppl --tp tpla` computes, to 6e-7 in
the logits, test_tp_two_ranks; one process, no torchrun), and TPLA's ppl_decode against the
single device's.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tpla  # noqa: E402
from checkpoint import load_model  # noqa: E402
from cli import read_text  # noqa: E402
from evaluate import perplexity  # noqa: E402
from fetch import ensure_texts, ensure_wiki_texts  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpts", nargs="+", help="MLA checkpoint folders")
    p.add_argument("--world", type=int, default=2, help="TPLA ranks")
    p.add_argument("--max-tokens", type=int, default=8192, help="the first N tokens of each text")
    p.add_argument("--ctx", type=int, default=1024, help="window length; its second half is decoded")
    a = p.parse_args()
    texts = {"evaluation split": ensure_texts()[1], "held-out Wikipedia": ensure_wiki_texts()[1]}
    print(f"| checkpoint | text | one device: ppl / ppl_decode | TPLA x{a.world}: ppl / ppl_decode | ppl_decode |")
    print("|---|---|---|---|---|")
    for ckpt in a.ckpts:
        tok = load_tokenizer(Path(ckpt))
        ids = {name: tok.encode(read_text(path))[: a.max_tokens] for name, path in texts.items()}
        for name in texts:
            model = load_model(ckpt)[0]  # afresh for each text: simulate() turns its layers into TPLA in place
            one = perplexity(model, ids[name], a.ctx)
            split = perplexity(tpla.simulate(model, a.world, start=a.ctx // 2), ids[name], a.ctx)
            print(f"| {Path(ckpt).name} | {name} | {one['ppl']:.2f} / {one['ppl_decode']:.2f} | {split['ppl']:.2f} / "
                  f"{split['ppl_decode']:.2f} | {split['ppl_decode'] / one['ppl_decode'] - 1:+.1%} |", flush=True)


if __name__ == "__main__":
    main()
