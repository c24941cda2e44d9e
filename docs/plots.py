"""Draw the figures in ``docs/img/`` from logged metrics: ``python docs/plots.py`` (needs the ``plots`` extra).

- the quickstart's training and validation loss, from the run's Lightning ``metrics.csv`` (the copy committed
  in ``docs/data/quickstart_metrics.csv``, or ``--quickstart-csv`` of a new run);
- the other figures from ``docs/data/results.json``, which holds the measured tables of the method pages.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

DOCS = Path(__file__).resolve().parent


def quickstart_loss(metrics_csv: Path, out: Path) -> None:
    train, val = [], []
    for row in csv.DictReader(metrics_csv.open()):
        step = int(row["step"])
        if row.get("train/loss"):
            train.append((step, float(row["train/loss"])))
        if row.get("val/loss"):
            val.append((step, float(row["val/loss"])))
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    ax.plot(*zip(*train, strict=True), label="train loss", lw=1)
    ax.plot(*zip(*val, strict=True), "o-", label="validation loss")
    ax.set(xlabel="optimizer step", ylabel="cross-entropy (nats)", title="Quickstart: tiny LLaMA on Python's docs")
    ax.legend()
    save(fig, out)


def mofo_forgetting(data: dict, out: Path) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, run in data["runs"].items():
        ax.plot(run["target_loss"], run["pretraining_ppl"], "o-", label=name)
        ax.annotate(f"step {data['steps'][-1]}", (run["target_loss"][-1], run["pretraining_ppl"][-1]),
                    textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.axhline(data["base_ppl"], color="grey", ls=":", label="base model")
    ax.set(xlabel="target-task validation loss (lower: learned more)", yscale="log", ylim=(100, 3000),
           ylabel="pretraining-domain perplexity (lower: forgot less)", title="MoFO: learning vs forgetting")
    ax.legend(fontsize=8)
    save(fig, out)


def efficientqat_bits(data: dict, out: Path) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    configs = sorted(data["bits_per_weight"], key=data["bits_per_weight"].get)
    bits = [data["bits_per_weight"][c] for c in configs]
    for name, ppl in data["ppl"].items():
        ax.plot(bits, [ppl[c] for c in configs], "o-", label=name)
    ax.axhline(data["fp_ppl"], color="grey", ls=":", label="floating point")
    for c, b in zip(configs, bits, strict=True):
        ax.annotate(c, (b, data["ppl"]["RTN"][c]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set(xlabel="bits per weight (packed checkpoint)", ylabel="validation perplexity",
           title="EfficientQAT on the Markov-language testbed")
    ax.legend()
    save(fig, out)


def unipts_accuracy(data: dict, out: Path) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for name, run in data["runs"].items():
        ax.plot(run["steps"], run["top1"], "o-", label=f"{name} (sparsity {run['sparsity']:.4f})")
    ax.axhline(data["dense"], color="grey", ls=":", label="dense")
    ax.set(xlabel="training steps on 512 calibration images", ylabel="validation top-1 (%)",
           title="ResNet-18 on digits at 90% sparsity")
    ax.legend(fontsize=8)
    save(fig, out)


def unipts_sparsity(data: dict, out: Path) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    percent = [100 * p for p in data["sparsities"]]
    for name, top1 in data["top1"].items():
        ax.plot(percent, top1, "o-", label=name)
    ax.axhline(data["dense"], color="grey", ls=":", label="dense")
    ax.axhline(data["chance"], color="grey", ls="--", lw=0.8, label="chance")
    ax.set(xticks=percent, xlabel="target sparsity (% of Conv2d/Linear weights)", ylabel="validation top-1 (%)",
           title=f"ResNet-18 on digits, {data['steps']} steps on 512 images")
    ax.legend(fontsize=8, loc="lower left")
    save(fig, out)


def selective_scan_lengths(data: dict, out: Path) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for name, ms in data["ms"].items():
        ax.plot(data["lengths"], ms, "o-", label=name)
    ax.set(xscale="log", yscale="log", xticks=data["lengths"], xticklabels=[str(n) for n in data["lengths"]],
           xlabel="sequence length L (tokens)", ylabel="forward + backward (ms, median)",
           title=f"Selective scan, batch {data['batch']}, Di {data['di']}, N {data['n']}, "
                 f"{data['threads']} thread{'s' if data['threads'] > 1 else ''}")
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.legend(fontsize=8)
    save(fig, out)


def uio_passkey(data: dict, out: Path) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for name, acc in data["runs"].items():
        ax.plot(data["lengths"], acc, "o-", label=name)
    ax.axhline(data["chance"], color="grey", ls=":", label="chance")
    ax.axvline(256, color="black", lw=0.5)
    ax.set(xscale="log", xticks=data["lengths"], xticklabels=[str(n) for n in data["lengths"]],
           xlabel="document length in tokens (trained at 256)", ylabel="passkey accuracy",
           title="UIO-LLM: passkey beyond the training length")
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.legend(fontsize=7, loc="center left")
    save(fig, out)


def save(fig, out: Path) -> None:
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quickstart-csv", type=Path, default=DOCS / "data" / "quickstart_metrics.csv")
    parser.add_argument("--out", type=Path, default=DOCS / "img")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = json.loads((DOCS / "data" / "results.json").read_text())
    if args.quickstart_csv.exists():
        quickstart_loss(args.quickstart_csv, args.out / "quickstart_loss.png")
    mofo_forgetting(results["mofo_forgetting"], args.out / "mofo_forgetting.png")
    efficientqat_bits(results["efficientqat_bits"], args.out / "efficientqat_bits.png")
    unipts_accuracy(results["unipts_accuracy"], args.out / "unipts_accuracy.png")
    uio_passkey(results["uio_passkey"], args.out / "uio_passkey.png")
    unipts_sparsity(results["unipts_sparsity"], args.out / "unipts_sparsity.png")
    selective_scan_lengths(results["selective_scan_lengths"], args.out / "selective_scan_lengths.png")


if __name__ == "__main__":
    main()
