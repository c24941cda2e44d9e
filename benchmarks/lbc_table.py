"""LBC against magnitude N:M + fine-tuning and SR-STE on the digits testbed (docs/lbc.md), in one process.

Every cell runs a shipped recipe (``configs/lbc/lbc.yaml`` for ResNet-18, ``configs/lbc/lbc_vit.yaml`` for the
ViT) with only the pattern and the method changed, by the command-line overrides
``--trainer.callbacks.init_args.pattern 1:4 --trainer.callbacks.init_args.method sr_ste``, so the three methods
get the same steps, learning-rate schedule, data order and seed. The final validation top-1 (one validation, after the last step) and the last
training loss are printed as a Markdown table and written to ``--out``/table.json.

    python benchmarks/lbc_table.py --resnet /tmp/lbc/digits_resnet --vit /tmp/lbc/digits_vit \\
        --patterns 2:4 1:4 1:8 --out /tmp/lbc/table

``--steps`` / ``--t_f`` change the length of every run and of LBC's removal schedule alike (default: the
recipes' 30 and 15); ``--methods lbc`` runs only some methods (to try schedules).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from effitrain.lightning_modules.cli import build_cli

RECIPES = {"resnet18": "configs/lbc/lbc.yaml", "vit": "configs/lbc/lbc_vit.yaml"}
METHODS = ("magnitude", "sr_ste", "lbc")


def run_cell(recipe: str, pretrained: str, pattern: str, method: str, out: Path, steps: int | None,
             t_f: float | None, seed: int) -> dict:
    """One fine-tuning run of ``recipe`` from ``pretrained`` with ``pattern`` / ``method``; its metrics."""
    root = out / f"{Path(recipe).stem}_{method}_{pattern.replace(':', 'of')}"
    args = ["--config", recipe, "--seed_everything", str(seed), "--model.init_args.pretrained", pretrained,
            "--model.init_args.export_dir", "null", "--trainer.default_root_dir", str(root),
            "--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--trainer.enable_checkpointing", "false"]
    args += ["--trainer.callbacks.init_args.pattern", pattern, "--trainer.callbacks.init_args.method", method]
    if steps is not None:
        args += ["--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps)]
    if t_f is not None:
        args += ["--trainer.callbacks.init_args.t_f", str(t_f)]
    cli = build_cli(args, run=False)
    start = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    metrics = cli.trainer.callback_metrics
    return {"val_acc": float(metrics["val/acc"]), "train_loss": float(metrics["train/loss"]),
            "steps": cli.trainer.global_step, "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resnet", help="the dense digits ResNet-18 (configs/pretrain/image_quickstart_resnet.yaml)")
    parser.add_argument("--vit", help="the dense digits ViT (configs/pretrain/image_quickstart.yaml)")
    parser.add_argument("--patterns", nargs="+", default=["2:4", "1:4", "1:8"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--steps", type=int, default=None, help="training steps of every run (default: the recipe's)")
    parser.add_argument("--t_f", type=float, default=None, help="LBC's t_f in steps (default: the recipe's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="/tmp/lbc_table")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    models = {name: path for name, path in (("resnet18", args.resnet), ("vit", args.vit)) if path}
    results = []
    for model, path in models.items():
        for pattern in args.patterns:
            for method in args.methods:
                cell = run_cell(RECIPES[model], path, pattern, method, out, args.steps, args.t_f, args.seed)
                results.append({"model": model, "pattern": pattern, "method": method, **cell})
                print(json.dumps(results[-1]), flush=True)
                (out / "table.json").write_text(json.dumps(results, indent=1))
    print(f"\nseed {args.seed}; steps {args.steps or 'as the recipe'}; LBC t_f {args.t_f or 'as the recipe'}\n")
    print("| model | pattern | " + " | ".join(args.methods) + " |")
    print("|---|---|" + "---|" * len(args.methods))
    for model in models:
        for pattern in args.patterns:
            row = {r["method"]: r for r in results if r["model"] == model and r["pattern"] == pattern}
            cells = [f"{100 * row[m]['val_acc']:.1f}% (loss {row[m]['train_loss']:.2f})" for m in args.methods]
            print(f"| {model} | {pattern} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
