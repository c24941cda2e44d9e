"""UniPTS methods: masks, budget, straight-through gradient, base-decayed loss, search, export."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from effitrain.methods.distillation import base_decayed_kd_loss, decayed_base, kd_loss
from effitrain.methods.sparsity import (
    current_masks,
    global_sparsity,
    magnitude_mask,
    mask_sparsities,
    nm_mask,
    prunable_layers,
    remove_sparsity,
    sparsify,
)
from effitrain.methods.sparsity_search import (
    calibrated_accuracy,
    evolutionary_search,
    reduce_regrow_sparsities,
)
from torch import nn


def tiny_resnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("test_resnet", num_classes=10)


def test_magnitude_mask_zeros_exactly_floor_p_n_smallest():
    w = torch.randn(37, 11)
    for p in (0.0, 0.5, 0.9, 0.95, 0.999):
        m = magnitude_mask(w, p)
        assert int((~m).sum()) == math.floor(p * w.numel())
        if 0 < p:
            assert w.abs()[~m].max() <= w.abs()[m].min()  # the zeroed are the smallest


def test_searched_allocation_gives_exact_layer_zeros_and_global_target():
    model = tiny_resnet()
    layers = prunable_layers(model)
    numels = [m.weight.numel() for m in layers.values()]
    genes = torch.rand(len(numels), generator=torch.Generator().manual_seed(3)).tolist()
    ps = reduce_regrow_sparsities(numels, genes, target=0.9)
    sparsify(model, dict(zip(layers, ps, strict=True)))
    zeros = 0
    for (name, module), p in zip(layers.items(), ps, strict=True):
        z = int((module.weight == 0).sum())
        assert z == math.floor(p * module.weight.numel()), name
        zeros += z
    assert any(p == 0.0 for p in ps)  # small layers clipped dense on this net ...
    assert zeros / sum(numels) >= 0.9 - len(numels) / sum(numels)  # ... so the global sparsity is >= P
    assert global_sparsity(model) == pytest.approx(zeros / sum(numels))


def test_budget_keeps_exactly_n_times_one_minus_p_without_clipping():
    numels = [4096, 9216, 36864, 5120]
    genes = [0.3, -0.2, 1.1, 0.05]
    ps = reduce_regrow_sparsities(numels, genes, target=0.9, delta=0.05)
    assert all(p > 0 for p in ps)
    kept = sum(n * (1 - p) for n, p in zip(numels, ps, strict=True))
    assert kept == pytest.approx(sum(numels) * (1 - 0.9), rel=1e-12)
    # the anchor genes (all equal) give every layer the same number of regrown weights
    ps0 = reduce_regrow_sparsities(numels, [0.9] * 4, target=0.9)
    regrown = [n * (0.95 - p) for n, p in zip(numels, ps0, strict=True)]
    assert regrown == pytest.approx([0.05 * sum(numels) / 4] * 4)


@pytest.mark.parametrize("layer", [nn.Conv2d(4, 6, 3, padding=1), nn.Linear(12, 5)])
def test_forward_is_masked_weight_and_gradient_is_upstream_plus_decay(layer):
    torch.manual_seed(0)
    decay, p = 5e-5, 0.7
    x = torch.randn(3, 4, 5, 5) if isinstance(layer, nn.Conv2d) else torch.randn(3, 12)
    dense = layer.weight.detach().clone()
    mask = magnitude_mask(dense, p)
    # reference: a plain layer computing with W⊙m; its weight gradient is the upstream gradient
    w_eff = (dense * mask).requires_grad_()
    ref = (F.conv2d(x, w_eff, layer.bias, padding=1) if isinstance(layer, nn.Conv2d)
           else F.linear(x, w_eff, layer.bias))
    ref.square().sum().backward()

    sparsify(layer, {"": p}, decay=decay)
    out = layer(x)
    torch.testing.assert_close(out, ref.detach())
    out.square().sum().backward()
    grad = layer.parametrizations.weight.original.grad
    torch.testing.assert_close(grad, w_eff.grad + decay * (~mask) * dense)
    assert not torch.equal(grad * ~mask, torch.zeros_like(grad))  # pruned weights do get a gradient


def test_pruned_weight_returns_when_its_magnitude_crosses_the_threshold():
    layer = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    sparsify(layer, {"": 0.5})
    assert current_masks(layer)[""].tolist() == [[False, False, True, True]]
    with torch.no_grad():
        layer.parametrizations.weight.original[0, 0] = 5.0  # the pruned value was kept and now grows
    assert current_masks(layer)[""].tolist() == [[True, False, False, True]]


def test_masks_survive_a_checkpoint_round_trip_in_either_order(tmp_path):
    model = tiny_resnet()
    layers = prunable_layers(model)
    ps = {n: 0.8 for n in layers}
    sparsify(model, ps)
    with torch.no_grad():  # move weights so that masks differ from the fresh model's
        for m in layers.values():
            m.parametrizations.weight.original.add_(0.1 * torch.randn_like(m.weight))
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    state = torch.load(tmp_path / "sd.pt")
    assert "conv1.0.weight" in state and not any("parametrizations" in k for k in state)  # plain keys, dense W
    expected = current_masks(model)

    before = sparsify(tiny_resnet(1), ps)  # masks first, then load
    before.load_state_dict(state)
    after = tiny_resnet(2)  # load into a dense model, then mask
    after.load_state_dict(state)
    sparsify(after, ps)
    for other in (before, after):
        got = current_masks(other)
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_remove_sparsity_exports_a_plain_model_with_the_zeros_baked_in():
    model = tiny_resnet()
    sparsify(model, {n: 0.9 for n in prunable_layers(model)})
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    expected = model(x)
    remove_sparsity(model)
    assert not mask_sparsities(model)
    assert type(model.fc) is nn.Linear
    plain = tiny_resnet(5).eval()
    plain.load_state_dict(model.state_dict())
    torch.testing.assert_close(plain(x), expected)
    assert global_sparsity(plain, prunable_layers(plain)) == pytest.approx(0.9, abs=1e-4)


def test_transformers_linear_layers_are_sparsified():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    layers = prunable_layers(model, exclude=["lm_head"])
    assert len(layers) == 14
    sparsify(model, {n: 0.75 for n in layers})
    ids = torch.randint(0, 64, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    assert global_sparsity(model) == pytest.approx(0.75)
    assert model.model.layers[0].self_attn.q_proj.parametrizations.weight.original.grad is not None


def test_nm_mask_keeps_n_of_every_m_inputs():
    w = torch.randn(8, 16, 3, 3)
    m = nm_mask(w, 2, 4)
    assert (m.permute(0, 2, 3, 1).reshape(-1, 4).sum(1) == 2).all()
    lin = torch.randn(6, 8)
    ml = nm_mask(lin, 1, 4)
    assert (ml.reshape(-1, 4).sum(1) == 1).all()
    assert torch.equal(ml.reshape(-1, 4).float().argmax(1), lin.abs().reshape(-1, 4).argmax(1))


def test_base_decayed_loss_matches_formula_and_its_gradient():
    torch.manual_seed(0)
    batch, classes, temperature, epoch = 5, 7, 4.0, 13
    zs = torch.randn(batch, classes, requires_grad=True)
    zt = torch.randn(batch, classes)
    tau = 8 * 0.99**epoch
    assert decayed_base(epoch) == pytest.approx(tau)
    loss = base_decayed_kd_loss(zs, zt, epoch, temperature)
    pt, ps = F.softmax(zt / temperature, -1), F.softmax(zs, -1)
    reference = temperature**2 / batch * (pt * (pt.log() - ps.log() / tau)).sum()
    torch.testing.assert_close(loss, reference)
    loss.backward()
    torch.testing.assert_close(zs.grad, temperature**2 / (batch * tau) * (ps - pt).detach())


def test_kd_losses_fall_when_a_tiny_student_fits_a_teacher():
    torch.manual_seed(0)
    teacher, student = nn.Linear(6, 4), nn.Linear(6, 4)
    x = torch.randn(16, 6)
    opt = torch.optim.SGD(student.parameters(), lr=0.5)
    first = None
    for _ in range(100):
        loss = base_decayed_kd_loss(student(x), teacher(x), epoch=0)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first - 0.05
    assert kd_loss(teacher(x), teacher(x)).item() == pytest.approx(0.0, abs=1e-6)


def test_search_is_deterministic_for_a_seed_and_improves_on_the_anchor():
    numels = [300, 2000, 5000, 800]

    def fitness(ps):  # prefers sparsity moved out of layer 1
        return -abs(ps[1] - 0.5) - 0.1 * ps[0]

    a = evolutionary_search(numels, fitness, 0.9, population_size=10, generations=6, num_parents=4, seed=7)
    b = evolutionary_search(numels, fitness, 0.9, population_size=10, generations=6, num_parents=4, seed=7)
    c = evolutionary_search(numels, fitness, 0.9, population_size=10, generations=6, num_parents=4, seed=8)
    assert a.genes == b.genes and a.sparsities == b.sparsities and a.fitness == b.fitness
    assert a.genes != c.genes
    assert a.fitness > fitness(reduce_regrow_sparsities(numels, [0.9] * 4, 0.9))
    assert a.evaluations <= 10 + 6 * 10


def test_calibrated_accuracy_is_seeded_and_leaves_the_model_untouched():
    model = tiny_resnet().train()
    sparsify(model, {"fc": 0.3})  # a sparsified layer is evaluated from its dense W and restored
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(3)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ps = {n: 0.5 for n in prunable_layers(model)}
    torch.manual_seed(1)
    a = calibrated_accuracy(model, ps, batches)
    torch.manual_seed(1)
    b = calibrated_accuracy(model, ps, batches)
    assert a == b and 0.0 <= a <= 1.0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert model.training and mask_sparsities(model) == {"fc": 0.3}


def test_per_step_masks_equal_the_topk_reference_while_training_and_under_ties():
    """The per-forward mask comes from a counted threshold warm-started from the previous step; it must
    stay the exact top-k set as the weights move, and fall back to topk when |W| is tied at the cut."""
    torch.manual_seed(0)
    layer = nn.Linear(256, 128)
    sparsify(layer, {"": 0.9})
    opt = torch.optim.SGD(layer.parameters(), lr=0.05)
    n = layer.weight.numel()
    for _ in range(5):
        w = layer.parametrizations.weight.original.detach()
        assert torch.equal(layer.weight != 0, magnitude_mask(w, 0.9) & (w != 0))
        assert int((layer.weight == 0).sum()) == math.floor(0.9 * n)
        opt.zero_grad()
        layer(torch.randn(32, 256)).pow(2).mean().backward()
        opt.step()
    with torch.no_grad():  # four magnitudes only: the 90% cut falls inside a tie
        layer.parametrizations.weight.original.copy_(torch.randint(1, 5, (128, 256)).float())
    assert int((layer.weight == 0).sum()) == math.floor(0.9 * n)


def test_double_backward_and_meta_forward_work_on_masked_layers():
    torch.manual_seed(0)
    layer = sparsify(nn.Linear(128, 64), {"": 0.9})
    w, x = layer.parametrizations.weight.original, torch.randn(4, 128)
    (plain,) = torch.autograd.grad(layer(x).pow(2).sum(), w)
    (grad,) = torch.autograd.grad(layer(x).pow(2).sum(), w, create_graph=True)
    torch.testing.assert_close(grad, plain, rtol=0, atol=0)  # same first-order gradient, now differentiable
    (hess_diag_sum,) = torch.autograd.grad(grad.sum(), w)
    kept = layer.weight.detach() != 0
    assert hess_diag_sum[kept].abs().sum() > 0  # second-order terms reach the kept weights
    with torch.device("meta"):
        meta = sparsify(nn.Linear(128, 64), {"": 0.9})
        assert meta(torch.empty(2, 128)).shape == (2, 64)
