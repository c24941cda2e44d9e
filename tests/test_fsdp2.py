"""FSDP2 (``configs/trainer/fsdp2.yaml``) on 2 CPU processes: every recipe that trains weights ends with the
same weights as one process with the same global batch after 3 optimizer steps, or refuses the strategy
before training with a message naming it and the reason.

Tolerance: max |Δ| / max |w| per tensor <= 1e-5 (the reduce-scatter sums the two half-batch gradients in a
different order than one process does, so equality is to float rounding, not bitwise).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import fsdp2_jobs  # tests/ is on sys.path under pytest's default import mode
import pytest
import torch

pytestmark = pytest.mark.multiprocess
RTOL = 1e-5
EQUAL = ["causal_lm", "causal_lm_mofo", "moslora", "illama", "mambar"]
REFUSED = {"causal_lm_export": "CausalLM under FSDP2 cannot write {'export_dir'",
           "uio": "UIOLM cannot run under FSDP2Strategy", "dynamic_sparsity": "DynamicSparsity cannot run under",
           "sparsity_search": "SparsitySearch cannot run under"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def fsdp2_results(tmp_path_factory) -> dict:
    """One 2-process launch that runs every job (tests/fsdp2_jobs.py)."""
    out = tmp_path_factory.mktemp("fsdp2")
    port = str(_free_port())
    procs = []
    for rank in (0, 1):
        env = dict(os.environ, WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), NODE_RANK="0",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(Path(fsdp2_jobs.__file__)), str(out)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=900)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs[0][-4000:] + logs[1][-4000:]
    return torch.load(out / "fsdp2.pt", weights_only=False)


@pytest.mark.parametrize("name", EQUAL)
def test_fsdp2_equals_one_process(fsdp2_results, name, tmp_path):
    sharded = fsdp2_results[name]
    assert isinstance(sharded, dict), sharded
    module, _ = fsdp2_jobs.fit(name, devices=1, root=str(tmp_path))
    reference = {n: p.detach() for n, p in module.named_parameters()}
    start, _, _, _ = fsdp2_jobs.build(name)
    initial = dict(start.named_parameters())
    assert sharded.keys() == reference.keys()
    moved = 0
    for n, ref in reference.items():
        delta = (sharded[n] - ref).abs().max() / ref.abs().max().clamp_min(1e-12)
        assert delta <= RTOL, f"{name}: {n} differs by {delta:.2e} (relative)"
        moved += int(not torch.equal(ref, initial[n]))
    assert moved > 0  # the comparison is between trained weights


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_fsdp2_refused_before_training(fsdp2_results, name):
    message = fsdp2_results[name]
    assert isinstance(message, str) and REFUSED[name] in message, message
    assert "DDP" in message or "consolidate" in message  # and says what to do instead



def test_fsdp2_resume_mid_epoch_equals_uninterrupted(fsdp2_results):
    """Saved (sharded checkpoint folder) after 2 of the epoch's 3 steps and resumed in a new trainer: the same
    weights (and so the same MoFO moments and loader position) as the uninterrupted sharded run."""
    resumed, uninterrupted = fsdp2_results["causal_lm_mofo_resume"], fsdp2_results["causal_lm_mofo"]
    for n, ref in uninterrupted.items():
        delta = (resumed[n] - ref).abs().max() / ref.abs().max().clamp_min(1e-12)
        assert delta <= RTOL, f"{n} differs by {delta:.2e} after resuming"


def test_consolidated_checkpoint_exports_as_one_process(fsdp2_results, tmp_path):
    """The export path under FSDP2: ``save_distributed_checkpoint: false`` writes one consolidated checkpoint;
    resumed in one process with ``max_steps`` already reached, fit ends at once and writes ``export_dir``: the
    HF folder equals the export of a 1-process run of the same 2 steps."""
    from safetensors.torch import load_file

    fsdp2_jobs.fit("causal_lm_mofo", 1, root=str(tmp_path / "a"), max_steps=2, ckpt_path=fsdp2_results["consolidated"],
                   export_dir=str(tmp_path / "sharded_export"))
    fsdp2_jobs.fit("causal_lm_mofo", 1, root=str(tmp_path / "b"), max_steps=2, export_dir=str(tmp_path / "export"))
    sharded, reference = (load_file(tmp_path / d / "model.safetensors") for d in ("sharded_export", "export"))
    assert sharded.keys() == reference.keys() and len(reference) > 10
    for n, ref in reference.items():
        assert (sharded[n] - ref).abs().max() / ref.abs().max() <= RTOL, n
