"""A layer where DSnoT's conditions hold: Wanda against Wanda + DSnoT on one seeded Linear layer whose input
features have means comparable to their spread, as LLM activations do (docs/wanda_dsnot.md, "Testbed").

The layer W [rows, cols] is N(0, 0.02²) (a LLaMA-like initialisation scale). Input feature j on every token is
X_j = m_j + s_j·z with z ~ N(0, 1) independent across tokens and features; the spreads s_j are log-normal
(σ = 1, a few outlier features) and the means m_j = ρ·s_j·g_j with g_j ~ N(0, 1): ``--rho`` sets the
mean-to-spread ratio. The calibration statistics come from ``--sequences`` × ``--tokens`` sampled tokens
(collected by ``InputStats``, as the recipe does); the output error is measured on other sampled tokens:

    err = Σ_i E[e_i²] / Σ_i E[y_i²],   e_i = Σ_{j pruned} W_ij·X_j,   y_i = Σ_j W_ij·X_j,

with the share of it that is the squared mean, (E e_i)², the part DSnoT's objective ε sees.

    python benchmarks/dsnot_testbed.py                            # 1024 x 4096, 60%, rho 0 / 0.1 / 0.3 / 1
    python benchmarks/dsnot_testbed.py --cols 256 --rho 0.3       # a width like the tiny LLaMA's
"""

from __future__ import annotations

import argparse

import torch
from effitrain.methods.blockwise_pruning import DSnoTSettings, InputStats, prune_linear
from effitrain.methods.sparsity import parse_pattern


def sample(mean, spread, tokens: int, gen: torch.Generator):
    return mean + spread * torch.randn(tokens, mean.shape[0], generator=gen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--rho", default="0,0.1,0.3,1", help="mean-to-spread ratios, comma-separated")
    parser.add_argument("--sparsity", default="0.6", help="unstructured sparsity or N:M")
    parser.add_argument("--sequences", type=int, default=32, help="calibration sequences")
    parser.add_argument("--tokens", type=int, default=512, help="tokens per calibration sequence")
    parser.add_argument("--heldout", type=int, default=8192, help="held-out tokens")
    parser.add_argument("--cycles", type=int, default=50)
    parser.add_argument("--update-threshold", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    pattern = parse_pattern(args.sparsity) if ":" in args.sparsity else None
    sparsity = None if pattern else float(args.sparsity)
    settings = DSnoTSettings(args.cycles, args.update_threshold, skip=())
    print(f"layer {args.rows}x{args.cols}, {args.sparsity}, {args.sequences}x{args.tokens} calibration tokens, "
          f"{args.heldout} held-out tokens, {args.cycles} cycles, threshold {args.update_threshold}, seed {args.seed}")
    print("| rho | err Wanda | err Wanda + DSnoT | bias share Wanda → DSnoT | mean \\|eps\\| Wanda → DSnoT | swaps / kept per row |")
    print("|---|---|---|---|---|---|")
    for rho in (float(r) for r in args.rho.split(",")):
        gen = torch.Generator().manual_seed(args.seed)
        w = 0.02 * torch.randn(args.rows, args.cols, generator=gen)
        spread = torch.randn(args.cols, generator=gen).exp()
        mean = rho * spread * torch.randn(args.cols, generator=gen)
        stats = InputStats(args.cols)
        for _ in range(args.sequences):
            stats.add(sample(mean, spread, args.tokens, gen).unsqueeze(0))
        x = sample(mean, spread, args.heldout, gen)
        y = (x @ w.T).square().mean(0).sum()
        cells = {}
        for name, refine in (("wanda", None), ("dsnot", settings)):
            mask = prune_linear(w, "wanda", sparsity, pattern, stats, refine)
            err = x @ (w * ~mask).T
            total = err.square().mean(0).sum()
            gap = (w * stats.mean_sum * ~mask).sum(1).abs().mean()
            cells[name] = (float(total / y), float(err.mean(0).square().sum() / total), float(gap), mask)
        swaps = float((cells["dsnot"][3] & ~cells["wanda"][3]).sum(1).float().mean())
        (e0, b0, g0, m0), (e1, b1, g1, _) = cells["wanda"], cells["dsnot"]
        print(f"| {rho:g} | {e0:.4f} | {e1:.4f} ({e1 / e0 - 1:+.1%}) | {b0:.1%} → {b1:.1%} | {g0:.2f} → {g1:.2f} | "
              f"{swaps:.1f} / {int(m0[0].sum())} |", flush=True)


if __name__ == "__main__":
    main()
