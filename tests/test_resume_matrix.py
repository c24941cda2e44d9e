"""Every CPU recipe resumes exactly after a kill, and its short run's loss is pinned.

For each recipe (tiny model overrides on the command line, fixed seed): an uninterrupted run of N steps; a run
of the same command SIGKILLed between two ``last.ckpt`` saves (``resume_helpers.KillAtStep``, in a forked
child: no clean-up runs); that run resumed with ``--ckpt_path last`` to N steps. The two final ``last.ckpt``
must hold the same tensors: weights, optimizer moments, schedules, random states and method state (masks and
sparsities, soft-mask rate, reservoir generators, Block-AP's packed blocks and block optimizer). Tolerance 0:
one thread, the same kernels in the same order. The uninterrupted run's final training loss is pinned
(relative 2e-3: other BLAS builds move the last digits; a change of the method moves far more).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_cli
from resume_helpers import kill_callback

CONFIGS = REPO / "configs"
COMMON = ["--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0", "--trainer.logger=false",
          "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--checkpoint.monitor=null",
          "--checkpoint.save_top_k=0", "--checkpoint.save_last=false", "--finite_loss.divergence_factor=null"]
# Steps bound the image runs too (max_epochs unset): with `max_epochs` set, Lightning 2.6 restarts an
# interrupted epoch's loader at its first batch (see docs/ARCHITECTURE.md, resume).
IMAGES = ["--data.init_args.batch_size=16", "--trainer.limit_train_batches=4", "--trainer.max_epochs=null"]

#: recipe: (uninterrupted steps, last.ckpt every n steps, kill at step, pinned final train/loss)
PLAN = {
    "quickstart": (5, 2, 3, 6.2065),
    "moslora": (5, 2, 3, 6.2043),
    "mofo": (5, 2, 3, 5.269),
    "unipts": (6, 2, 3, -32.068),
    "block_ap": (16, 3, 11, 0.0010044),
    "e2e_qp": (5, 2, 3, 3.9643),
    "illama": (6, 3, 5, 2.3475),
    "mambar": (6, 3, 5, 2.2683),
    "uio": (5, 2, 3, 5.2711),
}
if os.environ.get("RESUME_ONLY"):  # e.g. RESUME_ONLY=block_ap,e2e_qp while working on one recipe
    PLAN = {k: v for k, v in PLAN.items() if k in os.environ["RESUME_ONLY"].split(",")}


@pytest.fixture(scope="module")
def dense_resnet(tmp_path_factory) -> Path:
    """A small dense timm ResNet (random init) as UniPTS's starting model and teacher."""
    import timm
    from timm.models import save_for_hf

    folder = tmp_path_factory.mktemp("resnet")
    torch.manual_seed(0)
    save_for_hf(timm.create_model("resnet10t", num_classes=10), folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def testbed(tmp_path_factory) -> Path:
    """A 2-block LLaMA over the 51-token Markov vocabulary (widths divisible by the group size 64)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("testbed")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=51, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
                     ).save_pretrained(folder)
    return folder


def recipe_args(name: str, tiny_lm_dir, corpus, dense_resnet, testbed, root: Path) -> list[str]:
    lm = [f"--model.init_args.pretrained={tiny_lm_dir}", f"--data.init_args.tokenizer={tiny_lm_dir}"]
    instructions = [*lm, "--data.init_args.num_examples=200", "--data.init_args.max_length=128",
                    "--data.init_args.batch_size=4"]
    markov = ["--data.init_args.train_size=64", "--data.init_args.val_size=8", "--data.init_args.length=16",
              "--data.init_args.batch_size=4"]
    args = {
        "quickstart": [CONFIGS / "pretrain/quickstart.yaml", *lm, f"--data.init_args.source={corpus}",
                       "--data.init_args.block_size=32", "--data.init_args.batch_size=4",
                       "--model.init_args.config=null"],
        "moslora": [CONFIGS / "moslora/moslora.yaml", *instructions, "--model.init_args.merged_dir=null"],
        "mofo": [CONFIGS / "mofo/mofo.yaml", *instructions, "--trainer.callbacks=[]"],
        "unipts": [CONFIGS / "unipts/unipts.yaml", "--model.init_args.model_name=resnet10t",
                   f"--model.init_args.pretrained={dense_resnet}", "--data.init_args.limit_train=64",
                   "--data.init_args.batch_size=16", "--trainer.max_epochs=null"],
        "block_ap": [CONFIGS / "efficientqat/efficientqat_block_ap.yaml", f"--model.init_args.pretrained={testbed}",
                     "--trainer.limit_train_batches=4", *markov],
        "e2e_qp": [CONFIGS / "efficientqat/efficientqat_e2e_qp.yaml",
                   f"--model.init_args.pretrained={root.parent / 'block_ap' / 'full_model'}", *markov],
        "illama": [CONFIGS / "illama/illama_digits.yaml", *IMAGES, "--trainer.callbacks=[{\"class_path\": "
                   "\"effitrain.callbacks.soft_causal_mask.SoftCausalMask\", \"init_args\": {\"schedule\": "
                   "\"linear\", \"cutoff_epochs\": 2}}]"],
        "mambar": [CONFIGS / "mambar/mambar_digits.yaml", *IMAGES],
        "uio": [CONFIGS / "uio/uio_passkey.yaml", *lm, "--model.init_args.segment_length=16",
                "--model.init_args.num_memory_tokens=4", "--model.init_args.encoder_rank=4",
                "--model.init_args.transfer_rank=4", "--data.init_args.train_length=64",
                "--data.init_args.val_lengths=[64]", "--data.init_args.min_gap=20", "--data.init_args.num_val=4",
                "--data.init_args.batch_size=2"],
    }[name]
    steps, every, _, _ = PLAN[name]
    budget = [] if name == "block_ap" else [f"--trainer.max_steps={steps}"]
    return ["fit", "--config", str(args[0]), *map(str, args[1:]), *COMMON, *budget,
            f"--last_checkpoint.every_n_train_steps={every}"]


def run(args: list[str], cwd: Path, tag: str):
    return run_cli([*args, f"--trainer.default_root_dir={tag}", f"--model.init_args.export_dir={tag}_model"], cwd=cwd)


@pytest.fixture(scope="module")
def matrix(tmp_path_factory, tiny_lm_dir, small_corpus, dense_resnet, testbed):
    """Runs every recipe three ways; returns {recipe: (full checkpoint, resumed checkpoint, final loss)}."""
    base = tmp_path_factory.mktemp("matrix")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the killed runs: same kernels, same summation order
    try:
        commands = {name: recipe_args(name, tiny_lm_dir, small_corpus, dense_resnet, testbed, base / name)
                    for name in PLAN}
        for name in PLAN:
            (base / name).mkdir()
        first = [name for name in PLAN if name == "block_ap"]  # E2E-QP starts from its export
        losses = {name: run(commands[name], base / name, "full") for name in first}
        killed = [{"cwd": str(base / name), "args": [*commands[name], "--trainer.default_root_dir=split",
                                                     "--model.init_args.export_dir=split_model",
                                                     kill_callback(PLAN[name][2])]} for name in PLAN]
        (base / "runs.json").write_text(json.dumps(killed))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)]), "OMP_NUM_THREADS": "1"}
        server = subprocess.Popen([sys.executable, str(REPO / "tests" / "resume_helpers.py"), str(base / "runs.json")],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name in PLAN:
            if name not in first:
                losses[name] = run(commands[name], base / name, "full")
        out, err = server.communicate(timeout=900)
        exits = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        assert len(exits) == len(PLAN) and all(e["killed"] for e in exits), err[-3000:]
        results = {}
        for name in PLAN:
            killed_step = torch.load(base / name / "split/checkpoints/last.ckpt", weights_only=True)["global_step"]
            assert killed_step == PLAN[name][2] // PLAN[name][1] * PLAN[name][1]  # the last save before the kill
            run([*commands[name], "--ckpt_path=last"], base / name, "split")
            results[name] = (torch.load(base / name / "full/checkpoints/last.ckpt", weights_only=True),
                             torch.load(base / name / "split/checkpoints/last.ckpt", weights_only=True),
                             float(losses[name].trainer.callback_metrics["train/loss"]))
        return results
    finally:
        torch.set_num_threads(threads)


SKIP = {"effitrain", "hyper_parameters", "pytorch-lightning_version"}


def differences(a, b, path: str = "") -> tuple[float, list[str]]:
    """Max |Δ| over tensors, and the paths where anything else (shape, key, number) differs."""
    if isinstance(a, torch.Tensor):
        if not isinstance(b, torch.Tensor) or a.shape != b.shape or a.dtype != b.dtype:
            return 0.0, [path]
        if not a.numel():
            return 0.0, []
        return (a.double() - b.double()).abs().max().item() if a.is_floating_point() else float((a != b).any()), []
    if isinstance(a, dict):
        if not isinstance(b, dict):
            return 0.0, [path]
        keys = {k for k in a.keys() | b.keys() if k not in SKIP and "Checkpoint" not in str(k)}
        worst, bad = 0.0, []
        for key in sorted(keys, key=str):
            if key not in a or key not in b:
                bad.append(f"{path}/{key}")
                continue
            delta, sub = differences(a[key], b[key], f"{path}/{key}")
            worst, bad = max(worst, delta), bad + sub
        return worst, bad
    if isinstance(a, (list, tuple)):
        if not isinstance(b, (list, tuple)) or len(a) != len(b):
            return 0.0, [path]
        worst, bad = 0.0, []
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            delta, sub = differences(x, y, f"{path}/{i}")
            worst, bad = max(worst, delta), bad + sub
        return worst, bad
    return 0.0, [] if a == b or isinstance(a, str) else [path]


@pytest.mark.resume
@pytest.mark.timeout(1500)
@pytest.mark.parametrize("recipe", list(PLAN))
def test_short_run_loss_is_pinned(matrix, recipe):
    assert matrix[recipe][2] == pytest.approx(PLAN[recipe][3], rel=2e-3)


@pytest.mark.resume
@pytest.mark.timeout(1500)
@pytest.mark.parametrize("recipe", list(PLAN))
def test_killed_run_resumes_exactly(matrix, recipe):
    full, resumed, loss = matrix[recipe]
    assert full["global_step"] == resumed["global_step"]
    delta, mismatched = differences(full, resumed)
    print(f"{recipe}: resume max delta {delta} loss {loss!r} mismatched {mismatched[:5]}")
    assert not mismatched and delta == 0.0, (delta, mismatched)
