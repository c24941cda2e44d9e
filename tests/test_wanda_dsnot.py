"""Wanda and DSnoT: the score and masks against direct formulas, DSnoT's invariants and a hand-written per-row
reference, block-by-block calibration (a pruned block feeds the next), the CLI recipe's export, bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import REPO, run_cli
from effitrain.methods.blockwise_pruning import DSnoTSettings, InputStats, prune_causal_lm, prune_linear
from effitrain.methods.dsnot import dsnot
from effitrain.methods.wanda import score_mask, wanda_scores
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM


def layer_and_stats(rows: int = 16, cols: int = 32, seed: int = 0, shift: float = 0.3):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen)
    x = torch.randn(4, 24, cols, generator=gen) + shift * torch.randn(cols, generator=gen)  # features with means
    stats = InputStats(cols)
    stats.add(x)
    return w, x, stats


def test_input_stats_are_the_official_per_sequence_averages():
    _, x, stats = layer_and_stats()
    torch.testing.assert_close(stats.sq_norm, (x**2).sum((0, 1)) / 4)
    torch.testing.assert_close(stats.mean_sum, x.sum((0, 1)) / 4)
    torch.testing.assert_close(stats.var, x.var(dim=1, unbiased=False).mean(0))


@pytest.mark.parametrize("pattern", [None, (2, 4), (1, 4)])
def test_wanda_mask_agrees_with_a_direct_formula(pattern):
    w, x, stats = layer_and_stats()
    norms = [math.sqrt(float((x[..., j] ** 2).sum()) / 4) for j in range(w.shape[1])]
    expected = torch.ones_like(w, dtype=torch.bool)
    for i in range(w.shape[0]):
        s = [abs(float(w[i, j])) * norms[j] for j in range(w.shape[1])]
        if pattern is None:
            for j in sorted(range(len(s)), key=lambda j: s[j])[: math.floor(0.6 * len(s))]:
                expected[i, j] = False
        else:
            n, m = pattern
            for b in range(0, len(s), m):
                for j in sorted(range(b, b + m), key=lambda j: s[j])[: m - n]:
                    expected[i, j] = False
    scores = wanda_scores(w, stats.sq_norm)
    mask = score_mask(scores, 0.6 if pattern is None else None, pattern)
    assert torch.equal(mask, expected)


def initial(w, stats, sparsity=0.6, pattern=None):
    metric = wanda_scores(w, stats.sq_norm)
    return score_mask(metric, None if pattern else sparsity, pattern), metric


def run_dsnot(w, stats, mask, metric, **kw):
    return dsnot(w, mask, stats.mean_sum, stats.var, metric, **kw)


@pytest.mark.parametrize("pattern", [None, (2, 4)])
def test_dsnot_keeps_nonzeros_per_row_and_block_and_lowers_the_gap(pattern):
    w, _, stats = layer_and_stats(64, 128, seed=1)
    mask, metric = initial(w, stats, pattern=pattern)
    out = run_dsnot(w, stats, mask, metric, pattern=pattern, max_cycle_time=20, update_threshold=0.01)
    assert torch.equal(out.mask.sum(1), mask.sum(1))
    if pattern is not None:
        assert (out.mask.view(64, -1, 4).sum(-1) == 2).all()
    assert (out.swaps <= 20).all() and out.swaps.sum() > 0
    assert int((out.mask != mask).sum(1).max()) <= 2 * 20  # one prune + one grow per swap
    assert out.gap_after.abs().mean() <= out.gap_before.abs().mean()
    long = run_dsnot(w, stats, mask, metric, pattern=pattern, max_cycle_time=500, update_threshold=0.0, same_sign=False)
    assert torch.equal(long.mask.sum(1), mask.sum(1))  # still, after every weight that could move has moved
    if pattern is not None:
        assert (long.mask.view(64, -1, 4).sum(-1) == 2).all()
    # the gap it reports is the gap of the mask it returns
    torch.testing.assert_close(out.gap_after, (w * stats.mean_sum * ~out.mask).sum(1))


def test_dsnot_with_zero_cycles_is_the_initial_mask_and_quiet_rows_stay():
    w, _, stats = layer_and_stats(32, 64, seed=2)
    mask, metric = initial(w, stats)
    assert torch.equal(run_dsnot(w, stats, mask, metric, max_cycle_time=0).mask, mask)
    gap = (w * stats.mean_sum * ~mask).sum(1).abs()
    threshold = float(gap.median())
    out = run_dsnot(w, stats, mask, metric, update_threshold=threshold)
    quiet = gap <= threshold
    assert quiet.any() and torch.equal(out.mask[quiet], mask[quiet]) and (out.swaps[quiet] == 0).all()


def reference_row(w, mean, var, wanda, keep, cycles, threshold, same_sign, shrink_only=False):
    """DSnoT on one row, written from the rules (unstructured), with plain Python lists."""
    d = len(w)
    keep = list(keep)
    contrib = [w[j] * mean[j] for j in range(d)]
    gap = sum(contrib[j] for j in range(d) if not keep[j])
    sign0 = (gap > 0) - (gap < 0)
    grow = sorted((j for j in range(d) if not keep[j]), key=lambda j: contrib[j] / var[j])
    kept = sorted((j for j in range(d) if keep[j]), key=lambda j: wanda[j])
    prune = [j for j in kept if contrib[j] < 0] + [j for j in reversed(kept) if contrib[j] >= 0]
    swaps = 0
    for _ in range(cycles):
        if not grow or not prune or abs(gap) <= threshold:
            break
        g = grow.pop() if gap > 0 else grow.pop(0)
        p = prune.pop() if gap < 0 else prune.pop(0)
        after = gap + contrib[p] - contrib[g]
        if same_sign and ((after > 0) - (after < 0)) != sign0:
            break
        if shrink_only and abs(after) >= abs(gap):
            break
        keep[p], keep[g], gap, swaps = False, True, after, swaps + 1
    return keep, swaps


@pytest.mark.parametrize("same_sign,shrink_only", [(False, False), (True, False), (False, True)])
def test_dsnot_agrees_with_a_hand_written_per_row_reference(same_sign, shrink_only):
    w, _, stats = layer_and_stats(12, 40, seed=3, shift=0.5)
    mask, metric = initial(w, stats, sparsity=0.5)
    out = run_dsnot(w, stats, mask, metric, max_cycle_time=8, update_threshold=0.05, same_sign=same_sign,
                    shrink_only=shrink_only)
    for i in range(w.shape[0]):
        keep, swaps = reference_row(w[i].tolist(), stats.mean_sum.tolist(), stats.var.tolist(), metric[i].tolist(),
                                    mask[i].tolist(), 8, 0.05, same_sign, shrink_only)
        assert out.mask[i].tolist() == keep, i
        assert int(out.swaps[i]) == swaps, i


@pytest.fixture(scope="module")
def tiny_lm():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    batches = [torch.randint(0, 96, (3, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    return model, batches


def copy_of(model):
    clone = LlamaForCausalLM(model.config).eval()
    clone.load_state_dict(model.state_dict())
    return clone


@torch.no_grad()
def test_blockwise_statistics_come_from_the_pruned_previous_block(tiny_lm):
    """The reference runs the whole model, block 0 already pruned, to get block 1's inputs."""
    model, batches = tiny_lm
    pruned = copy_of(model)
    masks = prune_causal_lm(pruned, batches, "wanda", 0.5)
    reference = copy_of(model)
    for i in range(2):
        block = reference.model.layers[i]
        layers = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
        stats = {n: InputStats(m.in_features) for n, m in layers.items()}
        hooks = [m.register_forward_hook(lambda mod, inp, out, s=stats[n]: s.add(inp[0])) for n, m in layers.items()]
        for ids in batches:
            reference(input_ids=ids)
        for h in hooks:
            h.remove()
        for n, m in layers.items():
            expected = score_mask(wanda_scores(m.weight, stats[n].sq_norm), 0.5)
            assert torch.equal(masks[f"model.layers.{i}.{n}"], expected), (i, n)
            m.weight.mul_(expected)
    for (name, p), q in zip(pruned.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q), name
    assert int((pruned.model.layers[1].mlp.down_proj.weight == 0).sum(1).min()) == 32  # 50% of 64 per row


def test_bad_input_fails_before_any_weight_changes(tiny_lm):
    model, batches = tiny_lm
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cases = [
        (dict(sparsity=None, pattern=(4, 4)), "1 <= N < M"),
        (dict(sparsity=None, pattern=(0, 4)), "1 <= N < M"),
        (dict(sparsity=None, pattern=(2, 5)), "not a multiple of M=5"),
        (dict(sparsity=1.0), r"\[0, 1\)"),
        (dict(sparsity=-0.1), r"\[0, 1\)"),
        (dict(calibration=[]), "calibration set is empty"),
        (dict(exclude=["*"]), "no nn.Linear layer"),
        (dict(method="sparsegpt"), "method must be"),
    ]
    for kwargs, message in cases:
        args = dict(calibration=batches, method="wanda", sparsity=0.5, pattern=None) | kwargs
        with pytest.raises(ValueError, match=message):
            prune_causal_lm(model, args.pop("calibration"), **args)
    with pytest.raises(ValueError, match="decoder blocks"):
        prune_causal_lm(nn.Sequential(nn.Linear(4, 4)), batches)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_dsnot_from_magnitude_and_nm_prune_the_whole_model_exactly(tiny_lm):
    model, batches = tiny_lm
    for kwargs in (dict(method="magnitude", sparsity=0.6), dict(method="wanda", sparsity=None, pattern=(2, 4))):
        pruned = copy_of(model)
        masks = prune_causal_lm(pruned, batches, dsnot=DSnoTSettings(skip=()), **kwargs)
        for name, mask in masks.items():
            w = pruned.get_submodule(name).weight
            assert torch.equal(w != 0, mask), name
            if "pattern" in kwargs:
                assert (mask.view(mask.shape[0], -1, 4).sum(-1) == 2).all(), name
            else:
                assert (mask.sum(1) == mask.shape[1] - math.floor(0.6 * mask.shape[1])).all(), name


def test_cli_recipe_prunes_evaluates_and_exports_a_from_pretrained_folder(tmp_path, tiny_lm_dir, small_corpus):
    out = tmp_path / "pruned"
    cli = run_cli(["validate", "--config", str(REPO / "configs/wanda/dsnot.yaml"),
                   f"--model.init_args.pretrained={tiny_lm_dir}", f"--data.init_args.tokenizer={tiny_lm_dir}",
                   f"--data.init_args.source={small_corpus}", "--data.init_args.batch_size=4",
                   "--model.init_args.calibration_samples=8", "--trainer.limit_val_batches=2",
                   f"--model.init_args.export_dir={out}", f"--trainer.default_root_dir={tmp_path}/runs"])
    ppl = float(cli.trainer.callback_metrics["val/ppl"])
    assert math.isfinite(ppl) and ppl > 1
    model = LlamaForCausalLM.from_pretrained(out)
    record = json.loads((out / "sparsity.json").read_text())
    assert model.config.sparsity["method"] == "wanda" and model.config.sparsity["dsnot"] is True
    for name, sparsity in record["layers"].items():
        w = model.get_submodule(name).weight
        assert (w == 0).sum(1).eq(w.shape[1] // 2).all(), name  # exactly 50% per row, in the saved weights
        assert sparsity == pytest.approx(0.5)
    assert (out / "tokenizer.json").exists() or (out / "tokenizer_config.json").exists()


def test_dsnot_from_magnitude_orders_prune_candidates_by_the_wanda_score():
    """The official unstructured DSnoT ranks the kept weights it may prune by |W|·‖X‖ even when magnitude chose
    the initial mask (zyxxmu/DSnoT ``prune_DSnoT``: ``wanda_metric``); the initial mask ranks |W| per row."""
    w, _, stats = layer_and_stats(12, 40, seed=4, shift=0.5)
    w = w * torch.linspace(0.2, 3.0, 40)  # input scales that make |W| and |W|·‖X‖ disagree
    settings = DSnoTSettings(max_cycle_time=8, update_threshold=0.05, skip=())
    got = prune_linear(w, "magnitude", 0.5, None, stats, settings)
    magnitude = w.abs()
    start = score_mask(magnitude, 0.5)
    wanda = wanda_scores(w, stats.sq_norm)
    by_magnitude = []
    for i in range(w.shape[0]):
        args = (w[i].tolist(), stats.mean_sum.tolist(), stats.var.tolist())
        keep, _ = reference_row(*args, wanda[i].tolist(), start[i].tolist(), 8, 0.05, False)
        assert got[i].tolist() == keep, i
        by_magnitude.append(reference_row(*args, magnitude[i].tolist(), start[i].tolist(), 8, 0.05, False)[0])
    assert torch.tensor(by_magnitude).ne(got).any()  # the order matters on this layer


def reference_nm_row(w, mean, var, initial_metric, keep, m, cycles, threshold):
    """N:M DSnoT on one row from the rules, with plain Python lists: grow as unstructured; the pruned partner is
    the kept weight of the grown weight's block of M with the lowest initial score that has not moved; the sign
    of ε must not change (always on for N:M)."""
    d = len(w)
    keep = list(keep)
    moved = [False] * d
    contrib = [w[j] * mean[j] for j in range(d)]
    gap = sum(contrib[j] for j in range(d) if not keep[j])
    sign0 = (gap > 0) - (gap < 0)
    grow = sorted((j for j in range(d) if not keep[j]), key=lambda j: contrib[j] / var[j])
    for _ in range(cycles):
        if not grow or abs(gap) <= threshold:
            break
        g = grow.pop() if gap > 0 else grow.pop(0)
        block = range(g - g % m, g - g % m + m)
        partners = [j for j in block if keep[j] and not moved[j]]
        if not partners:
            break
        p = min(partners, key=lambda j: initial_metric[j])
        after = gap + contrib[p] - contrib[g]
        if ((after > 0) - (after < 0)) != sign0:
            break
        keep[p], keep[g], gap = False, True, after
        moved[p] = moved[g] = True
    return keep


@pytest.mark.parametrize("method", ["wanda", "magnitude"])
def test_nm_dsnot_agrees_with_a_hand_written_per_row_reference(method):
    w, _, stats = layer_and_stats(12, 48, seed=5, shift=0.8)
    settings = DSnoTSettings(max_cycle_time=10, update_threshold=0.02, skip=())
    got = prune_linear(w, method, None, (2, 4), stats, settings)
    metric = wanda_scores(w, stats.sq_norm) if method == "wanda" else w.abs()
    start = score_mask(metric, None, (2, 4))
    assert got.ne(start).any()
    for i in range(w.shape[0]):
        keep = reference_nm_row(w[i].tolist(), stats.mean_sum.tolist(), stats.var.tolist(), metric[i].tolist(),
                                start[i].tolist(), 4, 10, 0.02)
        assert got[i].tolist() == keep, i


def test_a_row_without_a_helpful_prune_candidate_grows_its_gap_unless_shrink_only():
    """Every contribution W_j·X̄_j of the row is positive, so ε > 0 and no kept weight's removal lowers it: the
    official rule prunes the first positive in descending Wanda score (the most salient kept weight) and |ε|
    grows from 1 + 2 to 1 + 4; ``shrink_only`` refuses that swap."""
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    ones = torch.ones(4)
    mask = torch.tensor([[False, False, True, True]])  # Wanda at 50%: the two largest kept
    official = dsnot(w, mask, ones, ones, w.abs(), max_cycle_time=1)
    assert official.mask.tolist() == [[False, True, True, False]]  # grew w=2, pruned w=4
    assert float(official.gap_before[0]) == 3.0 and float(official.gap_after[0]) == 5.0
    guarded = dsnot(w, mask, ones, ones, w.abs(), max_cycle_time=1, shrink_only=True)
    assert torch.equal(guarded.mask, mask) and float(guarded.gap_after[0]) == 3.0
