"""MoFO: the Momentum-Filtered Optimizer (Chen et al., "MoFO: Momentum-Filtered Optimizer for
Mitigating Forgetting in LLM Fine-Tuning", arXiv 2407.20999, Algorithm 1; official code
YChen-zzz/MoFO ``algorithms_MoFO.py``).

Each parameter tensor is one partition. At step t, with fraction α:

    θ ← θ · (1 − lr·λ)                                    decoupled weight decay, every entry
    m ← β1·m + (1 − β1)·g,   v ← β2·v + (1 − β2)·g²        dense moments, fp32, every entry
    S = the k = max(1, ⌊α·numel⌋) entries of largest |m|   (entries tied with the k-th value join S)
    θ_S ← θ_S − lr/(1 − β1^t) · m_S / (√v_S / √(1 − β2^t) + ε)

Tensors named ``*bias*`` / ``*norm*`` take the full Adam step, so α = 1 is exactly AdamW; tensors named
``*norm*`` / ``*ln_f*`` get no weight decay (as in the official optimizer).

Sharded parameters (FSDP2 ``DTensor``s, each rank holding a slice of the tensor) stay one partition each:
k counts the whole tensor and the threshold is found over all shards (``sharded_topk_threshold``
all-reduces its counts), so the update equals one process's on the gathered tensor.

Speed. The dense part is one fused kernel (``torch._fused_adamw_`` on CPU and CUDA) that updates m
and v and writes the full Adam step into a zeroed buffer u; the filtered step is then θ += u ⊙ [|m| >= τ]
(a compare and an ``addcmul``). ``torch.topk`` / ``kthvalue`` on |m| cost several AdamW steps on CPU, so
``topk_threshold`` uses dense compare-and-count passes instead: a band of values around a first guess
(the previous step's threshold, or cold, a fixed random sample of |m|) is counted at both ends, and the
k-th largest value is taken directly among the few values inside it; when the band misses, a
safeguarded search on exact counts ``#{|m| >= t}`` moves it. The selected set is exactly the top-k
(+ ties) whatever path the search took, so resumed runs and DDP ranks (same all-reduced gradients) make
the same update. Tensors with the same number of entries are stacked so each pass covers all of them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from effitrain.methods.topk_threshold import sharded_topk_threshold, topk_threshold
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Shard

_STACK_CAP = 1 << 25  # at most this many entries stacked per pass (bounds the scratch memory)


def _is_dense(name: str | None, param: Tensor, dense_keywords: Sequence[str]) -> bool:
    """The partitions that take the full Adam step: names containing a dense keyword; without names
    (plain parameter lists), tensors of fewer than two dimensions (biases and norm weights)."""
    if name is not None:
        return any(key in name for key in dense_keywords)
    return param.ndim < 2


class MoFO(torch.optim.Optimizer):
    """Momentum-filtered AdamW (arXiv 2407.20999, Algorithm 1).

    Args:
        params: parameters or param groups, as for ``torch.optim.AdamW``. Named parameters
            (``model.named_parameters()``, or :func:`mofo_param_groups`) let the dense rule go by name.
        lr: learning rate.
        betas: (β1, β2) of the moment averages.
        eps: ε added to the bias-corrected √v.
        weight_decay: decoupled weight decay λ, applied to every entry.
        fraction: α, the fraction of each filtered tensor updated per step (settable per group);
            the paper advises 0.05 to 0.2 and uses 0.15. 1.0 is AdamW.
        dense_keywords: names containing any of these take the full Adam step (paper: bias, norm).
            Parameters given without names are dense when they have fewer than 2 dimensions.
        no_decay_keywords: named parameters containing any of these get no weight decay (official: norm, ln_f).

    Raises:
        ValueError: on a learning rate, ε, β, weight decay or fraction out of range.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[tuple[str, Tensor]] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        fraction: float = 0.15,
        dense_keywords: Sequence[str] = ("bias", "norm"),
        no_decay_keywords: Sequence[str] = ("norm", "ln_f"),
    ) -> None:
        if not lr >= 0.0:
            raise ValueError(f"Invalid learning rate {lr}: must be >= 0")
        if not eps >= 0.0:
            raise ValueError(f"Invalid eps {eps}: must be >= 0")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"Invalid betas {betas}: both must be in [0, 1)")
        if not weight_decay >= 0.0:
            raise ValueError(f"Invalid weight_decay {weight_decay}: must be >= 0")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, fraction=fraction)
        super().__init__(params, defaults)
        self.dense_keywords, self.no_decay_keywords = tuple(dense_keywords), tuple(no_decay_keywords)
        for group in self.param_groups:
            if not 0.0 < group["fraction"] <= 1.0:
                raise ValueError(
                    f"Invalid fraction {group['fraction']}: must be in (0, 1] (the paper advises 0.05-0.2; "
                    "1.0 is AdamW)"
                )
        self._buffers: dict[torch.device, tuple[Tensor, Tensor, Tensor]] = {}
        self._hints: dict[tuple, list[tuple[float, float, float, float]]] = {}  # (τ, density, mean, band)

    # ----------------------------------------------------------------------------------------- state
    def _init_state(self, p: Tensor) -> dict[str, Tensor]:
        state = self.state[p]
        if len(state) == 0:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As ``Optimizer.load_state_dict``, but the moments stay fp32 for low-precision parameters
        (the base class casts every floating state tensor to the parameter's dtype)."""
        saved = state_dict["state"]
        super().load_state_dict(state_dict)
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(ids, params, strict=True):
            if i in saved and p.dtype != torch.float32:
                for key in ("exp_avg", "exp_avg_sq"):
                    self.state[p][key] = saved[i][key].to(device=p.device, dtype=torch.float32)

    # ------------------------------------------------------------------------------------------ step
    def _buffers_for(self, device: torch.device, numel: int) -> tuple[Tensor, Tensor, Tensor]:
        """Persistent flat fp32 buffers (Adam steps, |m| then masks, count flags), shared by all tensors
        of a device and grown on demand: about 3 x min(_STACK_CAP, total) entries."""
        bufs = self._buffers.get(device)
        if bufs is None or bufs[0].numel() < numel:
            bufs = tuple(torch.empty(numel, dtype=torch.float32, device=device) for _ in range(3))
            self._buffers[device] = bufs
        return bufs

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - the Optimizer signature
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            names = group.get("param_names")
            beta1, beta2 = group["betas"]
            lr, eps, wd, fraction = group["lr"], group["eps"], group["weight_decay"], group["fraction"]
            by_kind: dict[tuple, list[tuple[Tensor, int]]] = {}
            sharded: dict[float, list[tuple[Tensor, int]]] = {}
            for j, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("MoFO does not support sparse gradients")
                name = names[j] if names else None
                dense = fraction >= 1.0 or _is_dense(name, p, self.dense_keywords)
                k = p.numel() if dense else max(1, int(p.numel() * fraction))  # of the whole tensor if sharded
                decay = 0.0 if name is not None and any(key in name for key in self.no_decay_keywords) else wd
                if isinstance(p, DTensor):
                    sharded.setdefault(decay, []).append((p, k))
                else:
                    by_kind.setdefault((p.device, p.dtype, decay), []).append((p, k))
            for (_, dtype, decay), members in by_kind.items():
                self._update(members, dtype, lr, beta1, beta2, eps, decay)
            for decay, members in sharded.items():
                self._update_sharded(members, lr, beta1, beta2, eps, decay)
        return loss

    def _update_sharded(self, members: list[tuple[DTensor, int]], lr: float, beta1: float, beta2: float,
                        eps: float, wd: float) -> None:
        """One step for ``DTensor`` parameters: the same math on each rank's local shard, with the
        top-k threshold of each filtered tensor searched over all its shards (one all-reduce of counts per
        bisection round for all tensors). The moments stay ``DTensor``s shaped like their parameters, so
        sharded checkpoints save and reshard them like any optimizer state."""
        group = None
        for p, _ in members:
            if not all(isinstance(pl, Shard) for pl in p.placements) or p.device_mesh.ndim != 1:
                raise NotImplementedError(
                    f"MoFO supports DTensor parameters sharded on a 1-D mesh (FSDP2), got placements "
                    f"{p.placements} on a {p.device_mesh.ndim}-D mesh (replicated dimensions, e.g. HSDP, would "
                    "count entries twice).")
            group = p.device_mesh.get_group()
        states = [self._init_state(p) for p, _ in members]
        torch._foreach_add_([s["step"] for s in states], 1.0)
        local = [p.to_local() for p, _ in members]
        if wd != 0:
            torch._foreach_mul_(local, 1 - lr * wd)
        exp_avgs = [s["exp_avg"].to_local() for s in states]
        exp_avg_sqs = [s["exp_avg_sq"].to_local() for s in states]
        grads = [p.grad.to_local().float() for p, _ in members]
        updates = [torch.zeros_like(m) for m in exp_avgs]
        _adam_step_into(updates, grads, exp_avgs, exp_avg_sqs, [s["step"] for s in states], lr, beta1, beta2, eps,
                        fused=all(u.stride() == g.stride() == m.stride() == v.stride()
                                  for u, g, m, v in zip(updates, grads, exp_avgs, exp_avg_sqs, strict=True)))
        filtered = [i for i, (p, k) in enumerate(members) if k < p.numel()]
        for i, (p, k) in enumerate(members):
            if k >= p.numel():
                local[i].add_(updates[i].to(local[i].dtype))
        absm = [exp_avgs[i].abs().reshape(-1) for i in filtered]
        taus = sharded_topk_threshold(absm, [members[i][1] for i in filtered], group)
        for i, a, tau in zip(filtered, absm, taus, strict=True):
            local[i].add_((updates[i] * (a >= tau).view(updates[i].shape)).to(local[i].dtype))

    def _thresholds(self, absm: Tensor, k: int, scratch: Tensor, key: tuple) -> list[float]:
        """Per row of |m| (a stack of same-size tensors), the top-k threshold; ``key`` names the stack
        so the next step's search starts from this one's result."""
        tau, self._hints[key] = topk_threshold(absm, k, scratch, self._hints.get(key))
        return tau

    def _update(
        self, members: list[tuple[Tensor, int]], dtype: torch.dtype, lr: float, beta1: float, beta2: float,
        eps: float, wd: float,
    ) -> None:
        """One step for tensors sharing device and dtype, in chunks of at most ``_STACK_CAP`` entries (so
        the scratch stays bounded); filtered tensors with the same (numel, k) are adjacent so their
        threshold searches share each pass."""
        states = [self._init_state(p) for p, _ in members]
        torch._foreach_add_([s["step"] for s in states], 1.0)
        if wd != 0:
            torch._foreach_mul_([p for p, _ in members], 1 - lr * wd)
        order = sorted(range(len(members)), key=lambda i: (members[i][1] >= members[i][0].numel(),
                                                           members[i][0].numel(), members[i][1]))
        chunk, total = [], 0
        for i in order:
            n = members[i][0].numel()
            if chunk and total + n > _STACK_CAP:
                self._update_chunk([members[j] for j in chunk], [states[j] for j in chunk], dtype, lr, beta1,
                                   beta2, eps)
                chunk, total = [], 0
            chunk.append(i)
            total += n
        if chunk:
            self._update_chunk([members[j] for j in chunk], [states[j] for j in chunk], dtype, lr, beta1,
                               beta2, eps)

    def _update_chunk(
        self, members: list[tuple[Tensor, int]], states: list[dict[str, Tensor]], dtype: torch.dtype,
        lr: float, beta1: float, beta2: float, eps: float,
    ) -> None:
        """u = −lr·m̂/(√v̂ + ε) for every entry (moments updated densely), then θ += u ⊙ [|m| >= τ]."""
        params = [p for p, _ in members]
        device, numels = params[0].device, [p.numel() for p in params]
        step_buf, abs_buf, flag_buf = self._buffers_for(device, sum(numels))
        offsets = [0]
        for n in numels:
            offsets.append(offsets[-1] + n)
        step_buf[: offsets[-1]].zero_()
        exp_avgs, exp_avg_sqs = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
        updates = [step_buf[o : o + n].view(m.shape) if m.is_contiguous() else torch.zeros_like(m)
                   for m, o, n in zip(exp_avgs, offsets[:-1], numels, strict=True)]  # u laid out as the state
        grads = [p.grad if dtype == torch.float32 else p.grad.float() for p in params]
        steps = [s["step"] for s in states]
        # the fused kernel walks raw memory: it needs u, g, m and v laid out alike (they may not be, e.g. a
        # contiguous optimizer state resumed into a channels_last model); the rest take the foreach path
        alike = [u.stride() == g.stride() == m.stride() == v.stride()
                 for u, g, m, v in zip(updates, grads, exp_avgs, exp_avg_sqs, strict=True)]
        for fused in (True, False):
            idx = [i for i, a in enumerate(alike) if a == fused]
            if idx:
                _adam_step_into([updates[i] for i in idx], [grads[i] for i in idx], [exp_avgs[i] for i in idx],
                                [exp_avg_sqs[i] for i in idx], [steps[i] for i in idx], lr, beta1, beta2, eps,
                                fused=fused)
        del grads
        groups: dict[tuple[int, int], list[int]] = {}  # filtered tensors by (numel, k); adjacent by the order
        for i, (p, k) in enumerate(members):
            if k >= p.numel():  # dense (bias / norm, α = 1) or empty
                p.add_(updates[i])
            else:
                groups.setdefault((p.numel(), k), []).append(i)
        for (n, k), rows in groups.items():
            start = offsets[rows[0]]
            absm = abs_buf[start : start + len(rows) * n].view(len(rows), n)
            for r, i in enumerate(rows):
                torch.abs(exp_avgs[i].reshape(-1), out=absm[r])
            scratch = flag_buf[start : start + len(rows) * n].view(len(rows), n)
            tau = self._thresholds(absm, k, scratch, tuple(id(exp_avgs[i]) for i in rows))
            for r, i in enumerate(rows):
                mask = torch.ge(absm[r], tau[r], out=absm[r])  # 1.0 on the selected entries, in place
                params[i].addcmul_(updates[i], mask.view(params[i].shape))


def _adam_step_into(
    out: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
    steps: list[Tensor], lr: float, beta1: float, beta2: float, eps: float, fused: bool = True,
) -> None:
    """Adam's moments updated in place and its step −lr/(1−β1^t)·m/(√v/√(1−β2^t) + ε) written into the
    zeroed ``out``. On CPU and CUDA, with ``fused`` (all four tensors of an entry laid out alike), this is
    torch's fused AdamW kernel run on the zero buffers as its "parameters" (one pass instead of foreach's
    nine); otherwise the same math with foreach ops."""
    device = out[0].device
    if fused and device.type in ("cpu", "cuda"):
        steps_here = steps if device.type == "cpu" else [s.to(device) for s in steps]
        torch._fused_adamw_(out, grads, exp_avgs, exp_avg_sqs, [], steps_here, lr=lr, beta1=beta1, beta2=beta2,
                            weight_decay=0.0, eps=eps, amsgrad=False, maximize=False)
        return
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, [(1 - beta2 ** s.item()) ** 0.5 for s in steps])
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(out, exp_avgs, denom, [-(lr / (1 - beta1 ** s.item())) for s in steps])


def mofo_param_groups(
    model: nn.Module,
    weight_decay: float = 0.0,
    no_decay_keywords: Sequence[str] = ("norm", "ln_f"),
) -> list[dict[str, Any]]:
    """Named param groups for :class:`MoFO` from a model's trainable parameters.

    Names carry the dense rule into the optimizer (``*bias*`` / ``*norm*`` take the full Adam step).
    As in the official code, names containing ``norm`` / ``ln_f`` get no weight decay.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if any(key in name for key in no_decay_keywords) else decay).append((name, p))
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]
