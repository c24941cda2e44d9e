"""Selective scan, forward + backward, at a Mamba-R-tiny layer's shapes: time and peak memory.

Compares `effitrain.models.selective_scan.selective_scan` (the chunked fast path) with a plain autograd loop over the
(batch, Di, N) state and with mambapy's `pscan` (Blelloch parallel scan; `pip install mambapy`, the `bench`
extra), all with the same inputs in mamba-ssm's layout, softplus(Δ + bias) included.

    python benchmarks/selective_scan.py                       # batch 8, Di 384, L 208, N 16
    python benchmarks/selective_scan.py --threads 2 --repeats 7
    python benchmarks/selective_scan.py --threads 1 --lengths 64 128 256 512 1024 --out scan_lengths.json

``--lengths``: time (no memory, no error check) against sequence length, the implementations interleaved at
each length; the medians go to ``--out`` as JSON (``docs/data/results.json`` holds the committed sweep).

Time: median of `--repeats` interleaved runs in one process (so machine load hits every implementation alike).
Peak memory: each implementation runs once in a fresh subprocess with glibc's mmap threshold pinned low, so
every large tensor is its own mapping and freed memory leaves the resident set; the peak resident set
(VmHWM) is reset after the inputs are built, and the number is its growth during forward + backward.
On CUDA, max_memory_allocated over the same interval.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys

import torch
import torch.nn.functional as F
from effitrain.models.selective_scan import selective_scan, selective_scan_ref  # noqa: E402
from timing import interleaved_medians

try:
    from mambapy.pscan import pscan
except ImportError:
    pscan = None


def make_inputs(batch: int, di: int, length: int, n: int, device: str, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    kw = dict(generator=g)
    return dict(
        u=torch.randn(batch, di, length, **kw),
        delta=torch.randn(batch, di, length, **kw) * 0.5,
        A=-torch.arange(1, n + 1, dtype=torch.float32).repeat(di, 1),  # S4D-real init, as A = -exp(A_log)
        B=torch.randn(batch, n, length, **kw),
        C=torch.randn(batch, n, length, **kw),
        D=torch.ones(di),
        delta_bias=torch.rand(di, **kw) * 4 - 4,
    )


def plain_loop(u, delta, A, B, C, D, delta_bias):
    """The direct autograd loop: one exp, one multiply-add and one reduction per step."""
    delta = F.softplus(delta + delta_bias[:, None])
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for t in range(u.shape[2]):
        h = torch.exp(delta[:, :, t, None] * A) * h + (delta[:, :, t] * u[:, :, t])[:, :, None] * B[:, None, :, t]
        ys.append(torch.bmm(h, C[:, :, t, None]))
    return torch.cat(ys, dim=-1) + u * D[:, None]


def mambapy_pscan(u, delta, A, B, C, D, delta_bias):
    """mambapy's `MambaBlock.selective_scan`: materialise exp(ΔA) and ΔBu as (b, L, Di, N), then `pscan`."""
    delta = F.softplus(delta + delta_bias[:, None]).transpose(1, 2)
    x = u.transpose(1, 2)
    decay = torch.exp(delta.unsqueeze(-1) * A)
    bx = delta.unsqueeze(-1) * B.transpose(1, 2).unsqueeze(2) * x.unsqueeze(-1)
    hs = pscan(decay, bx)
    y = (hs @ C.transpose(1, 2).unsqueeze(-1)).squeeze(3)
    return (y + D * x).transpose(1, 2)


def fast_scan(u, delta, A, B, C, D, delta_bias):
    return selective_scan(u, delta, A, B, C, D, delta_bias=delta_bias, delta_softplus=True)


def ref_scan(u, delta, A, B, C, D, delta_bias):
    return selective_scan_ref(u, delta, A, B, C, D, delta_bias=delta_bias, delta_softplus=True)


IMPLS = {"fast (ours)": fast_scan, "plain loop": plain_loop, "mambapy pscan": mambapy_pscan}


def fwd_bwd(fn, inputs: dict, grad_out: torch.Tensor) -> None:
    leaves = {k: v.detach().requires_grad_() for k, v in inputs.items()}
    y = fn(**leaves)
    y.backward(grad_out)


def sweep_lengths(impls: dict, args: argparse.Namespace) -> dict:
    """Median fwd+bwd milliseconds of each implementation at each of ``args.lengths`` (inputs seeded)."""
    ms: dict[str, list[float]] = {name: [] for name in impls}
    for length in args.lengths:
        inputs = {k: v.to(args.device) for k, v in make_inputs(args.batch, args.di, length, args.n, "cpu",
                                                                 seed=args.seed).items()}
        grad_out = torch.randn(args.batch, args.di, length, generator=torch.Generator().manual_seed(args.seed))
        grad_out = grad_out.to(args.device)
        steps = {name: functools.partial(fwd_bwd, fn, inputs, grad_out) for name, fn in impls.items()}
        med = interleaved_medians(steps, rounds=args.repeats, device=args.device)
        for name in impls:
            ms[name].append(round(med[name] * 1e3, 2))
        print(f"L {length}: " + ", ".join(f"{name} {ms[name][-1]:.1f} ms" for name in impls), flush=True)
    return {"batch": args.batch, "di": args.di, "n": args.n, "device": args.device,
            "threads": torch.get_num_threads(), "repeats": args.repeats, "seed": args.seed,
            "lengths": list(args.lengths), "ms": ms}


def peak_memory_mb(name: str, args: argparse.Namespace) -> float:
    """Runs one forward + backward in a fresh process and returns its peak memory growth in MB."""
    cmd = [sys.executable, __file__, "--_memory-probe", name] + [
        f"--{k}={getattr(args, k)}" for k in ("batch", "di", "length", "n", "device", "threads")
    ]
    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mb"]


def _memory_probe(name: str, args: argparse.Namespace) -> None:
    inputs = {k: v.to(args.device) for k, v in make_inputs(args.batch, args.di, args.length, args.n, "cpu").items()}
    grad_out = torch.ones(args.batch, args.di, args.length, device=args.device)
    if args.device == "cuda":
        fwd_bwd(IMPLS[name], inputs, grad_out)  # warm-up, then measure a clean run
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fwd_bwd(IMPLS[name], inputs, grad_out)
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        def status_kb(field: str) -> int:
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak resident set (VmHWM) to the current one
        base = status_kb("VmRSS")
        fwd_bwd(IMPLS[name], inputs, grad_out)
        peak = (status_kb("VmHWM") - base) / 1024
    print(json.dumps({"peak_mb": peak}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--di", type=int, default=384)
    p.add_argument("--length", type=int, default=208)
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--skip-loop", action="store_true", help="leave out the plain loop (slow at 2 threads)")
    p.add_argument("--seed", type=int, default=0, help="seed of the inputs and the output gradient")
    p.add_argument("--lengths", type=int, nargs="+", default=None, help="sweep these sequence lengths (time only)")
    p.add_argument("--out", default=None, help="with --lengths: write the medians to this JSON file")
    p.add_argument("--_memory-probe", dest="probe", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.probe:
        return _memory_probe(args.probe, args)

    impls = dict(IMPLS)
    if args.skip_loop:
        impls.pop("plain loop")
    if pscan is None:
        print("mambapy is not installed (pip install mambapy): skipping the pscan peer")
        impls.pop("mambapy pscan")
    if args.lengths:
        result = sweep_lengths(impls, args)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
        return None
    inputs = {k: v.to(args.device) for k, v in make_inputs(args.batch, args.di, args.length, args.n, "cpu",
                                                             seed=args.seed).items()}
    grad_out = torch.randn(args.batch, args.di, args.length, device=args.device)

    # correctness against the sequential reference, on the benchmark's own inputs
    leaves = {k: v.detach().double().requires_grad_() for k, v in inputs.items()}
    ref = ref_scan(**leaves)
    ref.backward(grad_out.double())
    errors = {}
    for name, fn in impls.items():
        x = {k: v.detach().requires_grad_() for k, v in inputs.items()}
        y = fn(**x)
        y.backward(grad_out)
        errors[name] = (
            (y.double() - ref).abs().max().item(),
            max(((x[k].grad.double() - leaves[k].grad).abs().max() / leaves[k].grad.abs().max()).item() for k in x),
        )

    steps = {name: (lambda fn=fn: fwd_bwd(fn, inputs, grad_out)) for name, fn in impls.items()}
    med = interleaved_medians(steps, rounds=args.repeats, device=args.device)
    mem = {name: (float("nan") if args.skip_memory else peak_memory_mb(name, args)) for name in impls}

    print(
        f"selective scan fwd+bwd, batch {args.batch}, Di {args.di}, L {args.length}, N {args.n}, "
        f"{args.device}, {torch.get_num_threads()} threads, median of {args.repeats}"
    )
    print("| implementation | time (ms) | speed-up vs ours | peak memory (MB) | max |err| y | max rel err grad |")
    print("|---|---|---|---|---|---|")
    for name in impls:
        print(
            f"| {name} | {med[name] * 1e3:.1f} | {med[name] / med['fast (ours)']:.2f}x | {mem[name]:.1f} | "
            f"{errors[name][0]:.1e} | {errors[name][1]:.1e} |"
        )
    peers = [n for n in impls if n != "fast (ours)"]
    best = min(peers, key=lambda n: med[n])
    print(f"fast scan is {med[best] / med['fast (ours)']:.2f}x faster than the better peer ({best})")


if __name__ == "__main__":
    main()
