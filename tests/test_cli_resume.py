"""Nothing lost: exports that never clobber, resume that belongs to the recipe, checkpoints by steps and at the
end of training, a re-planned schedule, checksums, a divergence guard, and errors that name the file."""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_cli
from test_reliability import tiny_fit_args

MOSLORA = str(REPO / "configs" / "moslora" / "moslora.yaml")
QUIET = ["--trainer.limit_val_batches=0", "--checkpoint.monitor=null", "--trainer.enable_progress_bar=false",
         "--trainer.enable_model_summary=false", "--trainer.logger=false"]


def quick(tiny_lm_dir, corpus, root: str, *extra: str) -> list[str]:
    return tiny_fit_args(tiny_lm_dir, corpus, *QUIET, f"--trainer.default_root_dir={root}", *extra)


def test_compat_lightning_cli_parse_ckpt_path():
    """EffitrainCLI overrides this private LightningCLI method (resume belongs to the recipe)."""
    from lightning.pytorch.cli import LightningCLI

    assert "self._parse_ckpt_path()" in inspect.getsource(LightningCLI.__init__)
    assert list(inspect.signature(LightningCLI._parse_ckpt_path).parameters) == ["self"]


@pytest.fixture(scope="module")
def two_step_run(tmp_path_factory, tiny_lm_dir, small_corpus):
    """A finished 2-step quickstart run: its folder (checkpoints/last.ckpt) and export (model/)."""
    root = tmp_path_factory.mktemp("run")
    run_cli(quick(tiny_lm_dir, small_corpus, "a", "--trainer.max_steps=2", "--model.init_args.export_dir=a/model",
                  "--model.init_args.lr_scheduler=effitrain.lightning_modules.schedules.WarmupCosine",
                  "--model.init_args.lr_scheduler.init_args.min_lr_ratio=0.1",
                        "--model.init_args.lr_scheduler.init_args.warmup_steps=0"), cwd=root)
    return root


# 2. resume belongs to the recipe ----------------------------------------------------------------------------
def test_other_recipe_checkpoint_fails_naming_both_classes(two_step_run, tiny_lm_dir):
    args = ["fit", "--config", MOSLORA, f"--model.init_args.pretrained={tiny_lm_dir}",
            f"--data.init_args.tokenizer={tiny_lm_dir}", "--model.init_args.export_dir=null",
            "--model.init_args.merged_dir=null", f"--ckpt_path={two_step_run / 'a/checkpoints/last.ckpt'}"]
    with pytest.raises(ValueError, match=r"written by the recipe effitrain\.lightning_modules\.causal_lm\.CausalLM, "
                                         r"but this command trains effitrain\.lightning_modules\.adapter_lm\.AdapterCausalLM"):
        run_cli(args, cwd=two_step_run)


def test_other_model_arguments_fail_naming_the_key(two_step_run, tiny_lm_dir, small_corpus):
    args = quick(tiny_lm_dir, small_corpus, "a", "--trainer.max_steps=3", "--model.init_args.dtype=float64",
                 "--ckpt_path=last")
    with pytest.raises(ValueError, match="other model arguments: dtype: None in the checkpoint, 'float64' given"):
        run_cli(args, cwd=two_step_run)


def test_same_recipe_resume_keeps_run_arguments_identity_and_replans_schedule(two_step_run, tiny_lm_dir,
                                                                               small_corpus):
    cli = run_cli(quick(tiny_lm_dir, small_corpus, "a", "--trainer.max_steps=4", "--model.init_args.export_dir=b",
                        "--model.init_args.lr_scheduler=effitrain.lightning_modules.schedules.WarmupCosine",
                        "--model.init_args.lr_scheduler.init_args.min_lr_ratio=0.1",
                        "--model.init_args.lr_scheduler.init_args.warmup_steps=0", "--ckpt_path=last"),
                  cwd=two_step_run)
    assert cli.trainer.global_step == 4 and cli.model.export_dir == "b"  # the command line's export_dir
    first = json.loads((two_step_run / "a/model/effitrain_run.json").read_text())
    second = json.loads((two_step_run / "b/effitrain_run.json").read_text())
    assert second["run_id"] == first["run_id"] and second["global_step"] == 4  # one run, resumed
    scheduler = cli.trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.total_steps == 4  # re-planned from 2 to the new max_steps
    assert scheduler.get_last_lr()[0] == pytest.approx(3e-3 * 0.1)  # 4 of 4 steps: at the floor, not past it


def test_ckpt_path_last_without_checkpoint_fails(tmp_path, tiny_lm_dir, small_corpus):
    with pytest.raises(FileNotFoundError, match="there is no .*last.ckpt to resume from"):
        run_cli(quick(tiny_lm_dir, small_corpus, "new", "--ckpt_path=last"), cwd=tmp_path)


# 1. exports never clobber ------------------------------------------------------------------------------------
def test_fast_dev_run_exports_nothing(tmp_path, tiny_lm_dir, small_corpus):
    run_cli(quick(tiny_lm_dir, small_corpus, "r", "--trainer.fast_dev_run=1", "--model.init_args.export_dir=out"),
            cwd=tmp_path)
    assert not (tmp_path / "out").exists()


def test_export_of_another_run_is_kept_unless_overwrite(two_step_run, tmp_path, tiny_lm_dir, small_corpus):
    target = two_step_run / "a/model"
    before = (target / "model.safetensors").read_bytes()
    args = quick(tiny_lm_dir, small_corpus, str(tmp_path / "other"), "--trainer.max_steps=1",
                 f"--model.init_args.export_dir={target}")
    with pytest.raises(FileExistsError, match=r"already holds run \w+ of effitrain.lightning_modules.causal_lm."
                                              r"CausalLM .*; this is run \w+ of .*overwrite_export=true"):
        run_cli(args, cwd=tmp_path)
    assert (target / "model.safetensors").read_bytes() == before
    assert not (tmp_path / "other" / "checkpoints").exists()  # refused before training


def test_overwrite_export_replaces_and_a_crash_while_writing_keeps_the_old(tmp_path, tiny_lm_dir, small_corpus,
                                                                          monkeypatch):
    from effitrain.lightning_modules.causal_lm import CausalLM

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("previous model")
    args = quick(tiny_lm_dir, small_corpus, "r", "--trainer.max_steps=1", "--model.init_args.export_dir=out",
                 "--model.init_args.overwrite_export=true")
    original = CausalLM.save_export

    def crash_midway(self, folder):
        original(self, folder)
        raise OSError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(CausalLM, "save_export", crash_midway)
        with pytest.raises(OSError, match="disk full"):
            run_cli(args, cwd=tmp_path)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["old.txt"]
    run_cli(args, cwd=tmp_path)
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert "old.txt" not in files and {"model.safetensors", "effitrain_run.json", "tokenizer.json"} <= files


# 3. checkpoints by steps and at the end ----------------------------------------------------------------------
def test_last_checkpoint_every_n_steps_and_at_the_end_of_training(tmp_path, tiny_lm_dir, small_corpus,
                                                                  monkeypatch):
    from effitrain.callbacks.last_checkpoint import LastCheckpoint

    steps = []
    original = LastCheckpoint.save
    monkeypatch.setattr(LastCheckpoint, "save", lambda self, trainer: (steps.append(trainer.global_step),
                                                                       original(self, trainer)))
    run_cli(quick(tiny_lm_dir, small_corpus, "r", "--trainer.max_epochs=1", "--trainer.limit_train_batches=5",
                  "--last_checkpoint.every_n_train_steps=2"), cwd=tmp_path)
    assert steps == [2, 4, 5]  # by steps, then the end of the epoch-bounded run
    assert torch.load(tmp_path / "r/checkpoints/last.ckpt", weights_only=True)["global_step"] == 5


# 5. integrity --------------------------------------------------------------------------------------------------
def test_corrupted_checkpoint_fails_naming_it(two_step_run, tmp_path, tiny_lm_dir, small_corpus):
    damaged = tmp_path / "damaged.ckpt"
    data = bytearray((two_step_run / "a/checkpoints/last.ckpt").read_bytes())
    middle = len(data) // 2
    data[middle:middle + 16384] = os.urandom(16384)
    damaged.write_bytes(bytes(data))
    args = quick(tiny_lm_dir, small_corpus, str(two_step_run / "a"), "--trainer.max_steps=3",
                 f"--ckpt_path={damaged}")
    with pytest.raises(ValueError, match=f"{damaged}.*(corrupted|damaged)"):
        run_cli(args, cwd=tmp_path)


def test_corrupted_export_fails_naming_the_file(two_step_run, tmp_path, tiny_lm_dir, small_corpus):
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(two_step_run / "a/model", copy)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5000:-4000] = os.urandom(1000)
    weights.write_bytes(bytes(data))
    args = tiny_fit_args(copy, small_corpus, *QUIET, "--trainer.max_steps=1")
    with pytest.raises(ValueError, match=f"{weights} is corrupted"):
        run_cli(args, cwd=tmp_path)


def test_divergence_stops_and_names_the_last_checkpoint(tmp_path, tiny_lm_dir, small_corpus, monkeypatch):
    from effitrain.lightning_modules.causal_lm import CausalLM

    original = CausalLM.training_step
    monkeypatch.setattr(CausalLM, "training_step", lambda self, batch, i: original(self, batch, i)
                        * (1000.0 if self.global_step >= 5 else 1.0))
    args = quick(tiny_lm_dir, small_corpus, "r", "--trainer.max_steps=10", "--last_checkpoint.every_n_train_steps=2",
                 "--finite_loss.window=3")
    with pytest.raises(FloatingPointError, match=r"diverged at global step 6: .* more than 10x the median") as err:
        run_cli(args, cwd=tmp_path)
    assert f"{Path('r/checkpoints/last.ckpt')}" in str(err.value)
    assert torch.load(tmp_path / "r/checkpoints/last.ckpt", weights_only=True)["global_step"] == 4
    assert not (tmp_path / "r/model").exists()


# 7. errors that name the file, the key and the fix ---------------------------------------------------------
QUICKSTART = str(REPO / "configs" / "pretrain" / "quickstart.yaml")


def run_main(args: list[str], cwd, capsys) -> tuple[object, str]:
    """The console script in this process: its exit code/message and everything it wrote to stderr."""
    from effitrain.lightning_modules.cli import main

    previous = Path.cwd()
    os.chdir(cwd)
    try:
        with pytest.raises(SystemExit) as exit_:
            main(args)
    finally:
        os.chdir(previous)
    return exit_.value.code, capsys.readouterr().err


def test_parser_error_comes_first_and_usage_is_short(tmp_path, capsys):
    code, err = run_main(["fit", "--config", QUICKSTART, "--trainer.max_stepz=3"], tmp_path, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and lines[0].startswith("error:") and "max_stepz" in lines[0] and len(lines) <= 3, err


def test_an_error_in_a_constructor_is_printed_once(tmp_path, capsys):
    code, err = run_main(["fit", "--config", QUICKSTART, "--model.init_args.pretrained=./no/such/model"], tmp_path,
                         capsys)
    assert str(code).startswith("error: The starting model './no/such/model' does not exist")
    assert "does not exist" not in err and "Traceback" not in err  # the exit message is the only copy


def test_malformed_jsonl_names_file_and_line(tmp_path):
    from effitrain.datamodules.sources import load_documents

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.jsonl").write_text('{"text": "fine"}\n{"text": "also fine"}\n')
    (tmp_path / "data" / "b.jsonl").write_text('{"text": "fine"}\n\n{"text": "broken\n')
    with pytest.raises(ValueError, match=r"b\.jsonl, line 3: not valid JSON"):
        load_documents(str(tmp_path / "data"))


def test_malformed_parquet_names_the_file(tmp_path):
    from effitrain.datamodules.sources import load_documents

    (tmp_path / "bad.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(ValueError, match=r"bad\.parquet is not a valid Parquet file"):
        load_documents(str(tmp_path / "bad.parquet"))


def uio_fit(tmp_path, tiny_lm_dir, **kwargs):
    import lightning as L
    from effitrain.datamodules.long_context import PasskeyDataModule
    from effitrain.lightning_modules.uio_lm import UIOLM

    model = dict(pretrained=str(tiny_lm_dir), segment_length=32, num_memory_tokens=4, encoder_rank=4,
                 transfer_rank=4)
    data = PasskeyDataModule(tokenizer=str(tiny_lm_dir), train_length=64, val_lengths=[64], min_gap=20,
                             key_digits=1)
    module = UIOLM(**{**model, **kwargs})
    L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False, enable_checkpointing=False,
              default_root_dir=tmp_path).fit(module, datamodule=data)


def test_uio_rejects_a_tokenizer_larger_than_the_vocabulary(tmp_path, tiny_lm_dir):
    small = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, max_position_embeddings=256)
    with pytest.raises(ValueError, match="tokenizer has 512 tokens but the base model's embedding only 300"):
        uio_fit(tmp_path, tiny_lm_dir, pretrained=None, config=small)


def test_uio_rejects_a_segment_as_long_as_the_training_sequences(tmp_path, tiny_lm_dir):
    with pytest.raises(ValueError, match="segment_length=64 is not shorter than the training sequences"):
        uio_fit(tmp_path, tiny_lm_dir, segment_length=64)
