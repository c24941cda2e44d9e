"""Optimizer-step time of MoFO vs AdamW (foreach), measured in one process (issue #4).

    python benchmarks/mofo_step.py                 # ~5M and ~50M-parameter LLaMAs, fraction 0.15
    python benchmarks/mofo_step.py --sizes 5m --steps 30 --reference

The optimizers (AdamW foreach, the issue's baseline; AdamW fused, torch's one-kernel AdamW, which MoFO's
dense part also uses; MoFO) step on their own copy of the same model with the same real gradients (a few
stored forward/backward passes on random tokens, cycled), their steps interleaved so machine load
hits both alike; the median step time of each and their ratio are printed. ``--reference`` also
times the official code's per-tensor ``torch.topk`` threshold. After timing, one step with weight
decay 0 checks the selection is exact: every filtered tensor moves exactly at its top-k |m|.
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch
from effitrain.methods.mofo import MoFO, mofo_param_groups  # noqa: E402
from timing import timed
from transformers import LlamaConfig, LlamaForCausalLM

SIZES = {  # name: (vocab, hidden, intermediate, layers, heads)
    "5m": (4096, 256, 688, 4, 4),
    "50m": (16384, 512, 1376, 10, 8),
}


def build(size: str) -> LlamaForCausalLM:
    vocab, hidden, inter, layers, heads = SIZES[size]
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=256)
    return LlamaForCausalLM(cfg)


def real_grads(model: LlamaForCausalLM, sets: int, seq: int = 128, batch: int = 4) -> list[list[torch.Tensor]]:
    out = []
    for _ in range(sets):
        ids = torch.randint(0, model.config.vocab_size, (batch, seq))
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        out.append([p.grad.detach().clone() for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    return out


class TopkMoFO(MoFO):
    """The official code's threshold (``torch.topk`` on each filtered tensor), for reference only."""

    def _thresholds(self, absm, k, scratch, key):
        return torch.topk(absm, k, dim=1).values[:, -1].tolist()


def time_steps(opts: dict[str, tuple[torch.optim.Optimizer, torch.nn.Module]], grads, steps: int, warmup: int):
    times = {name: [] for name in opts}
    for it in range(warmup + steps):
        g = grads[it % len(grads)]
        for name, (opt, model) in opts.items():
            for p, gp in zip(model.parameters(), g, strict=True):
                p.grad = gp
            seconds = timed(opt.step)
            if it >= warmup:
                times[name].append(seconds)
    return {name: statistics.median(ts) for name, ts in times.items()}


def check_exact(model: torch.nn.Module, grads, fraction: float) -> int:
    """One MoFO step (lr 1, weight decay 0) after a few: the moved entries of each filtered tensor
    must be exactly its top-k |m| (k = max(1, floor(fraction * numel)), ties included)."""
    model = copy.deepcopy(model)
    opt = MoFO(mofo_param_groups(model), lr=1e-3, fraction=fraction)
    for g in grads:
        for p, gp in zip(model.parameters(), g, strict=True):
            p.grad = gp
        before = [p.detach().clone() for p in model.parameters()]
        opt.step()
    checked = 0
    for (name, p), b in zip(model.named_parameters(), before, strict=True):
        if "norm" in name:
            continue
        m = opt.state[p]["exp_avg"].abs().flatten()
        k = max(1, int(fraction * m.numel()))
        tau = torch.topk(m, k).values[-1]
        expected = (m >= tau) & (m > 0)  # an entry with m = 0 is selected but does not move
        moved = (p.detach() != b).flatten()
        assert torch.equal(moved, expected), f"{name}: selection differs from the exact top-k"
        checked += 1
    return checked


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["5m", "50m"], choices=list(SIZES))
    ap.add_argument("--fraction", type=float, default=0.15)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--grad-sets", type=int, default=4)
    ap.add_argument("--reference", action="store_true", help="also time the official topk threshold")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fraction {args.fraction}")
    print("| model | params | AdamW foreach ms | MoFO ms | MoFO / AdamW foreach | AdamW fused ms | MoFO / AdamW fused |"
          + (" topk MoFO ms | topk / AdamW foreach |" if args.reference else ""))
    print("|---|---|---|---|---|---|---|" + ("---|---|" if args.reference else ""))
    for size in args.sizes:
        model = build(size)
        n_params = sum(p.numel() for p in model.parameters())
        grads = real_grads(model, args.grad_sets)
        opts = {}
        m_adam, m_fused, m_mofo = copy.deepcopy(model), copy.deepcopy(model), copy.deepcopy(model)
        opts["adamw"] = (torch.optim.AdamW(m_adam.parameters(), lr=1e-5, weight_decay=0.0, foreach=True), m_adam)
        opts["fused"] = (torch.optim.AdamW(m_fused.parameters(), lr=1e-5, weight_decay=0.0, fused=True), m_fused)
        opts["mofo"] = (MoFO(mofo_param_groups(m_mofo), lr=1e-5, fraction=args.fraction), m_mofo)
        if args.reference:
            m_ref = copy.deepcopy(model)
            opts["topk"] = (TopkMoFO(mofo_param_groups(m_ref), lr=1e-5, fraction=args.fraction), m_ref)
        t = time_steps(opts, grads, args.steps, args.warmup)
        row = (f"| {size} | {n_params / 1e6:.1f}M | {t['adamw'] * 1e3:.1f} | {t['mofo'] * 1e3:.1f} | "
               f"{t['mofo'] / t['adamw']:.2f} | {t['fused'] * 1e3:.1f} | {t['mofo'] / t['fused']:.2f} |")
        if args.reference:
            row += f" {t['topk'] * 1e3:.1f} | {t['topk'] / t['adamw']:.2f} |"
        print(row, flush=True)
        n_checked = check_exact(model, grads, args.fraction)
        print(f"  selection exact on all {n_checked} filtered tensors", flush=True)


if __name__ == "__main__":
    main()
