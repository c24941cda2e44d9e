"""I&S-ViT post-training quantization (Zhong et al., arXiv 2311.10126) of a trained timm ViT or iLLaMA: SULQ for
post-softmax activations and the three-stage SOS reconstruction, evaluated and exported as integer codes.

    python train.py fit --config configs/pretrain/image_quickstart.yaml   # the FP model (artifacts/digits_vit)
    python train.py fit --config configs/isvit/isvit_w4a4.yaml            # quantize, validate, export

How it maps onto Lightning: ``effitrain.methods.isvit_sos.isvit_steps`` is the whole method as a sequence of
reconstruction steps (captures, quantizer calibration and stage two happen between them). Each Lightning
training step applies one of them with the current unit's Adam, which is handed to the strategy when the unit
starts (so Lightning's progress bar, step count and ``train/loss`` follow the reconstruction); the training
batch only paces the loop. ``max_epochs: -1``: the run stops (``should_stop``) after the last step, and the
validation that follows reports the quantized model's ``val/acc`` (earlier validations are skipped). A run
stopped early (``fast_dev_run``, ``max_steps``) finishes the remaining steps in ``on_train_end``. Calibration images are ``calib_images`` images drawn (seeded) from the datamodule's training
split with its evaluation transforms. The FP model used for targets is an untouched copy that is no
submodule (not in the checkpoint). ``export_dir`` receives ``model.safetensors`` (uint8 weight codes, scales,
zero points, the activation quantizers' scales/zero points and SULQ's eta), ``config.json`` and
``isvit_stats.json`` (seconds per stage, per-unit losses); :func:`load_isvit` reads it back.

Single device only (reconstruction is sequential over blocks, as the official code).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import effitrain.models  # noqa: F401  (registers this project's architectures with timm)
import torch
from effitrain.lightning_modules.base import TrainModule
from effitrain.lightning_modules.image_classifier import ClassifierEvaluation, create_timm_model
from effitrain.methods.isvit_sos import RECONSTRUCTIONS, apply_step, isvit_steps, planned_steps
from effitrain.methods.vit_ptq import (
    load_quantized_state,
    quantize_vit,
    quantizers,
    save_quantized_vit,
    set_quant_state,
)
from effitrain.methods.vit_quantizers import UniformQuantizer
from effitrain.models.illama_isvit import illama_twins
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import Subset
from typing_extensions import override

INITS = ("percentile", "minmax")


def build_quantized(model: torch.nn.Module, w_bits: int, a_bits: int, post_softmax: str, reconstruction: str,
                    init: str, weight_channel_wise: bool) -> torch.nn.Module:
    """``quantize_vit`` with this project's attention twins; post-norm inputs per channel only for SOS (stage
    one); ``init='minmax'`` replaces the percentile search of every uniform quantizer by min/max."""
    if reconstruction not in RECONSTRUCTIONS:
        raise ValueError(f"reconstruction={reconstruction!r} is not one of {RECONSTRUCTIONS}.")
    if init not in INITS:
        raise ValueError(f"init={init!r} is not one of {INITS}.")
    model = quantize_vit(model, w_bits, a_bits, post_softmax, weight_channel_wise,
                         post_norm_channel_wise=reconstruction == "sos", twins=illama_twins())
    if init == "minmax":
        for q in quantizers(model):
            if isinstance(q, UniformQuantizer):
                q.percentiles = (1.0,)
    return model


class ISViTPTQ(ClassifierEvaluation, TrainModule):
    """Quantize a trained ViT with I&S-ViT and validate it.

    Args:
        model_name, model_kwargs, pretrained, num_classes: the FP model, as for ``ImageClassifier``.
        w_bits, a_bits: weight / activation code widths (2-8; the paper: 3, 4, 6).
        post_softmax: ``sulq`` (I&S-ViT), ``log2`` or ``uniform``.
        reconstruction: ``sos`` (the three stages), ``single`` (one-stage block reconstruction with everything
            quantized and layer-wise post-norm quantizers: the "without SOS" baseline) or ``none`` (plain PTQ).
        init: ``percentile`` (lowest-MSE percentile clipping) or ``minmax``.
        weight_channel_wise: one weight scale per output channel (the official ``--w_cw``).
        calib_images: calibration images from the training split (paper: 1024).
        iters: Adam steps per unit and stage (paper: 1000 at W3/A3 and W4/A4, 200 at W6/A6).
        batch_size: reconstruction batch (paper: 64). lr: Adam learning rate, cosine to 0 (paper: 4e-5).
        init_images: images whose activations initialise the activation quantizers.
        seed: calibration-image draw and batch sampling.
        export_dir: where the quantized model is written.

    Raises:
        ValueError: bits outside 2-8, a model without attention blocks, fewer calibration images than the
            batch, an unknown quantizer / reconstruction / init (all at construction, before calibration).
    """

    def __init__(self, model_name: str = "vit_tiny_patch16_224", pretrained: str | None = None,
                 model_kwargs: dict[str, Any] | None = None, num_classes: int = 10, w_bits: int = 4, a_bits: int = 4,
                 post_softmax: str = "sulq", reconstruction: str = "sos", init: str = "percentile",
                 weight_channel_wise: bool = True, calib_images: int = 1024, iters: int = 1000, batch_size: int = 64,
                 lr: float = 4e-5, init_images: int = 256, seed: int = 0, export_dir: str | None = None,
                 overwrite_export: bool = False):
        super().__init__(export_dir=export_dir, overwrite_export=overwrite_export)
        self.save_hyperparameters()
        if calib_images < batch_size:
            raise ValueError(f"calib_images={calib_images} is fewer than batch_size={batch_size}: every "
                             "reconstruction batch is drawn from the calibration set; raise calib_images or lower "
                             "batch_size.")
        if iters < 0 or lr <= 0 or init_images < 1:
            raise ValueError(f"need iters >= 0, lr > 0, init_images >= 1; got {iters}, {lr}, {init_images}.")
        self.automatic_optimization = False
        fp = create_timm_model(model_name, num_classes, pretrained, **(model_kwargs or {})).eval()
        self.model = build_quantized(copy.deepcopy(fp), w_bits, a_bits, post_softmax, reconstruction, init,
                                     weight_channel_wise)
        self.__dict__["fp_model"] = fp.requires_grad_(False)  # not a submodule: no checkpoint, no optimizer
        self.model.requires_grad_(False)
        self.init_eval_metrics(num_classes)
        self.stats: dict = {}

    @override
    def setup(self, stage: str) -> None:
        if self.trainer.world_size > 1:
            raise ValueError("I&S-ViT reconstructs one block at a time on one device: run it with devices: 1.")
        data = getattr(self.trainer, "datamodule", None)
        if stage == "fit" and data is not None:
            data.setup("fit")
            n = len(data.train_set)
            if n < self.hparams.calib_images and not self.trainer.fast_dev_run:
                raise ValueError(f"The training split has {n} images, fewer than calib_images="
                                 f"{self.hparams.calib_images}: lower calib_images.")

    def calibration_images(self) -> torch.Tensor:
        """``calib_images`` training images (seeded draw) with the evaluation transforms, [n, 3, H, W]."""
        data = self.trainer.datamodule
        dataset = data.train_set
        base = dataset.dataset if isinstance(dataset, Subset) else dataset
        n = self.hparams.calib_images
        if self.trainer.fast_dev_run:
            n = self.hparams.batch_size
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(self.hparams.seed))[:n]
        saved = getattr(base, "transform", None)
        if hasattr(data, "eval_transform"):
            base.transform = data.eval_transform
        try:
            return torch.stack([dataset[int(i)][0] for i in order])
        finally:
            base.transform = saved

    @override
    def configure_optimizers(self):
        # Each unit gets its own Adam (methods/isvit_sos.py), handed to the strategy when the unit starts so
        # that Lightning counts its steps; this one only stands in until then.
        return torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=self.hparams.lr)

    @override
    def on_train_start(self) -> None:
        """Draw the calibration images and start the step sequence (the FP copy goes to the device)."""
        hp = self.hparams
        images = self.calibration_images()
        self.iters = 1 if self.trainer.fast_dev_run else hp.iters
        self.fp_model.to(self.device)
        self.stats = {}
        self.total_steps = planned_steps(self.model, hp.reconstruction, self.iters)
        self.steps = isvit_steps(self.model, self.fp_model, images, reconstruction=hp.reconstruction,
                                 iters=self.iters, batch_size=hp.batch_size, lr=hp.lr, init_images=hp.init_images,
                                 device=self.device, seed=hp.seed, stats=self.stats)
        self.finished, self.current, self.pending, self.done_steps = False, None, None, 0
        rank_zero_info(f"I&S-ViT W{hp.w_bits}/A{hp.a_bits} ({hp.post_softmax}, {hp.reconstruction}): "
                       f"{len(images)} calibration images, {self.total_steps} reconstruction steps.")

    def _next_step(self):
        step, self.pending = (self.pending, None) if self.pending is not None else (next(self.steps, None), None)
        if step is None:
            self._finish()
        return step

    def _finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        self.fp_model.to("cpu")
        seconds = ", ".join(f"{k} {v:.1f} s" for k, v in self.stats["seconds"].items())
        rank_zero_info(f"I&S-ViT done: {seconds}")

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Take the next reconstruction step; a new unit's Adam is handed to the strategy here, before
        Lightning wires its step counting for the batch."""
        self.step = None
        if self.finished:
            self.trainer.should_stop = True
            return
        self.model.eval()  # Lightning switches modules to train mode at each epoch; the wrapped ViT stays in eval
        self.step = self._next_step()
        if self.step is None:
            self.trainer.should_stop = True
        elif self.step.optimizer is not self.current:
            self.current = self.step.optimizer
            self.trainer.strategy.optimizers = [self.step.optimizer]
            rank_zero_info(f"I&S-ViT {self.step.stage}: {self.step.unit}")

    @override
    def training_step(self, batch: Any, batch_idx: int) -> None:
        """Apply the step taken in ``on_train_batch_start``; the batch only paces the loop (the calibration
        activations are cached)."""
        step = self.step
        if step is None:
            return None
        optimizer = self.optimizers()
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(step.loss)
        optimizer.step()
        step.scheduler.step()
        self.log("train/loss", step.loss.detach(), prog_bar=True)
        self.done_steps += 1
        if self.done_steps >= self.total_steps:  # the last one: finish (stats, final state), then validate
            self.pending = self._next_step()
            if self.pending is None:
                self.trainer.should_stop = True
        return None

    @override
    def on_train_end(self) -> None:
        """Complete a run stopped early (e.g. ``fast_dev_run``) with the remaining steps outside Lightning, so
        that the exported model is always fully quantized."""
        if self.finished:
            return
        with torch.enable_grad():
            while (step := self._next_step()) is not None:
                apply_step(step)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    @override
    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        if self.trainer.state.fn == "fit" and not getattr(self, "finished", False):
            return  # the model is quantized only once the last stage is done: no intermediate validation
        super().validation_step(batch, batch_idx)

    @override
    def save_export(self, folder: Path) -> None:
        """Integer weight codes, scales, zero points and SULQ's η (``save_quantized_vit``) and the run's stats."""
        directory = str(folder)
        hp = self.hparams
        config = {"model_name": hp.model_name, "model_kwargs": dict(hp.model_kwargs or {}),
                  "num_classes": hp.num_classes, "w_bits": hp.w_bits, "a_bits": hp.a_bits,
                  "post_softmax": hp.post_softmax, "reconstruction": hp.reconstruction, "init": hp.init,
                  "weight_channel_wise": hp.weight_channel_wise,
                  "format": "uint8 weight codes <layer>.weight_codes; w = (codes - zero_point) * scale per output "
                            "channel; activation quantizers' scale/zero_point (and SULQ eta) as stored"}
        save_quantized_vit(self.model, directory, config)
        (Path(directory) / "isvit_stats.json").write_text(json.dumps(self.stats, indent=1))


def load_isvit(folder: str | Path) -> torch.nn.Module:
    """The quantized model written by ``ISViTPTQ`` (its ``export_dir``), with every quantizer on (outputs equal the saved
    model's)."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    model = create_timm_model(config["model_name"], config["num_classes"], None, **config["model_kwargs"]).eval()
    model = build_quantized(model, config["w_bits"], config["a_bits"], config["post_softmax"],
                            config["reconstruction"], config["init"], config["weight_channel_wise"])
    load_quantized_state(model, folder)
    set_quant_state(model, weights=True, activations=True)
    return model.requires_grad_(False)
