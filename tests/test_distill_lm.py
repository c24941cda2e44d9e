"""DistillLM and the pluggable distillation objective: the loss a config selects is the loss trained on (checked
on a fixed batch against the formula) for every recipe that distils (DistillLM, UniPTS, E2E-QP from the
floating-point model); bad set-ups fail before training; greedy answers and their scores."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from effitrain.lightning_modules.cli import build_cli
from test_distillation import akl_numpy

STUDENT = dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
               num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256)
OBJECTIVES = {
    "fkl": {"class_path": "effitrain.methods.distillation.ForwardKL"},
    "rkl": {"class_path": "effitrain.methods.distillation.ReverseKL", "init_args": {"chunk_size": None}},
    "akl": {"class_path": "effitrain.methods.distillation.AdaptiveKL", "init_args": {"mu": 0.5, "chunk_size": 7}},
    "akl_mu": {"class_path": "effitrain.methods.distillation.AdaptiveKL", "init_args": {"mu": 0.2}},
}


def from_config(tmp_path, config: dict):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(config))
    return build_cli(["--config", str(path)], run=False)


def kl_rows(kind: str, s: np.ndarray, t: np.ndarray, mu: float = 0.5) -> float:
    """Token mean of FKL/RKL/AKL over the rows of [M, V] logits, re-derived in numpy."""
    if kind.startswith("akl"):
        return akl_numpy(s, t, mu)
    log_q = s - np.log(np.exp(s - s.max(-1, keepdims=True)).sum(-1, keepdims=True)) - s.max(-1, keepdims=True)
    log_p = t - np.log(np.exp(t - t.max(-1, keepdims=True)).sum(-1, keepdims=True)) - t.max(-1, keepdims=True)
    a, b = (log_p, log_q) if kind == "fkl" else (log_q, log_p)
    return float((np.exp(a) * (a - b)).sum(-1).mean())


@pytest.fixture(scope="module")
def lm_cli(tmp_path_factory, tiny_lm_dir):
    def make(objective: str | None, kd_ratio: float = 0.3):
        config = {"seed_everything": 0, "model": {
            "class_path": "effitrain.lightning_modules.distill_lm.DistillLM",
            "init_args": {"teacher": str(tiny_lm_dir), "kd_ratio": kd_ratio, "config": STUDENT,
                          **({"distill_loss": OBJECTIVES[objective]} if objective else {})}},
            "data": {"class_path": "effitrain.datamodules.instructions.InstructionDataModule",
                     "init_args": {"tokenizer": str(tiny_lm_dir), "num_examples": 40, "max_length": 200,
                                   "batch_size": 4}}}
        return from_config(tmp_path_factory.mktemp("cfg"), config)
    return make


@pytest.mark.parametrize("objective", [*OBJECTIVES, None])
def test_distill_lm_trains_on_the_configured_objective(lm_cli, objective):
    cli = lm_cli(objective)
    module, data = cli.model, cli.datamodule
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    module.log = lambda *a, **k: None
    loss = module.training_step(batch, 0)
    with torch.no_grad():
        s = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        t = module.teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    ce = F.cross_entropy(s[keep].double(), labels[keep])
    name = objective or "akl"  # DistillLM's default: AKL at mu = 0.5
    mu = OBJECTIVES.get(objective or "akl").get("init_args", {}).get("mu", 0.5)
    kd = kl_rows(name, s[keep].double().numpy(), t[keep].double().numpy(), mu)
    assert loss.item() == pytest.approx(0.7 * ce.item() + 0.3 * kd, rel=1e-5)


def test_objectives_give_different_losses_and_sft_ignores_the_teacher(lm_cli):
    losses = {}
    for objective in ("fkl", "rkl", "akl"):
        cli = lm_cli(objective, kd_ratio=1.0)
        cli.datamodule.setup("fit")
        cli.model.log = lambda *a, **k: None
        losses[objective] = cli.model.training_step(next(iter(cli.datamodule.train_dataloader())), 0).item()
    assert len({round(v, 6) for v in losses.values()}) == 3, losses
    cli = lm_cli("fkl", kd_ratio=0.0)
    cli.datamodule.setup("fit")
    batch = next(iter(cli.datamodule.train_dataloader()))
    cli.model.teacher.forward = None  # SFT must not run the teacher
    cli.model.log = lambda *a, **k: None
    assert cli.model.training_step(batch, 0).item() == pytest.approx(
        cli.model.model(**batch).loss.item(), rel=1e-6)


UNIPTS = {"class_path": "effitrain.lightning_modules.unipts.SparseDistillClassifier",
          "init_args": {"model_name": "test_resnet", "num_classes": 10, "pretrained": None}}


@pytest.mark.parametrize("objective", ["default", "akl", "fkl"])
def test_unipts_trains_on_the_configured_objective(tmp_path, objective):
    model = {**UNIPTS, "init_args": dict(UNIPTS["init_args"])}
    if objective != "default":
        model["init_args"]["distill_loss"] = OBJECTIVES[objective]
    config = {"seed_everything": 0, "model": model,
              "data": {"class_path": "effitrain.datamodules.images.ImageDataModule",
                       "init_args": {"source": "builtin:digits", "image_size": 32, "batch_size": 8}}}
    with pytest.warns(UserWarning, match="teacher"):
        module = from_config(tmp_path, config).model
    module.log = lambda *a, **k: None
    with torch.no_grad():  # the student moves away from its dense start (the teacher), as after a mask
        head = module.model.get_classifier()
        head.weight.add_(torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(1)))
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    loss = module.training_step((images, torch.zeros(6, dtype=torch.long)), 0)
    with torch.no_grad():
        s, t = module(images).double(), module.teacher_logits(images).double()
    if objective == "default":  # UniPTS: (T²/B)·Σ p_t·[ln p_t − ln p_s/τ_0], T = 4, τ_0 = 8 at epoch 0
        p_t = (t / 4).softmax(-1)
        expected = 16 / 6 * (p_t * (p_t.log() - s.log_softmax(-1) / 8)).sum().item()
    else:
        expected = kl_rows(objective, s.numpy(), t.numpy())
    assert math.isfinite(expected) and loss.item() == pytest.approx(expected, rel=1e-5)


def test_bad_setups_fail_before_training(tiny_lm_dir):
    from effitrain.lightning_modules.distill_lm import DistillLM
    from effitrain.lightning_modules.unipts import SparseDistillClassifier
    from effitrain.methods.distillation import AdaptiveKL
    from transformers import AutoModelForCausalLM

    for ratio in (-0.1, 1.5):
        with pytest.raises(ValueError, match="kd_ratio must lie in"):
            DistillLM(teacher=str(tiny_lm_dir), kd_ratio=ratio, config=STUDENT)
    with pytest.raises(ValueError, match="vocabularies differ"):
        DistillLM(teacher=str(tiny_lm_dir), config={**STUDENT, "vocab_size": 640})
    teacher = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    with pytest.raises(ValueError, match="trainable parameter"):
        DistillLM(teacher=teacher, config=STUDENT)
    with pytest.raises(ValueError, match="needs a `teacher`"):
        DistillLM(kd_ratio=0.5, config=STUDENT)
    with pytest.raises(ValueError, match="nothing to distil"):
        SparseDistillClassifier(objective="ce", distill_loss=AdaptiveKL(), model_name="test_resnet", num_classes=4)


def test_greedy_answers_and_their_scores(lm_cli):
    from effitrain.lightning_modules.generation import AnswerQuality, greedy_answers, split_prompts

    cli = lm_cli("akl")
    cli.datamodule.setup("fit")
    tokenizer, model = cli.datamodule.tokenizer, cli.model.teacher
    batch = next(iter(cli.datamodule.val_dataloader()))
    pairs = split_prompts(batch["input_ids"], batch["labels"], batch["attention_mask"])
    for (prompt, reference), ids, labels in zip(pairs, batch["input_ids"], batch["labels"], strict=True):
        start = int((labels != -100).nonzero()[0])
        assert prompt == ids[:start].tolist() and reference == [x for x in labels.tolist() if x != -100]
    # left-padded batched greedy decoding = one prompt at a time
    prompts = [p for p, _ in pairs]
    batched = greedy_answers(model, prompts, tokenizer.pad_token_id, tokenizer.eos_token_id, 6)
    alone = [greedy_answers(model, [p], tokenizer.pad_token_id, tokenizer.eos_token_id, 6)[0] for p in prompts]
    assert batched == alone
    # a perfect "model" scores 1: feed the reference answers through a stub generator
    quality = AnswerQuality(max_new_tokens=8, max_examples=3)
    import effitrain.lightning_modules.generation as generation
    refs = iter(r[:-1] for _, r in pairs)  # without the end-of-sequence token
    original = generation.greedy_answers
    generation.greedy_answers = lambda m, ps, *a: [next(refs) for _ in ps]
    try:
        quality.update(model, batch, tokenizer)
    finally:
        generation.greedy_answers = original
    scores = quality.compute()
    assert quality.seen == 3 and scores["exact_match"].item() == 1.0 and scores["rougeL"].item() == 1.0


def test_dolly_records_use_context_as_input():
    from effitrain.datamodules.instructions import TEMPLATE, TEMPLATE_WITH_INPUT, format_prompt

    record = {"instruction": "Summarise.", "context": "A long text.", "response": "Short.", "category": "summarization"}
    assert format_prompt(record) == (TEMPLATE_WITH_INPUT.format(instruction="Summarise.", input="A long text."), "Short.")
    assert format_prompt({**record, "context": ""}) == (TEMPLATE.format(instruction="Summarise."), "Short.")


@pytest.fixture(scope="module")
def packed_rtn_dir(tmp_path_factory, tiny_lm_dir):
    """The tiny LLaMA at 4 bits by round-to-nearest, packed as Block-AP writes it (with the teacher's tokenizer)."""
    from effitrain.datamodules.tokenizer import load_tokenizer
    from effitrain.methods.gptq_format import save_quantized
    from effitrain.methods.quant_surgery import decoder_blocks, named_linears, replace_module
    from effitrain.methods.quantization import QuantLinear
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("packed")
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    for block in decoder_blocks(model):
        for name, linear in list(named_linears(block)):
            replace_module(block, name, QuantLinear.from_linear(linear, bits=4, group_size=32))
    save_quantized(model, folder, bits=4, group_size=32)
    load_tokenizer(str(tiny_lm_dir)).save_pretrained(folder)
    return folder


def e2e_qp_cli(tmp_path, packed: str, teacher: str | None, objective: str | None, kd_ratio: float = 0.3):
    init = {"pretrained": packed, "kd_ratio": kd_ratio}
    if objective:
        init |= {"teacher": teacher, "distill_loss": OBJECTIVES[objective]}
    config = {"seed_everything": 0, "model": {
        "class_path": "effitrain.lightning_modules.efficientqat_e2e_qp.EfficientQATE2EQP", "init_args": init},
        "data": {"class_path": "effitrain.datamodules.instructions.InstructionDataModule",
                 "init_args": {"tokenizer": teacher, "num_examples": 40, "max_length": 200, "batch_size": 4}}}
    return from_config(tmp_path, config)


@pytest.mark.parametrize("objective", [*OBJECTIVES, None])
def test_e2e_qp_trains_on_the_configured_objective(tmp_path, packed_rtn_dir, tiny_lm_dir, objective):
    """E2E-QP distilling from the FP model: (1 − kd_ratio)·CE + kd_ratio·KD of the configured objective over the
    response tokens; no objective is the paper's plain CE."""
    cli = e2e_qp_cli(tmp_path, str(packed_rtn_dir), str(tiny_lm_dir), objective)
    module, data = cli.model, cli.datamodule
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    module.log = module.log_dict = lambda *a, **k: None
    loss = module.training_step(batch, 0)
    assert loss.requires_grad and all(p.requires_grad for p in module.param_groups())
    with torch.no_grad():
        s = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        t = module.teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1] \
            if objective else None
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    ce = F.cross_entropy(s[keep].double(), labels[keep]).item()
    if objective is None:
        assert module.teacher is None and loss.item() == pytest.approx(ce, rel=1e-5)
        return
    assert not torch.allclose(s, t, atol=1e-3)  # the packed student is not its teacher: KD is not zero
    mu = OBJECTIVES[objective].get("init_args", {}).get("mu", 0.5)
    kd = kl_rows(objective, s[keep].double().numpy(), t[keep].double().numpy(), mu)
    assert kd > 0 and loss.item() == pytest.approx(0.7 * ce + 0.3 * kd, rel=1e-5)


def test_e2e_qp_bad_distillation_setups_fail_before_training(packed_rtn_dir, tiny_lm_dir, tmp_path):
    from effitrain.lightning_modules.efficientqat_e2e_qp import EfficientQATE2EQP
    from effitrain.methods.distillation import ForwardKL
    from transformers import LlamaConfig, LlamaForCausalLM

    packed, teacher = str(packed_rtn_dir), str(tiny_lm_dir)
    for ratio in (-0.1, 1.5):
        with pytest.raises(ValueError, match="kd_ratio must lie in"):
            EfficientQATE2EQP(packed, distill_loss=ForwardKL(), teacher=teacher, kd_ratio=ratio)
    with pytest.raises(ValueError, match="both `distill_loss` and `teacher`"):
        EfficientQATE2EQP(packed, distill_loss=ForwardKL())
    with pytest.raises(ValueError, match="both `distill_loss` and `teacher`"):
        EfficientQATE2EQP(packed, teacher=teacher)
    LlamaForCausalLM(LlamaConfig(vocab_size=640, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="vocabularies differ"):
        EfficientQATE2EQP(packed, distill_loss=ForwardKL(), teacher=str(tmp_path / "other"))
