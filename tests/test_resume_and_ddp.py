"""Exact mid-epoch resume, and 2-process DDP equal to 1 process with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, run_cli
from safetensors.torch import load_file
from test_reliability import tiny_fit_args


def weights(folder) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(folder, "model.safetensors"))


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_resume_mid_epoch_equals_uninterrupted_run(tmp_path, tiny_lm_dir, small_corpus, monkeypatch):
    common = tiny_fit_args(tiny_lm_dir, small_corpus, "--trainer.limit_val_batches=0", "--checkpoint.monitor=null",
                           "--checkpoint.every_n_train_steps=4", "--trainer.max_steps=8")
    run_cli([*common, "--trainer.default_root_dir=full", "--model.init_args.export_dir=full/model"], cwd=tmp_path)

    from effitrain.lightning_modules.causal_lm import CausalLM

    original = CausalLM.training_step

    def crash_at_step_6(self, batch, batch_idx):
        if self.global_step == 6:
            raise RuntimeError("simulated crash")
        return original(self, batch, batch_idx)

    args = [*common, "--trainer.default_root_dir=split", "--model.init_args.export_dir=split/model"]
    with monkeypatch.context() as patch:
        patch.setattr(CausalLM, "training_step", crash_at_step_6)
        with pytest.raises(RuntimeError, match="simulated crash"):
            run_cli(args, cwd=tmp_path)
    assert torch.load(tmp_path / "split/checkpoints/last.ckpt", weights_only=True)["global_step"] == 4
    cli = run_cli([*args, "--ckpt_path=last"], cwd=tmp_path)
    assert cli.trainer.global_step == 8 and cli.trainer.num_training_batches > 8  # resumed inside epoch 0
    # Same data order (StatefulDataLoader state), optimizer, scheduler and RNG: bit-identical weights.
    assert max_difference(weights(tmp_path / "full/model"), weights(tmp_path / "split/model")) == 0.0


def train_subprocess(cwd, args: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.multiprocess
def test_ddp_two_processes_equal_one_process(tmp_path, tiny_lm_dir, small_corpus):
    """Same global batch (8 = 1×8 = 2×4). Lightning always gives DDP training a shuffling DistributedSampler
    seeded by `seed_everything`; the single process runs under the same strategy with 1 device, so it draws
    the same permutation and its batch of 8 is exactly the union of the two ranks' 4. The all-reduced mean
    gradient equals the single-process one up to float summation order. Plain SGD, so that the comparison
    is of the gradients themselves (Adam's m/√v would blow float noise of near-zero gradients up to ±lr)."""
    common = ["--trainer.max_steps=3", "--trainer.limit_val_batches=0", "--checkpoint.monitor=null",
              "--trainer.accelerator=cpu", "--trainer.strategy=ddp",
              "--model.init_args.optimizer=torch.optim.SGD", "--model.init_args.optimizer.init_args.lr=0.5"]
    single = tiny_fit_args(tiny_lm_dir, small_corpus, *common, "--data.init_args.batch_size=8",
                           "--trainer.devices=1", "--trainer.default_root_dir=one", "--model.init_args.export_dir=one/model")
    ddp = tiny_fit_args(tiny_lm_dir, small_corpus, *common, "--data.init_args.batch_size=4",
                        "--trainer.devices=2", "--trainer.default_root_dir=two",
                        "--model.init_args.export_dir=two/model")
    train_subprocess(tmp_path, single)
    train_subprocess(tmp_path, ddp)
    a, b = weights(tmp_path / "one/model"), weights(tmp_path / "two/model")
    assert max_difference(a, b) < 1e-6
    assert max_difference(a, weights(tiny_lm_dir)) > 1e-3  # and training did move the weights
