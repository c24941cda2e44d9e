"""ForgettingMonitor: token perplexity on reference data equals the reference formula, ‖θ − θ0‖/‖θ0‖ equals
a direct computation (LoRA adapters counted as their merged ΔW), it resumes from the original θ0, and it
composes with the plain LoRA recipe as a second --config."""

from __future__ import annotations

import copy
import math

import lightning as L
import pytest
import torch
import yaml
from conftest import REPO, run_cli
from effitrain.callbacks.forgetting_monitor import ForgettingMonitor
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, Dataset
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(cfg)


class Tokens(Dataset):
    def __init__(self, n: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, 64, (n, 16), generator=gen)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        labels = self.ids[i].clone()
        labels[:3] = -100  # ignored positions must not count
        return {"input_ids": self.ids[i], "labels": labels}


class LM(L.LightningModule):
    """A minimal LightningModule around a transformers causal LM (not one of ours)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, **batch):
        return self.model(**batch)

    def training_step(self, batch, batch_idx):
        return self(**batch).loss

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.5)


def reference_nll(model: nn.Module, loader: DataLoader) -> float:
    """Mean next-token cross-entropy over all non-ignored tokens (the definition of log-perplexity)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in loader:
            logits = model(input_ids=batch["input_ids"]).logits[:, :-1]
            labels = batch["labels"][:, 1:]
            total += nn.functional.cross_entropy(logits.reshape(-1, 64), labels.reshape(-1), ignore_index=-100,
                                                 reduction="sum").item()
            count += int((labels != -100).sum())
    return total / count


def flat_distance(a: nn.Module, b: dict[str, torch.Tensor]) -> float:
    sq = sum(float((p.detach() - b[n]).pow(2).sum()) for n, p in a.named_parameters())
    return math.sqrt(sq) / math.sqrt(sum(float(v.pow(2).sum()) for v in b.values()))


def trainer(max_steps: int, monitor: ForgettingMonitor, root) -> L.Trainer:
    return L.Trainer(max_steps=max_steps, callbacks=[monitor], logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                     default_root_dir=root)


def test_perplexity_and_distance_match_reference_formulas(tmp_path):
    module = LM(tiny_llama())
    theta0 = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    reference = DataLoader(Tokens(12, seed=1), batch_size=4)
    monitor = ForgettingMonitor(reference_data=reference, every_n_steps=2, max_batches=None)
    start_nll = reference_nll(module.model, reference)
    trainer(4, monitor, tmp_path).fit(module, DataLoader(Tokens(16, seed=2), batch_size=4))
    steps = [r["step"] for r in monitor.history]
    assert steps == [0, 2, 4]
    first, last = monitor.history[0], monitor.history[-1]
    assert first["forgetting/loss"] == pytest.approx(start_nll, rel=1e-5)
    assert first["forgetting/ppl"] == pytest.approx(math.exp(start_nll), rel=1e-5)
    assert first["forgetting/rel_dist"] == 0.0
    assert last["forgetting/loss"] == pytest.approx(reference_nll(module.model, reference), rel=1e-5)
    prefixed = {f"model.{n}": v for n, v in theta0.items()}
    assert last["forgetting/rel_dist"] == pytest.approx(flat_distance(module, prefixed), rel=1e-5)
    assert last["forgetting/rel_dist"] > 0


def test_lora_counts_as_its_merged_delta(tmp_path):
    base = tiny_llama()
    w0 = {n: p.detach().clone() for n, p in base.named_parameters()}
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    module = LM(peft_model)
    monitor = ForgettingMonitor(reference_data=DataLoader(Tokens(4, seed=1), batch_size=4))
    monitor._theta0, monitor._theta0_norm = monitor._snapshot(module)
    merged = copy.deepcopy(peft_model).merge_and_unload()
    expected = math.sqrt(sum(float((p.detach() - w0[n]).pow(2).sum()) for n, p in merged.named_parameters()))
    expected /= math.sqrt(sum(float(v.pow(2).sum()) for v in w0.values()))
    assert expected > 0
    assert monitor.relative_distance(module) == pytest.approx(expected, rel=1e-5)


class Scalar(L.LightningModule):
    """A module whose forward returns a scalar loss (no logits): ppl = exp(mean loss)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(4))

    def forward(self, batch):
        x, y = batch
        return nn.functional.mse_loss(x @ self.w, y)

    def training_step(self, batch, batch_idx):
        return self(batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_scalar_loss_module_and_resume_keeps_the_original_theta0(tmp_path):
    x, y = torch.randn(8, 4), torch.randn(8)
    data = DataLoader(list(zip(x, y, strict=True)), batch_size=4)
    module = Scalar()
    monitor = ForgettingMonitor(reference_data=data, every_n_steps=0)
    tr = trainer(2, monitor, tmp_path)
    tr.fit(module, data)
    expected = nn.functional.mse_loss(x @ module.w.detach(), y).item()
    assert monitor.history[-1]["forgetting/loss"] == pytest.approx(expected, rel=1e-5)
    assert monitor.history[-1]["forgetting/ppl"] == pytest.approx(math.exp(expected), rel=1e-5)
    ckpt = tmp_path / "mid.ckpt"
    tr.save_checkpoint(ckpt)

    resumed_monitor = ForgettingMonitor(reference_data=data, every_n_steps=0)
    resumed = Scalar()
    trainer(4, resumed_monitor, tmp_path).fit(resumed, data, ckpt_path=ckpt)
    assert len(resumed_monitor.history) == 3  # start, end of the first run, end of the resumed run
    # θ0 lives once on disk: the checkpoint holds its path, the file the starting weights
    state = torch.load(ckpt, weights_only=False)["callbacks"]["ForgettingMonitor"]
    assert state["theta0"] == str(tmp_path / "forgetting_theta0.safetensors")
    assert torch.equal(load_file(state["theta0"])["w"], torch.ones(4))
    dist = (resumed.w.detach() - torch.ones(4)).norm().item() / torch.ones(4).norm().item()
    assert resumed_monitor.history[-1]["forgetting/rel_dist"] == pytest.approx(dist, rel=1e-5)


def test_bad_arguments_fail_early():
    with pytest.raises(ValueError, match="every_n_steps"):
        ForgettingMonitor(reference_data=DataLoader([]), every_n_steps=-1)
    with pytest.raises(ValueError, match="max_batches"):
        ForgettingMonitor(reference_data=DataLoader([]), max_batches=0)


def test_fragment_composes_with_the_lora_recipe(capsys):
    """The one ForgettingMonitor fragment: appended to a recipe from the command line it adds the callback
    with the fragment's own settings; the MoFO recipes list it by path and resolve to the same callback."""
    def resolved(args):
        with pytest.raises(SystemExit):
            run_cli(["fit", *args, "--print_config"])
        return yaml.safe_load(capsys.readouterr().out)

    fragment = yaml.safe_load((REPO / "configs/callbacks/forgetting_monitor.yaml").read_text())
    plain = resolved(["--config", str(REPO / "configs/moslora/lora.yaml")])
    assert not plain["trainer"].get("callbacks")
    lora = resolved(["--config", str(REPO / "configs/moslora/lora.yaml"),
                     f"--trainer.callbacks+={REPO / 'configs/callbacks/forgetting_monitor.yaml'}"])
    (callback,) = lora["trainer"]["callbacks"]
    assert callback["class_path"] == fragment["class_path"] and lora["model"]["init_args"]["adapter"]
    for key in ("every_n_steps", "max_batches"):
        assert callback["init_args"][key] == fragment["init_args"][key]
    for recipe in ("mofo", "adamw_ft"):
        (listed,) = resolved(["--config", str(REPO / f"configs/mofo/{recipe}.yaml")])["trainer"]["callbacks"]
        assert listed == callback
