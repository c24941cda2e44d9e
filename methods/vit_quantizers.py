"""The activation and weight quantizers of I&S-ViT (Zhong et al., "I&S-ViT: An Inclusive & Stable Method for
Pushing the Limit of Post-Training ViTs Quantization", arXiv 2311.10126, Sec. 4.1; official code zysxmu/IaS-ViT
``quant/quantizer.py``).

* ``UniformQuantizer``: uniform asymmetric, per tensor or per channel, initialised by percentile clipping (the
  percentile with the lowest MSE among candidates; ``percentiles=(1.0,)`` is plain min-max):
  ``s = (hi - lo) / (2^b - 1)``, ``z = round(-lo / s)``, ``x^ = (clamp(round(x / s) + z, 0, 2^b - 1) - z) s``.
* ``Log2Quantizer`` (the usual post-softmax baseline): ``x^ = 2^-clamp(round(-log2 x), 0, 2^b - 1)``; for
  3 bits every probability below 2^-7 collapses onto 2^-7.
* ``SULQuantizer`` (shift-uniform-log2, Eq. 9-10): ``y = -log2(x + eta)`` is quantized *uniformly* over its
  calibration range ``[min y, max y]``, the dequantized exponent is rounded to an integer and
  ``x^ = 2^-round(y^) - eta``: every output is ``2^k - eta`` with integer k (bit shifts on hardware), and the
  2^b codes spread over the whole range instead of clamping its tail. ``eta`` is chosen by grid search
  (lowest MSE) at calibration and frozen.

The official forward uses a step ``(max - min) / 2^b`` and ``2^b + 1`` levels while its initial search uses
``2^b - 1`` steps; here both use ``2^b`` codes (step ``(max - min) / (2^b - 1)``), so a b-bit SULQ really has
b bits. Rounding uses the straight-through estimator of ``effitrain.methods.quantization``.

Quantizer state (``scale``, ``zero_point``, ``eta``) are buffers, never parameters: I&S-ViT does not train
them after calibration. A quantizer with ``calibrating = True`` initialises itself on the next tensor it sees.
"""

from __future__ import annotations

import torch
from effitrain.methods.quantization import round_ste
from torch import nn

MIN_BITS, MAX_BITS = 2, 8
ACTIVATION_PERCENTILES = (0.999, 0.9999, 0.99999)
WEIGHT_PERCENTILES = (0.97, 0.98, 0.99, 0.995, 0.9995, 0.9999, 0.99999)
ETA_GRID = (0.001, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.1, 0.2, 0.5, 1.0)
POST_SOFTMAX_KINDS = ("sulq", "log2", "uniform")
_EPS = 1e-8


def check_bits(bits: int, what: str = "bits") -> int:
    if not isinstance(bits, int) or isinstance(bits, bool) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"{what}={bits!r} is not supported: use an integer from {MIN_BITS} to {MAX_BITS} "
                         "(the paper reports 3, 4 and 6).")
    return bits


def uniform_fake_quant(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """(clamp(round_ste(x / s) + z, 0, 2^b - 1) - z) * s; the clamp is hard (no gradient when clipped)."""
    q = (round_ste(x / scale) + zero).clamp(0, 2**bits - 1)
    return (q - zero) * scale


def uniform_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """The integer codes clamp(round(x / s) + z, 0, 2^b - 1) that ``uniform_fake_quant`` dequantizes."""
    return (torch.round(x / scale) + zero).clamp(0, 2**bits - 1)


def _percentile_rows(rows: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the values at percentiles 1 - p and p (``kthvalue``: no size limit, unlike ``quantile``)."""
    n = rows.shape[1]
    if p >= 1.0:
        return rows.amin(dim=1), rows.amax(dim=1)
    k_hi = min(n, max(1, round(p * (n - 1)) + 1))
    k_lo = min(n, max(1, round((1 - p) * (n - 1)) + 1))
    return rows.kthvalue(k_lo, dim=1).values, rows.kthvalue(k_hi, dim=1).values


class CalibratedQuantizer(nn.Module):
    """A quantizer whose state (buffers, ``initialized``) is set from the next tensor it sees once
    ``calibrating`` is set; ``enabled = False`` passes tensors through. Subclasses define ``calibrate(x)`` and
    ``fake_quant(x)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrating:
            self.calibrate(x)
            self.calibrating = False
        if not self.enabled:
            return x
        if not bool(self.initialized):
            raise RuntimeError(f"{type(self).__name__} used before calibration: calibrate it first "
                               "(calibrating = True).")
        return self.fake_quant(x)


class UniformQuantizer(CalibratedQuantizer):
    """Uniform asymmetric quantizer with percentile-MSE initialisation.

    Args:
        bits: code width b (2-8).
        num_channels: channels of a per-channel quantizer (``None``: one scale for the tensor).
        channel_dim: the channel dimension (0 for weights [out, in, ...], -1 for activations [..., C]).
        percentiles: clipping candidates; the one with the lowest MSE is kept (per channel when per-channel).
    """

    def __init__(self, bits: int, num_channels: int | None = None, channel_dim: int = -1,
                 percentiles: tuple[float, ...] = ACTIVATION_PERCENTILES) -> None:
        super().__init__()
        self.bits = check_bits(bits)
        if not percentiles or any(not 0.5 < p <= 1.0 for p in percentiles):
            raise ValueError(f"percentiles must be values in (0.5, 1], got {percentiles!r}.")
        self.channel_dim, self.percentiles = channel_dim, tuple(percentiles)
        shape = () if num_channels is None else (num_channels,)
        self.num_channels = num_channels
        self.register_buffer("scale", torch.ones(shape))
        self.register_buffer("zero_point", torch.zeros(shape))
        self.register_buffer("initialized", torch.tensor(False))
        self.enabled, self.calibrating = True, False

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        if self.num_channels is None:
            return x.reshape(1, -1)
        return x.movedim(self.channel_dim, 0).reshape(x.shape[self.channel_dim], -1)

    def _view(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.num_channels is None:
            return t
        shape = [1] * x.dim()
        shape[self.channel_dim] = -1
        return t.view(shape)

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor) -> None:
        """Percentile search: for each candidate p clip to [pct(1-p), pct(p)], keep the lowest-MSE candidate."""
        rows = self._rows(x.detach().float())
        if self.num_channels is not None and rows.shape[0] != self.num_channels:
            raise ValueError(f"expected {self.num_channels} channels at dim {self.channel_dim}, got {rows.shape[0]}.")
        best = torch.full((rows.shape[0],), float("inf"), device=rows.device)
        scale = torch.ones(rows.shape[0], device=rows.device)
        zero = torch.zeros(rows.shape[0], device=rows.device)
        for p in self.percentiles:
            lo, hi = _percentile_rows(rows, p)
            s = ((hi - lo) / (2**self.bits - 1)).clamp_min(_EPS)
            z = torch.round(-lo / s)
            err = (uniform_fake_quant(rows, s[:, None], z[:, None], self.bits) - rows).pow(2).mean(dim=1)
            better = err < best
            best, scale, zero = torch.where(better, err, best), torch.where(better, s, scale), torch.where(better, z, zero)
        self.scale.copy_(scale.reshape(self.scale.shape))
        self.zero_point.copy_(zero.reshape(self.zero_point.shape))
        self.initialized.fill_(True)

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        return uniform_fake_quant(x, self._view(self.scale, x).to(x.dtype), self._view(self.zero_point, x).to(x.dtype),
                                  self.bits)

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        return uniform_codes(x.float(), self._view(self.scale, x), self._view(self.zero_point, x), self.bits)

    def extra_repr(self) -> str:
        where = "tensor" if self.num_channels is None else f"channel ({self.num_channels} at dim {self.channel_dim})"
        return f"bits={self.bits}, per-{where}"


class Log2Quantizer(nn.Module):
    """Log2 quantizer for post-softmax probabilities in [0, 1]: x^ = 2^-clamp(round(-log2 x), 0, 2^b - 1)."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = check_bits(bits)
        self.enabled, self.calibrating = True, False

    def exponents(self, x: torch.Tensor) -> torch.Tensor:
        return round_ste(-torch.log2(x.clamp_min(1e-30))).clamp(0, 2**self.bits - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calibrating = False  # nothing to calibrate
        if not self.enabled:
            return x
        return torch.exp2(-self.exponents(x))

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


class SULQuantizer(CalibratedQuantizer):
    """Shift-uniform-log2 quantizer (SULQ, Eq. 9-10) for post-softmax probabilities.

    Args:
        bits: code width b (2-8).
        eta_grid: candidate shifts; the one with the lowest MSE on the calibration tensor is kept, then frozen.
    """

    def __init__(self, bits: int, eta_grid: tuple[float, ...] = ETA_GRID) -> None:
        super().__init__()
        self.bits = check_bits(bits)
        if not eta_grid or any(e <= 0 for e in eta_grid):
            raise ValueError(f"eta_grid must hold positive shifts, got {eta_grid!r}.")
        self.eta_grid = tuple(eta_grid)
        self.register_buffer("eta", torch.tensor(1.0))
        self.register_buffer("scale", torch.tensor(1.0))       # step of the uniform quantizer of -log2(x + eta)
        self.register_buffer("zero_point", torch.tensor(0.0))
        self.register_buffer("initialized", torch.tensor(False))
        self.enabled, self.calibrating = True, False

    def _params(self, x: torch.Tensor, eta: float) -> tuple[torch.Tensor, torch.Tensor]:
        y = -torch.log2(x + eta)
        lo, hi = y.amin(), y.amax()
        s = ((hi - lo) / (2**self.bits - 1)).clamp_min(_EPS)
        return s, torch.round(-lo / s)

    def _quantize(self, x: torch.Tensor, eta, s, z) -> torch.Tensor:
        y = uniform_fake_quant(-torch.log2(x + eta), s, z, self.bits)
        return torch.exp2(-round_ste(y)) - eta

    @torch.no_grad()
    def mse(self, x: torch.Tensor, eta: float) -> float:
        """MSE of SULQ with shift ``eta`` (its range taken from ``x``) on ``x``."""
        x = x.detach().float()
        s, z = self._params(x, eta)
        return float((self._quantize(x, eta, s, z) - x).pow(2).mean())

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        errors = [self.mse(x, eta) for eta in self.eta_grid]
        eta = self.eta_grid[min(range(len(errors)), key=errors.__getitem__)]
        s, z = self._params(x, eta)
        self.eta.fill_(eta)
        self.scale.copy_(s)
        self.zero_point.copy_(z)
        self.initialized.fill_(True)

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        return uniform_codes(-torch.log2(x.float() + self.eta), self.scale, self.zero_point, self.bits)

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        return self._quantize(x, self.eta.to(x.dtype), self.scale.to(x.dtype), self.zero_point.to(x.dtype))

    def extra_repr(self) -> str:
        return f"bits={self.bits}, eta={float(self.eta):g}"


def post_softmax_quantizer(kind: str, bits: int) -> nn.Module:
    """``sulq`` (I&S-ViT), ``log2`` or ``uniform`` (per tensor, percentile-MSE) quantizer of softmax outputs."""
    if kind == "sulq":
        return SULQuantizer(bits)
    if kind == "log2":
        return Log2Quantizer(bits)
    if kind == "uniform":
        return UniformQuantizer(bits)
    raise ValueError(f"post_softmax={kind!r} is not one of {POST_SOFTMAX_KINDS}.")
