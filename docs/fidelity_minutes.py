"""Plot perplexity against the CPU minutes spent on a conversion (docs/accuracy.md, issue 33).

    python docs/fidelity_minutes.py         # docs/fidelity_minutes.json -> docs/fidelity_minutes.png

The points are measurements, each with its command and date in the JSON (conversion minutes, plus
fine-tuning minutes for a healed one); nothing is computed here but the figure.
"""
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent


def main():
    data = json.loads((HERE / "fidelity_minutes.json").read_text())
    fig, axes = plt.subplots(1, 2, figsize=(11, 5), sharex=True)
    markers = "osD^v<>p*X"
    for ax, text in zip(axes, ("evaluation split", "held-out Wikipedia")):
        for run, marker in zip(data["runs"], markers):
            ax.scatter(run["minutes"], run[text], s=36, marker=marker, label=run["label"])
        ax.axhline(data["original"][text], color="gray", linestyle="--", linewidth=1, label="original GQA")
        ax.set_xlim(0, 45)
        ax.set_xlabel("CPU minutes (conversion + fine-tuning), 2 cores")
        ax.set_ylabel("perplexity")
        ax.set_title(text, fontsize=10)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.suptitle("SmolLM2-135M, 4x smaller KV cache (R = 64, r = 32)", fontsize=10)
    fig.tight_layout(rect=(0, 0.16, 1, 1))
    fig.savefig(HERE / "fidelity_minutes.png", dpi=120)
    print(f"written {HERE / 'fidelity_minutes.png'}")


if __name__ == "__main__":
    main()
