"""effitrain as a library in someone else's project: the wheel, installed without dependencies into a fresh
virtual environment (which borrows this interpreter's installed dependencies through a ``.pth`` file), used
from a folder that has its own ``models/``, ``callbacks/`` and ``methods/`` packages.

The user's script trains its own LightningModule with MoFO, SoftCausalMask, ForgettingMonitor and
DynamicSparsity and creates this project's timm models by name; then the ``effitrain`` console script runs the
packaged quickstart recipe and prints the packaged trainer defaults.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from conftest import REPO

PARTS = ("callbacks", "configs", "datamodules", "lightning_modules", "methods", "models")

USER_MODELS = '''
"""The user's own models package (shares its name with effitrain's part)."""
import torch
from torch import nn


class TinyNet(nn.Module):
    """Two Linear layers; `soft_mask_rate` blends a token-mixing path in, as iLLaMA's mask does."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)
        self.soft_mask_rate = 1.0

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        h = h + self.soft_mask_rate * h.mean(dim=0, keepdim=True)
        return self.fc2(h)
'''

USER_METHODS = '''
"""The user's own methods package: synthetic regression data."""
import torch
from torch.utils.data import DataLoader, TensorDataset


def regression_loader(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    w = torch.randn(8, 4, generator=g)
    return DataLoader(TensorDataset(x, x @ w), batch_size=8)
'''

USER_CALLBACKS = '''
"""The user's own callbacks package: records what effitrain's optimizer and callbacks did."""
import math

import torch
from lightning.pytorch.callbacks import Callback


class Recorder(Callback):
    def __init__(self, fraction):
        self.fraction, self.rates, self.mofo, self.rel_dist = fraction, [], [], None

    def on_train_start(self, trainer, pl_module):
        self.theta0 = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.rates.append(pl_module.net.soft_mask_rate)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.before = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        optimizer = trainer.optimizers[0]
        for name, p in pl_module.named_parameters():
            if p.ndim < 2:
                continue
            moved = p.detach() != self.before[name]
            absm = optimizer.state[p]["exp_avg"].abs()
            k = max(1, math.floor(self.fraction * p.numel()))
            tau = torch.topk(absm.flatten(), k).values[-1]
            self.mofo.append({"name": name, "k": k, "moved": int(moved.sum()),
                              "moved_is_top_k": bool(torch.equal(moved, absm >= tau))})

    def on_train_end(self, trainer, pl_module):
        sq = sum(float((p.detach() - self.theta0[n]).pow(2).sum()) for n, p in pl_module.named_parameters())
        norm = math.sqrt(sum(float(p.pow(2).sum()) for p in self.theta0.values()))
        self.rel_dist = math.sqrt(sq) / norm
'''

USER_SCRIPT = '''
import json
import sys
from pathlib import Path

import effitrain
import lightning as L
import torch
import torch.nn.functional as F

import callbacks
import methods
import models
from effitrain.callbacks import DynamicSparsity, ForgettingMonitor, SoftCausalMask
from effitrain.methods.mofo import MoFO

FRACTION = 0.25


class UserModule(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = models.TinyNet()

    def forward(self, batch):
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def training_step(self, batch, batch_idx):
        return self(batch)

    def configure_optimizers(self):
        return MoFO(self.named_parameters(), lr=1e-2, fraction=FRACTION)


torch.manual_seed(0)
recorder = callbacks.Recorder(FRACTION)
monitor = ForgettingMonitor(methods.regression_loader(16, seed=1), every_n_steps=2, max_batches=2)
module = UserModule()
trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False,
                    callbacks=[SoftCausalMask(cutoff_steps=3, log=False),
                               DynamicSparsity(sparsity=0.5, decay=0.0, module_attr="net"), monitor, recorder])
trainer.fit(module, methods.regression_loader(64, seed=0))

import effitrain.models  # noqa: E402  (registers the timm models)
import timm  # noqa: E402

created = {}
for name in ("test_illama", "test_mambar"):
    net = timm.create_model(name, num_classes=3).eval()
    with torch.no_grad():
        created[name] = {"out": list(net(torch.randn(2, 3, 32, 32)).shape), "cls": type(net).__name__,
                         "module": type(net).__module__}

print("RESULT " + json.dumps({
    "effitrain_path": [str(p) for p in effitrain.__path__],
    "own_packages": {m.__name__: m.__file__ for m in (models, callbacks, methods)},
    "rates": recorder.rates, "mofo": recorder.mofo, "rel_dist": recorder.rel_dist,
    "history": monitor.history,
    "zeros": {n: [int((m.weight == 0).sum()), m.weight.numel()] for n, m in (("fc1", module.net.fc1),
                                                                             ("fc2", module.net.fc2))},
    "parametrized": [n for n, _ in module.named_parameters() if "parametrizations" in n],
    "timm": created, "listed": timm.list_models("illama_*") + timm.list_models("mambar_*"),
}))
'''


def build_wheel(dist: Path, work: Path) -> Path:
    """The wheel of a clean copy of the sources (the build writes nothing into the checkout)."""
    source = work / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    for part in PARTS:
        shutil.copytree(REPO / part, source / part, ignore=shutil.ignore_patterns("__pycache__"))
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir", "-q", "-w", str(dist),
               str(source)]
    # setuptools >= 70.1 builds wheels itself: build offline with this environment's setuptools.
    setuptools = tuple(int(x) for x in metadata.version("setuptools").split(".")[:2])
    if setuptools >= (70, 1):
        command.insert(4, "--no-build-isolation")
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    (wheel,) = dist.glob("effitrain-*.whl")
    return wheel


def make_venv(env: Path, wheel: Path) -> Path:
    """A fresh venv with the wheel installed and this interpreter's site-packages (dependencies) appended.

    A path in a ``.pth`` file is appended to ``sys.path`` without reading that folder's own ``.pth`` files, so
    this checkout's editable-install finder does not come along."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True, timeout=120)
    python = env / "bin" / "python"
    purelib = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                  check=True, capture_output=True, text=True).stdout.strip())
    ours = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    deps = [p for p in dict.fromkeys([*ours, *sys.path]) if p.endswith("site-packages") and Path(p).is_dir()]
    assert not any((Path(p) / "effitrain").exists() for p in deps), "a non-editable effitrain is in the deps"
    (purelib / "_dependencies.pth").write_text("\n".join(deps) + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", "-q",
                    str(wheel)], check=True, capture_output=True, timeout=300)
    return env


@pytest.fixture(scope="module")
def foreign(tmp_path_factory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("foreign")
    wheel = build_wheel(work / "dist", work)
    env = make_venv(work / "env", wheel)
    project = work / "project"
    for package, text in (("models", USER_MODELS), ("callbacks", USER_CALLBACKS), ("methods", USER_METHODS)):
        (project / package).mkdir(parents=True)
        (project / package / "__init__.py").write_text(textwrap.dedent(text))
    (project / "train_user.py").write_text(USER_SCRIPT)
    return {"wheel": wheel, "env": env, "project": project}


def run(command: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="1", PYTHONNOUSERSITE="1")
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_wheel_has_one_top_level_name_and_the_configs(foreign):
    names = zipfile.ZipFile(foreign["wheel"]).namelist()
    assert {n.split("/")[0] for n in names} == {"effitrain", "effitrain-0.1.0.dist-info"}
    shipped = {n.removeprefix("effitrain/configs/") for n in names if n.endswith(".yaml")}
    in_repo = {p.relative_to(REPO / "configs").as_posix() for p in (REPO / "configs").rglob("*.yaml")}
    assert shipped == in_repo and "trainer/default.yaml" in shipped and "pretrain/quickstart.yaml" in shipped
    assert {n.split("/")[1] for n in names if n.startswith("effitrain/")} == set(PARTS)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "effitrain = effitrain.lightning_modules.cli:main" in zipfile.ZipFile(foreign["wheel"]).read(
        entry_points).decode()


@pytest.mark.slow
def test_user_project_trains_with_effitrain_parts(foreign):
    done = run([str(foreign["env"] / "bin" / "python"), "train_user.py"], cwd=foreign["project"])
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
    env = foreign["env"].resolve()
    # effitrain comes from the wheel in the new environment, the user's packages from the user's folder.
    assert result["effitrain_path"] and all(Path(p).resolve().is_relative_to(env) for p in result["effitrain_path"])
    for name, file in result["own_packages"].items():
        assert Path(file).resolve() == (foreign["project"] / name / "__init__.py").resolve()
    # SoftCausalMask: linear schedule over K = 3 steps, r = 1 - t/2, then causal.
    assert result["rates"] == [1.0, 0.5, 0.0, 0.0]
    # MoFO: every step moved exactly the k = floor(0.25 * numel) entries of largest |m| of each matrix.
    assert len(result["mofo"]) == 4 * 2
    for step in result["mofo"]:
        assert step["moved_is_top_k"] and step["moved"] == step["k"], step
    assert {s["k"] for s in result["mofo"]} == {32, 16}  # fc1: 128 entries, fc2: 64
    assert all("parametrizations" not in n for n in result["parametrized"])  # masks removed at the end
    # DynamicSparsity baked exactly floor(0.5 * n) zeros into each layer.
    assert result["zeros"] == {"fc1": [64, 128], "fc2": [32, 64]}
    # ForgettingMonitor: evaluated at steps 0, 2, 4; distance 0 at the start, then ‖θ − θ0‖ / ‖θ0‖.
    history = result["history"]
    assert [h["step"] for h in history] == [0.0, 2.0, 4.0]
    assert history[0]["forgetting/rel_dist"] == 0.0
    assert history[-1]["forgetting/rel_dist"] == pytest.approx(result["rel_dist"], rel=1e-6)
    assert result["rel_dist"] > 0
    # this project's timm models, created by name
    assert result["timm"]["test_illama"] == {"out": [2, 3], "cls": "ILLaMA", "module": "effitrain.models.illama"}
    assert result["timm"]["test_mambar"] == {"out": [2, 3], "cls": "MambaR", "module": "effitrain.models.mamba_r"}
    assert {"illama_tiny_patch16_224", "mambar_tiny_patch16_224"} <= set(result["listed"])


@pytest.mark.slow
def test_console_script_runs_a_packaged_recipe_by_name(foreign):
    script = str(foreign["env"] / "bin" / "effitrain")
    tiny = ["--trainer.max_steps=2", "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1",
            "--data.init_args.block_size=32", "--data.init_args.batch_size=2", "--trainer.default_root_dir=runs/q"]
    done = run([script, "fit", "--config", "quickstart", *tiny], cwd=foreign["project"])
    assert done.returncode == 0, done.stderr[-3000:]
    project = foreign["project"]
    assert (project / "runs" / "q" / "checkpoints" / "last.ckpt").is_file()  # save_last from the packaged defaults
    assert (project / "artifacts" / "tiny_llama" / "config.json").is_file()  # the recipe's export

    shown = run([script, "fit", "--config", "quickstart", "--print_config"], cwd=project)
    assert shown.returncode == 0, shown.stderr[-3000:]
    config = yaml.safe_load(shown.stdout)
    assert config["seed_everything"] == 42
    assert config["trainer"]["gradient_clip_val"] == 1.0
    assert config["checkpoint"]["save_last"] is True and config["checkpoint"]["monitor"] == "val/loss"
    assert config["model"]["class_path"] == "effitrain.lightning_modules.causal_lm.CausalLM"
