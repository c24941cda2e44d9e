"""What DSnoT does to each layer's output error on a causal LM: Wanda's mask against Wanda + DSnoT's, per Linear
layer of the decoder blocks, measured on held-out tokens (the docs/wanda_dsnot.md diagnosis).

The error of a pruned row i on token t is e_i(t) = Σ_{j pruned} W_ij·X_j(t). DSnoT drives its calibration
mean (ε_i, Sec. 3 of the paper) towards 0; the output error that matters is the whole E[e_i²] = mean² +
variance. For every layer this prints, with the Linear layers fed the *dense* model's inputs (both masks
see the same inputs, so the comparison isolates the mask):

* ``|mean|/std``: the median over input features of |E X_j| / std(X_j) on the calibration tokens (LLM
  activations have features whose mean dominates; DSnoT's objective only sees the mean);
* ``|eps|``: the mean |ε_i| over rows on the calibration statistics, Wanda → DSnoT (the official scale: a
  sequence's summed output gap), and the mean swaps per row against the kept weights per row;
* ``err``: Σ_i E[e_i²] / Σ_i E[y_i²] on held-out tokens (validation sequences), Wanda → DSnoT, and the share
  of it that is the squared mean (``bias``).

    python benchmarks/dsnot_output_error.py --model artifacts/tiny_llama --sparsity 0.6
    python benchmarks/dsnot_output_error.py --model artifacts/tiny_llama --sparsity 0.6 --cycles 3 --skip ""
"""

from __future__ import annotations

import argparse
import fnmatch

import lightning as L
import torch
from effitrain.datamodules.text import TextDataModule
from effitrain.methods.blockwise_pruning import DSnoTSettings, InputStats, decoder_blocks, prune_linear
from effitrain.methods.sparsity import parse_pattern
from torch import Tensor, nn
from transformers import AutoModelForCausalLM


def first_sequences(loader, count: int) -> Tensor:
    batches, total = [], 0
    for batch in loader:
        batches.append(batch["input_ids"][: count - total])
        total += batches[-1].shape[0]
        if total >= count:
            break
    return torch.cat(batches)


@torch.no_grad()
def layer_inputs(model: nn.Module, calibration: Tensor, heldout: Tensor, batch: int = 16):
    """Per Linear layer of the decoder blocks: InputStats over ``calibration`` and the held-out inputs [N, d]."""
    blocks = decoder_blocks(model)
    prefix = next(name for name, mod in model.named_modules() if mod is blocks)
    layers = {f"{prefix}.{i}.{n}": m for i, b in enumerate(blocks) for n, m in b.named_modules()
              if isinstance(m, nn.Linear)}
    stats = {name: InputStats(layer.in_features) for name, layer in layers.items()}
    kept: dict[str, list[Tensor]] = {name: [] for name in layers}
    sink = {"calibration": lambda name, x: stats[name].add(x), "heldout": lambda name, x: kept[name].append(
        x.reshape(-1, x.shape[-1]).float())}
    for phase, ids in (("calibration", calibration), ("heldout", heldout)):
        hooks = [layer.register_forward_hook(lambda mod, inp, out, n=name, f=sink[phase]: f(n, inp[0]))
                 for name, layer in layers.items()]
        try:
            for start in range(0, ids.shape[0], batch):
                model(input_ids=ids[start:start + batch])
        finally:
            for h in hooks:
                h.remove()
    return layers, stats, {name: torch.cat(x) for name, x in kept.items()}


def output_error(weight: Tensor, mask: Tensor, x: Tensor) -> tuple[float, float]:
    """Σ_i E[e_i²] / Σ_i E[y_i²] over the tokens ``x`` [N, d_in], and the share of it that is Σ_i (E e_i)²."""
    err = x @ (weight * ~mask).T
    total = err.square().mean(0).sum()
    return float(total / (x @ weight.T).square().mean(0).sum()), float(err.mean(0).square().sum() / total)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="artifacts/tiny_llama")
    parser.add_argument("--sparsity", default="0.6", help="unstructured sparsity or N:M")
    parser.add_argument("--samples", type=int, default=128, help="calibration sequences (training split)")
    parser.add_argument("--heldout", type=int, default=64, help="held-out sequences (validation split)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--cycles", type=int, default=50)
    parser.add_argument("--update-threshold", type=float, default=0.1)
    parser.add_argument("--skip", default="mlp.*", help="layers DSnoT leaves alone ('' = none)")
    parser.add_argument("--same-sign", choices=["official", "on", "off"], default="official",
                        help="the sign rule (official: off for unstructured, on for N:M)")
    parser.add_argument("--shrink-only", action="store_true", help="stop a row at a swap that does not shrink |eps| "
                        "(not official)")
    args = parser.parse_args()
    L.seed_everything(args.seed)
    pattern = parse_pattern(args.sparsity) if ":" in args.sparsity else None
    sparsity = None if pattern else float(args.sparsity)
    data = TextDataModule(source="builtin", tokenizer=args.model, block_size=128, batch_size=16)
    data.setup()
    calibration = first_sequences(data.train_dataloader(), args.samples)
    heldout = first_sequences(data.val_dataloader(), args.heldout)
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    layers, stats, inputs = layer_inputs(model, calibration, heldout)
    same_sign = {"official": None, "on": True, "off": False}[args.same_sign]
    settings = DSnoTSettings(args.cycles, args.update_threshold, same_sign=same_sign, skip=(),
                             shrink_only=args.shrink_only)
    skip = [s for s in [args.skip] if s]
    print(f"{args.sparsity} sparsity, {calibration.shape[0]}x{calibration.shape[1]} calibration tokens, "
          f"{inputs[next(iter(inputs))].shape[0]} held-out tokens, {args.cycles} cycles, threshold "
          f"{args.update_threshold}, sign rule {args.same_sign}, shrink-only "
          f"{args.shrink_only}, DSnoT skips {skip}, seed {args.seed}")
    print("| layer | \\|mean\\|/std | \\|eps\\| Wanda → DSnoT | swaps / kept per row | err Wanda → DSnoT | "
          "bias share Wanda → DSnoT |")
    print("|---|---|---|---|---|---|")
    totals = {"wanda": 0.0, "dsnot": 0.0}
    for name, layer in layers.items():
        w, s = layer.weight.detach().float(), stats[name]
        wanda = prune_linear(w, "wanda", sparsity, pattern, s)
        skipped = any(fnmatch.fnmatchcase(name.split(".", 3)[-1], p) for p in skip)
        refined = wanda if skipped else prune_linear(w, "wanda", sparsity, pattern, s, settings)
        gap = {k: float((w * s.mean_sum * ~m).sum(1).abs().mean()) for k, m in (("wanda", wanda), ("dsnot", refined))}
        swaps = float((refined & ~wanda).sum(1).float().mean())
        ratio = float((s.sum / s.tokens).float().abs().div(s.var.sqrt().clamp_min(1e-12)).median())
        (e0, b0), (e1, b1) = output_error(w, wanda, inputs[name]), output_error(w, refined, inputs[name])
        totals["wanda"] += e0
        totals["dsnot"] += e1
        short = name.split(".", 2)[-1] + (" (skipped)" if skipped else "")
        print(f"| {short} | {ratio:.3f} | {gap['wanda']:.3f} → {gap['dsnot']:.3f} | {swaps:.1f} / "
              f"{int(wanda[0].sum())} | {e0:.4f} → {e1:.4f} | {b0:.1%} → {b1:.1%} |", flush=True)
    print(f"sum of relative errors over layers: Wanda {totals['wanda']:.4f}, Wanda + DSnoT {totals['dsnot']:.4f}")


if __name__ == "__main__":
    main()
