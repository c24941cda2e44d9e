"""UIO-LLMs: incremental TBPTT gradients, reservoir statistics, and the memory model's structure."""

from __future__ import annotations

import pytest
import torch
from effitrain.methods.incremental_tbptt import IncrementalTBPTT
from effitrain.methods.reservoir import RecencyWindow, ReservoirSampler
from effitrain.models.memory_lm import MemoryLM, encoder_attention_mask, encoder_positions, max_context_length
from transformers import LlamaConfig, LlamaForCausalLM

L, M = 16, 4  # segment length, memory tokens


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: on a loaded shared CPU intra-op threads only add synchronisation stalls."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config() -> LlamaConfig:
    return LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, eos_token_id=1)


def tiny_memory_lm(seed: int = 0) -> MemoryLM:
    """fp64 so that gradient identities hold to 1e-6 regardless of summation order; LoRA B randomised so every
    trainable parameter gets a gradient (peft initialises B to zero)."""
    torch.manual_seed(seed)
    model = MemoryLM.from_base(LlamaForCausalLM(tiny_config()), segment_length=L, num_memory_tokens=M, encoder_rank=4,
                     encoder_alpha=8, transfer_rank=4, transfer_alpha=8).double()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    return model


def sequence(num_segments: int, seed: int = 1, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 64, (batch, num_segments * L), generator=generator)
    return ids, ids.clone()


def grads(model: MemoryLM) -> dict[str, torch.Tensor]:
    out = {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
           for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return out


def flat(g: dict[str, torch.Tensor], encoder_only: bool = False) -> torch.Tensor:
    keep = [v for n, v in g.items() if not encoder_only or "uio_encoder" in n or n == "memory_embedding"]
    return torch.cat([v.flatten() for v in keep])


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=name)


def test_reservoir_keeps_with_probability_min_1_s_over_t():
    """Eq. 11: after t-1 offers, item s is still in a capacity-S reservoir with probability min(1, S/(t-1))."""
    capacity, stream, runs = 2, 8, 10_000
    sampler = ReservoirSampler(capacity, seed=0)
    counts = torch.zeros(stream, stream)  # counts[n-1, s]: item s held after n offers
    for _ in range(runs):
        sampler.reset()
        for item in range(stream):
            sampler.offer(item)
            counts[item, sampler.kept] += 1
    for n in range(1, stream + 1):
        expected = min(1.0, capacity / n)
        assert torch.allclose(counts[n - 1, :n] / runs, torch.full((n,), expected), atol=0.02), n
        assert sampler.compensation(n) == pytest.approx(1 / expected)


def test_reservoir_rng_state_round_trip():
    a = ReservoirSampler(1, seed=3)
    for item in range(5):
        a.offer(item)
    state = a.state_dict()
    b = ReservoirSampler(1, seed=99)
    b.load_state_dict(state)
    b.kept, b.num_seen = list(a.kept), a.num_seen
    assert [a.offer(i) for i in range(5, 30)] == [b.offer(i) for i in range(5, 30)]


@pytest.mark.parametrize("compensate", [True, False])
def test_large_window_equals_full_bptt(compensate):
    """S >= number of segments: every graph lives to the end, all factors are 1, gradient == full BPTT."""
    model = tiny_memory_lm()
    ids, labels = sequence(5)
    model.full_bptt_loss(ids, labels).backward()
    full = grads(model)
    model.incremental_backward(ids, labels, IncrementalTBPTT(ReservoirSampler(8), compensate=compensate))
    assert_same(grads(model), full)
    assert flat(full, encoder_only=True).abs().sum() > 0


@pytest.mark.parametrize("window", [1, 2])
def test_recency_window_equals_plain_tbptt(window):
    """A recency policy gives exactly TBPTT with window S (Eq. 6), at linear cost."""
    model = tiny_memory_lm()
    ids, labels = sequence(5)
    model.full_bptt_loss(ids, labels, window=window).backward()
    reference = grads(model)
    model.incremental_backward(ids, labels, IncrementalTBPTT(RecencyWindow(window)))
    assert_same(grads(model), reference)


def test_compensated_reservoir_is_unbiased():
    """Eq. 12: averaged over reservoir draws the compensated gradient approaches the full gradient; without the
    factor it is biased low (encoder parameters: the only ones the sampling touches)."""
    model = tiny_memory_lm()
    ids, labels = sequence(4)
    model.full_bptt_loss(ids, labels).backward()
    full = flat(grads(model), encoder_only=True)
    runs = 64
    means = {}
    for compensate in (True, False):
        total = torch.zeros_like(full)
        tbptt = IncrementalTBPTT(ReservoirSampler(1, seed=0), compensate=compensate)
        for _ in range(runs):
            model.incremental_backward(ids, labels, tbptt)
            total += flat(grads(model), encoder_only=True)
        means[compensate] = total / runs
    ratio_on = means[True].norm() / full.norm()
    ratio_off = means[False].norm() / full.norm()
    assert torch.nn.functional.cosine_similarity(means[True], full, dim=0) > 0.99
    assert abs(ratio_on - 1) < 0.05, ratio_on
    assert ratio_off < 0.7, ratio_off  # measured 0.48 with S=1, 4 segments


def test_no_memory_decoder_is_the_base_model():
    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_config())
    reference = LlamaForCausalLM(tiny_config())
    reference.load_state_dict(base.state_dict())
    model = MemoryLM.from_base(base, segment_length=L, num_memory_tokens=M, encoder_rank=4, transfer_rank=4)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()  # the LoRAs must not touch the decoder's own tokens
        ids = torch.randint(2, 64, (2, 24))
        assert torch.equal(model.decode(ids)[0], reference(ids).logits)
        assert torch.equal(model(ids[:, :L], memory="on"), reference(ids[:, :L]).logits)


def test_transfer_head_with_zero_lora_is_the_base_projection():
    model = tiny_memory_lm()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "uio_transfer" in name and "lora_B" in name:
                param.zero_()
        states = torch.randn(2, 1, 3, 32, dtype=torch.float64)
        (k, v) = model.memory_kv([states])[0]
        attn = model.layers[0].self_attn
        torch.testing.assert_close(v, attn.v_proj(states[0]).view(1, 3, 2, 8).transpose(1, 2))


def test_encoder_mask_pattern_and_positions():
    mask = encoder_attention_mask(8, 2)
    assert torch.equal(mask[:8, :8], torch.ones(8, 8, dtype=torch.bool).tril())
    assert not mask[:8, 8:].any()
    assert mask[8].tolist() == [True] * 4 + [False] * 4 + [True, False]
    assert mask[9].tolist() == [True] * 8 + [False, True]
    assert encoder_positions(8, 2).tolist() == [[0, 1, 2, 3, 4, 5, 6, 7, 4, 8]]


def test_encoder_memory_token_i_reads_only_its_prefix():
    """Changing token j changes <mem> token i's states only if j < (i+1)·l/m; no earlier memory is read."""
    model = tiny_memory_lm()
    ids, _ = sequence(1)
    with torch.no_grad():
        before = model.encode(ids)
        changed = ids.clone()
        changed[0, 9] = (changed[0, 9] + 1) % 62 + 2  # stride 4: tokens 8..11 belong to <mem> 2 onwards
        after = model.encode(changed)
    same = (before - after).abs().amax(dim=(0, 1, 3)) == 0  # per <mem> token
    assert same.tolist() == [True, True, False, False]


def test_memory_carries_information_and_zeroed_memory_differs():
    model = tiny_memory_lm()
    ids, _ = sequence(3)
    with torch.no_grad():
        on, zero, off = model(ids, "on"), model(ids, "zero"), model(ids, "off")
    assert torch.equal(on[:, :L], off[:, :L])  # the first segment has no memory
    assert not torch.allclose(on[:, L:], zero[:, L:]) and not torch.allclose(on[:, L:], off[:, L:])


def test_generation_with_memory_matches_segment_teacher_forcing():
    """Cached greedy decoding (encode every l raw tokens, drop their K/V) gives the same tokens as re-reading the
    whole text segment by segment, and the cache holds m·⌊n/l⌋ + (n mod l) entries."""
    model = tiny_memory_lm()
    prompt, _ = sequence(2)
    prompt = prompt[:, :27]
    out = model.generate(prompt, max_new_tokens=14)
    with torch.no_grad():
        greedy = model(out[:, :-1]).argmax(-1)
    assert torch.equal(greedy[:, 26:], out[:, 27:])
    n = out.shape[1]
    assert model.last_cache_length == M * (n // L) + n % L <= L + M * (n // L)


def test_rope_budget_rejects_contexts_that_do_not_fit():
    assert max_context_length(1024, 32, 4096) == 99_328  # the paper's "100K" at 32x
    assert max_context_length(1024, 128, 4096) == 25_600  # 8x
    model = tiny_memory_lm()  # 256 positions, l=16, m=4: 16·(240//4 + 1) = 976 tokens
    assert model.max_context() == 976
    model.check_context(976)
    with pytest.raises(ValueError, match="longest context is 976"):
        model(torch.zeros(1, 977, dtype=torch.long))
    with pytest.raises(ValueError, match="must divide"):
        MemoryLM.from_base(LlamaForCausalLM(tiny_config()), segment_length=16, num_memory_tokens=5)
