"""Every paper-scale config (configs/*/full/*.yaml) builds on the meta device with its real architecture, and its
parameter counts, optimizer groups and per-GPU model-state estimate (benchmarks/paper_scale_plan.py) are the
ones the papers and the published model configs give."""

from __future__ import annotations

import importlib.util
import sys

import pytest
from conftest import REPO

_spec = importlib.util.spec_from_file_location("paper_scale_plan", REPO / "benchmarks/paper_scale_plan.py")
paper_scale_plan = importlib.util.module_from_spec(_spec)
sys.modules["paper_scale_plan"] = paper_scale_plan  # its dataclass looks its module up
_spec.loader.exec_module(paper_scale_plan)

LLAMA2_7B = 6_738_415_616  # published parameter count of Llama-2-7b-hf
LLAMA3_8B = 8_030_261_248  # published parameter count of Meta-Llama-3-8B


@pytest.fixture(scope="module")
def plans() -> dict[str, paper_scale_plan.Plan]:
    return {p.name: paper_scale_plan.plan(p) for p in paper_scale_plan.full_configs()}


def test_every_full_config_is_planned_and_fits_an_80gb_gpu(plans):
    assert len(plans) == len(list(REPO.glob("configs/*/full/*.yaml"))) >= 12
    for name, plan in plans.items():
        post_training = plan.groups.startswith("none")  # I&S-ViT trains one unit at a time, inside the recipe
        assert (0 if post_training else 1) <= plan.trainable <= plan.total, name
        assert plan.per_gpu < 80, f"{name}: {plan.per_gpu:.1f} GiB of model state per GPU"
    print("\n" + paper_scale_plan.table(list(plans.values())))


def test_moslora_on_llama3_8b_counts(plans):
    plan = plans["moslora_llama3_8b_commonsense.yaml"]
    # LoRA r=16 on q, k, v, up, down of 32 layers: r·(in + out) each; plus one 16x16 mixer each
    lora = 32 * 16 * ((4096 + 4096) + (4096 + 1024) * 2 + (4096 + 14336) * 2)
    mixers = 32 * 5 * 16 * 16
    assert (lora, mixers) == (28_311_552, 40_960)
    assert plan.trainable == lora + mixers and plan.total == LLAMA3_8B + lora + mixers
    assert plan.groups.startswith("AdamW: 1")


def test_mofo_on_llama2_7b_is_sharded_per_tensor(plans):
    plan = plans["mofo_llama2_7b_metamath.yaml"]
    assert plan.total == plan.trainable == LLAMA2_7B
    assert plan.strategy == "FSDP2Strategy" and plan.devices == 4
    assert plan.groups.startswith("MoFO: 1")
    gib = 1024**3
    assert plan.weights == pytest.approx(LLAMA2_7B * 4 / 4 / gib)  # fp32 master weights, a quarter per GPU
    assert plan.optimizer == pytest.approx(LLAMA2_7B * 8 / 4 / gib)  # fp32 m and v, sharded


def test_uio_trains_about_two_percent_of_llama2_7b(plans):
    plan = plans["uio_llama2_7b_32x.yaml"]
    assert plan.devices == 1  # one sequence per optimizer step, as the official run
    lora = 32 * 4 * 128 * (4096 + 4096)  # r=128 on the encoder's q, v and the transfer head's k, v
    last_encoder = 2 * 128 * (4096 + 4096)  # frozen: the memory is read before the last layer's attention
    assert plan.total == LLAMA2_7B + lora + 4096  # + the memory embedding
    assert plan.trainable == lora - last_encoder + 4096
    assert 0.019 < plan.trainable / LLAMA2_7B < 0.021  # the paper's ≈2.0%
    assert plan.groups == "AdamW: 1 (132.1M wd 0.1)"  # memory embedding decayed with the LoRAs


def test_image_and_quantization_counts(plans):
    assert plans["unipts_resnet50_imagenet_90.yaml"].total == 25_557_032  # torchvision ResNet-50
    assert plans["unipts_resnet50_imagenet_90.yaml"].method > 0  # the frozen teacher copy
    e2e = plans["efficientqat_llama2_7b_w2g64_e2e_qp.yaml"]
    linear = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    assert e2e.trainable == linear // 64  # one step size per group of 64 weights
    assert plans["illama_base_in1k.yaml"].total == pytest.approx(86.3e6, rel=0.01)  # iLLaMA-B: 86.3M (paper)
