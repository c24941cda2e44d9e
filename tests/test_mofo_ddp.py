"""MoFO under 2-process DDP (CPU, gloo): every rank makes the same filtered update, so the parameters stay
identical across ranks and equal one process stepping on the all-reduced (mean) gradients."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from effitrain.methods.mofo import MoFO, mofo_param_groups
from torch import nn


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 256), nn.LayerNorm(256), nn.Tanh(), nn.Linear(256, 64))


def batches(rank: int, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(100 + rank)
    return [(torch.randn(8, 32, generator=gen), torch.randn(8, 64, generator=gen)) for _ in range(steps)]


def worker(rank: int, world: int, port: int, out_dir: str, steps: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = nn.parallel.DistributedDataParallel(make_model())
    opt = MoFO(mofo_param_groups(model.module), lr=1e-2, weight_decay=0.01, fraction=0.15)
    for x, y in batches(rank, steps):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    torch.save([p.detach() for p in model.parameters()], os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.multiprocess
def test_two_process_ddp_ranks_stay_identical(tmp_path):
    steps = 5
    mp.spawn(worker, args=(2, free_port(), str(tmp_path), steps), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for p, q in zip(rank0, rank1, strict=True):
        assert torch.equal(p, q)
    # and the same as one process stepping on the mean of both ranks' gradients
    model = make_model()
    opt = MoFO(mofo_param_groups(model), lr=1e-2, weight_decay=0.01, fraction=0.15)
    for (x0, y0), (x1, y1) in zip(batches(0, steps), batches(1, steps), strict=True):
        opt.zero_grad()
        (0.5 * nn.functional.mse_loss(model(x0), y0) + 0.5 * nn.functional.mse_loss(model(x1), y1)).backward()
        opt.step()
    for p, q in zip(model.parameters(), rank0, strict=True):
        torch.testing.assert_close(p.detach(), q, rtol=1e-5, atol=1e-6)
