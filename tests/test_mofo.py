"""MoFO (arXiv 2407.20999): AdamW at fraction 1, exact top-k |m| filtering, dense moments, decoupled decay on
every entry, k >= 1 on tiny tensors, fp32 state for bf16 weights, exact resume, and a Lightning fine-tune."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from effitrain.methods.mofo import MoFO, mofo_param_groups
from torch import nn


class Net(nn.Module):
    """Weights on both threshold paths (4096 entries: kthvalue; 8192: the count search), a norm and biases."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 128)
        self.norm = nn.LayerNorm(128)
        self.fc2 = nn.Linear(128, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.norm(self.fc1(x))))


def synthetic_grads(model: nn.Module, steps: int, seed: int = 0) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=gen) for p in model.parameters()] for _ in range(steps)]


def step_with(opt: torch.optim.Optimizer, model: nn.Module, grads: list[torch.Tensor]) -> None:
    for p, g in zip(model.parameters(), grads, strict=True):
        p.grad = g.to(p.dtype).clone()
    opt.step()


@pytest.mark.parametrize("foreach", [False, True])
def test_fraction_one_is_adamw(foreach: bool):
    torch.manual_seed(0)
    model = Net()
    ref = copy.deepcopy(model)
    opt = MoFO(model.parameters(), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, fraction=1.0)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, foreach=foreach)
    for _ in range(10):
        x = torch.randn(16, 64)
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            m(x).pow(2).mean().backward()
            o.step()
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7)


def test_only_top_k_momentum_entries_move_and_moments_stay_dense():
    torch.manual_seed(0)
    model = Net()
    ref = copy.deepcopy(model)
    fraction = 0.15
    opt = MoFO(mofo_param_groups(model), lr=1e-2, fraction=fraction)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.0)
    for grads in synthetic_grads(model, 6):
        before = [p.detach().clone() for p in model.parameters()]
        step_with(opt, model, grads)
        step_with(ref_opt, ref, grads)
        for (name, p), b, q in zip(model.named_parameters(), before, ref.parameters(), strict=True):
            state, ref_state = opt.state[p], ref_opt.state[q]
            # both moments are updated on every entry, exactly as AdamW's
            torch.testing.assert_close(state["exp_avg"], ref_state["exp_avg"], rtol=0, atol=0)
            torch.testing.assert_close(state["exp_avg_sq"], ref_state["exp_avg_sq"], rtol=0, atol=0)
            moved = p.detach() != b
            if "bias" in name or "norm" in name:
                assert moved.all(), f"{name} must take the dense Adam step"
                continue
            m = state["exp_avg"].abs().flatten()
            k = int(fraction * m.numel())
            top = torch.zeros_like(m, dtype=torch.bool)
            top[m.topk(k).indices] = True
            assert moved.sum() == k
            assert torch.equal(moved.flatten(), top), f"{name}: moved entries are not the top-k |m|"


def test_weight_decay_touches_every_entry():
    torch.manual_seed(0)
    model = Net()
    lr, wd = 1e-2, 0.5
    opt = MoFO(mofo_param_groups(model, weight_decay=wd), lr=lr, fraction=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    step_with(opt, model, synthetic_grads(model, 1)[0])
    p, b = model.fc1.weight.detach(), before[0]
    m = opt.state[model.fc1.weight]["exp_avg"]
    unselected = m.abs() < m.abs().flatten().topk(int(0.1 * m.numel())).values[-1]
    assert unselected.float().mean() > 0.85
    # entries outside the top-k only decay: p <- p * (1 - lr * wd), bit for bit
    assert torch.equal(p[unselected], (b * (1 - lr * wd))[unselected])
    # norms get no weight decay (official grouping), only their dense Adam step
    assert opt.param_groups[1]["weight_decay"] == 0.0
    assert "norm.weight" in opt.param_groups[1]["param_names"]


def test_tiny_tensor_gets_at_least_one_entry():
    weight = nn.Parameter(torch.randn(1, 3))  # 3 * 0.15 < 1
    opt = MoFO([weight], lr=0.1, fraction=0.15)
    before = weight.detach().clone()
    weight.grad = torch.tensor([[0.1, -3.0, 0.2]])
    opt.step()
    assert torch.equal(weight.detach() != before, torch.tensor([[False, True, False]]))


def test_unnamed_parameters_one_dimensional_are_dense():
    weight, bias = nn.Parameter(torch.randn(64, 64)), nn.Parameter(torch.randn(64))
    opt = MoFO([weight, bias], lr=0.1, fraction=0.2)
    w0, b0 = weight.detach().clone(), bias.detach().clone()
    weight.grad, bias.grad = torch.randn(64, 64), torch.randn(64)
    opt.step()
    assert (bias.detach() != b0).all()
    assert (weight.detach() != w0).sum() == int(0.2 * 64 * 64)


def test_bf16_weights_keep_fp32_moments_and_resume_exactly():
    torch.manual_seed(0)
    model = Net().to(torch.bfloat16)
    grads = synthetic_grads(model, 6, seed=1)

    def run(steps, model, opt):
        for g in steps:
            step_with(opt, model, g)

    straight = copy.deepcopy(model)
    opt = MoFO(mofo_param_groups(straight), lr=1e-2, weight_decay=0.1, fraction=0.2)
    run(grads, straight, opt)
    assert all(s["exp_avg"].dtype == torch.float32 and s["exp_avg_sq"].dtype == torch.float32
               for s in opt.state.values())

    first = copy.deepcopy(model)
    opt1 = MoFO(mofo_param_groups(first), lr=1e-2, weight_decay=0.1, fraction=0.2)
    run(grads[:3], first, opt1)
    saved_model, saved_opt = copy.deepcopy(first.state_dict()), copy.deepcopy(opt1.state_dict())
    resumed = copy.deepcopy(model)
    resumed.load_state_dict(saved_model)
    opt2 = MoFO(mofo_param_groups(resumed), lr=1e-2, weight_decay=0.1, fraction=0.2)
    opt2.load_state_dict(saved_opt)
    assert all(s["exp_avg"].dtype == torch.float32 for s in opt2.state.values())
    run(grads[3:], resumed, opt2)
    for p, q in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)


def test_invalid_fraction_is_rejected():
    with pytest.raises(ValueError, match="fraction"):
        MoFO([nn.Parameter(torch.zeros(2, 2))], fraction=0.0)


class Regressor(L.LightningModule):
    """Fine-tunes a 'pretrained' net toward a shifted target with the optimizer it is given."""

    def __init__(self, net: nn.Module, make_opt) -> None:
        super().__init__()
        self.net, self.make_opt = net, make_opt

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        return self.make_opt(self.net)


def test_lightning_fine_tune_stays_closer_to_the_start():
    torch.manual_seed(0)
    base = Net()
    x = torch.randn(256, 64)
    y = base(x).detach() + 0.5 * torch.tanh(x[:, :32])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32, shuffle=False)
    results = {}
    for name, make in {
        "adamw": lambda net: torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.0),
        "mofo": lambda net: MoFO(mofo_param_groups(net), lr=1e-2, fraction=0.15),
    }.items():
        module = Regressor(copy.deepcopy(base), make)
        with torch.no_grad():
            start_loss = nn.functional.mse_loss(module.net(x), y).item()
        L.Trainer(max_epochs=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, accelerator="cpu").fit(module, loader)
        with torch.no_grad():
            loss = nn.functional.mse_loss(module.net(x), y).item()
        dist = torch.cat([(p - q).flatten() for p, q in zip(module.net.parameters(), base.parameters(),
                                                             strict=True)]).norm().item()
        results[name] = (start_loss, loss, dist)
    (start, adamw_loss, adamw_dist), (_, mofo_loss, mofo_dist) = results["adamw"], results["mofo"]
    assert mofo_loss < 0.25 * start and adamw_loss < 0.25 * start  # both fit the new task
    assert mofo_dist < 0.75 * adamw_dist  # MoFO moves far less from the starting weights (measured: 0.65)


def test_empty_tensors_and_mismatched_state_layouts_step_like_adamw():
    """A zero-size parameter is skipped cleanly, and a contiguous optimizer state resumed into a channels_last
    conv (the fused kernel would misread it) still gives AdamW's step at fraction 1."""
    torch.manual_seed(0)
    conv, empty = nn.Parameter(torch.randn(8, 4, 3, 3)), nn.Parameter(torch.zeros(0, 5))
    ref = nn.Parameter(conv.detach().clone())
    opt = MoFO([conv, empty], lr=1e-2, fraction=1.0)
    ref_opt = torch.optim.AdamW([ref], lr=1e-2, weight_decay=0.0)
    grads = [torch.randn(8, 4, 3, 3) for _ in range(3)]
    for i, g in enumerate(grads):
        if i == 1:  # the state stays contiguous while the weight and its gradients become channels_last
            conv.data = conv.data.contiguous(memory_format=torch.channels_last)
        conv.grad = g.contiguous(memory_format=torch.channels_last) if i else g.clone()
        empty.grad, ref.grad = torch.zeros(0, 5), g.clone()
        opt.step()
        ref_opt.step()
    torch.testing.assert_close(conv.detach(), ref.detach(), rtol=0, atol=1e-7)
