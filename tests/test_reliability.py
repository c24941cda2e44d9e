"""Bad input fails before training with a message naming the problem; a NaN loss stops the run and keeps
checkpoints; the final model is written as safetensors."""

from __future__ import annotations

import pytest
import torch
from conftest import REPO, run_cli

QUICKSTART = str(REPO / "configs" / "pretrain" / "quickstart.yaml")


def tiny_fit_args(tiny_lm_dir, corpus, *extra: str) -> list[str]:
    return ["fit", "--config", QUICKSTART, f"--model.init_args.pretrained={tiny_lm_dir}",
            "--model.init_args.export_dir=null", f"--data.init_args.source={corpus}",
            f"--data.init_args.tokenizer={tiny_lm_dir}", "--data.init_args.block_size=32",
            "--data.init_args.batch_size=4", *extra]


def test_missing_data_path(tmp_path):
    with pytest.raises((FileNotFoundError, ValueError), match="does not exist. Give an existing"):
        run_cli(["fit", "--config", QUICKSTART, "--data.init_args.source=./no/such/folder"], cwd=tmp_path)


def test_empty_dataset(tmp_path, tiny_lm_dir):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("   \n")
    with pytest.raises(ValueError, match="empty"):
        run_cli(tiny_fit_args(tiny_lm_dir, tmp_path / "empty"), cwd=tmp_path)


def test_block_size_over_context(tmp_path, tiny_lm_dir, small_corpus):
    args = tiny_fit_args(tiny_lm_dir, small_corpus, "--data.init_args.block_size=1024")
    with pytest.raises(ValueError, match="exceeds the model's context"):
        run_cli(args, cwd=tmp_path)


def test_unknown_model_name_offline(tmp_path):
    with pytest.raises(ValueError, match="could not\s+be fetched from the hub"):
        run_cli(["fit", "--config", QUICKSTART, "--model.init_args.pretrained=nobody/no-such-model-xyz"],
                cwd=tmp_path)


def test_missing_artifact_names_the_command(tmp_path):
    with pytest.raises((FileNotFoundError, ValueError), match="python train.py fit --config configs/pretrain/quickstart.yaml"):
        run_cli(["fit", "--config", QUICKSTART, "--model.init_args.pretrained=artifacts/tiny_llama"], cwd=tmp_path)


def test_misspelled_config_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  max_stepz: 3\n")
    with pytest.raises(SystemExit):
        run_cli(["fit", "--config", QUICKSTART, "--config", str(bad)])
    assert "max_stepz" in capsys.readouterr().err


def test_nan_loss_stops_and_keeps_checkpoints(tmp_path, tiny_lm_dir, small_corpus, monkeypatch):
    from effitrain.lightning_modules.causal_lm import CausalLM

    original = CausalLM.training_step

    def poisoned(self, batch, batch_idx):
        loss = original(self, batch, batch_idx)
        return loss * float("nan") if self.global_step >= 3 else loss

    monkeypatch.setattr(CausalLM, "training_step", poisoned)
    args = tiny_fit_args(tiny_lm_dir, small_corpus, "--trainer.max_steps=10", "--checkpoint.every_n_train_steps=2",
                         "--checkpoint.monitor=null", "--checkpoint.save_top_k=-1",
                         "--trainer.default_root_dir=run", "--trainer.limit_val_batches=0")
    with pytest.raises(FloatingPointError, match="Non-finite training loss"):
        run_cli(args, cwd=tmp_path)
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("*.ckpt"))
    assert "last.ckpt" in kept and len(kept) >= 2, kept
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] == 2


def test_export_is_safetensors_and_reloads(tmp_path, tiny_lm_dir, small_corpus):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    args = tiny_fit_args(tiny_lm_dir, small_corpus, "--trainer.max_steps=2", "--trainer.limit_val_batches=1",
                         "--model.init_args.export_dir=out", "--trainer.default_root_dir=run")
    cli = run_cli(args, cwd=tmp_path)
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert "model.safetensors" in files and "tokenizer.json" in files
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    ids = AutoTokenizer.from_pretrained(tmp_path / "out")("def f(x): return x", return_tensors="pt")["input_ids"]
    cli.model.model.eval()
    assert torch.equal(reloaded(ids).logits, cli.model.model(ids).logits)
