"""EfficientQAT quantizer, packing, QuantLinear and packed save/load (methods/quantization.py, packing.py, quant_surgery.py, gptq_format.py)."""

import pytest
import torch
from effitrain.methods.gptq_format import load_quantized, save_quantized
from effitrain.methods.packing import pack_codes, unpack_codes
from effitrain.methods.quant_surgery import quantize_model_rtn
from effitrain.methods.quantization import FakeQuantLinear, QuantLinear, fake_quantize, init_scale_zero
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_minmax_init_error_at_most_half_step_and_codes_in_range(bits):
    torch.manual_seed(bits)
    w = torch.randn(24, 128) * 0.05
    s, z = init_scale_zero(w, bits, 32)
    w_hat = fake_quantize(w, s, z, bits, 32)
    step = s.repeat_interleave(32, dim=1)
    assert ((w - w_hat).abs() <= step / 2 + 1e-6).all()
    q = torch.round(w.reshape(24, 4, 32) / s[..., None]) + z[..., None]
    assert q.min() >= 0 and q.max() <= 2**bits - 1
    assert ((z >= 0) & (z <= 2**bits - 1)).all()


def test_ste_gradients_match_the_formulas():
    bits, q_max = 2, 3
    # one group of 4 weights: two in range, one clipped below 0, one clipped above q_max
    w = torch.tensor([[0.26, -0.05, -0.9, 2.0]], requires_grad=True)
    s = torch.tensor([[0.2]], requires_grad=True)
    z = torch.tensor([[1.0]], requires_grad=True)
    # each output weight separately: gradients of w_hat_i w.r.t. s and z
    grads_s, grads_z = [], []
    for i in range(4):
        w_hat = fake_quantize(w, s, z, bits, 4)
        gw, gs, gz = torch.autograd.grad(w_hat[0, i], (w, s, z))
        grads_s.append(gs.item())
        grads_z.append(gz.item())
        assert gw[0, i].item() == pytest.approx(1.0 if i < 2 else 0.0)
    ratio = w.detach()[0] / 0.2
    for i in range(2):  # in range: round(w/s) - w/s, and 0 for z
        assert grads_s[i] == pytest.approx((ratio[i].round() - ratio[i]).item(), abs=1e-6)
        assert grads_z[i] == pytest.approx(0.0, abs=1e-7)
    # clipped below (code 0) and above (code q_max): q_bound - z, and -s for z (-1 per unit step)
    assert grads_s[2] == pytest.approx(0 - 1.0)
    assert grads_s[3] == pytest.approx(q_max - 1.0)
    assert grads_z[2] == pytest.approx(-0.2) and grads_z[3] == pytest.approx(-0.2)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (33, 5), (160, 13)])
def test_pack_unpack_exact_with_extreme_codes(bits, shape):
    torch.manual_seed(0)
    codes = torch.randint(0, 2**bits, shape)
    codes[0] = 2**bits - 1
    codes[-1] = 0
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.int32
    assert packed.shape[0] == -(-shape[0] // (32 // bits))
    assert torch.equal(unpack_codes(packed, bits, shape[0]), codes)


def test_three_bit_packs_ten_codes_per_word_lsb_first():
    codes = torch.arange(10).remainder(8).view(10, 1)
    word = pack_codes(codes, 3)[0, 0].item() & 0xFFFFFFFF
    assert word == sum(int(c) << (3 * j) for j, c in enumerate(codes.flatten()))
    assert word < 2**30  # the top two bits are padding


@pytest.mark.parametrize("bits,group", [(2, 16), (3, 32), (4, 32), (8, 64)])
def test_fake_quant_forward_equals_packed_forward(bits, group):
    torch.manual_seed(1)
    linear = nn.Linear(64, 40, bias=True)
    fq = FakeQuantLinear(linear, bits, group)
    with torch.no_grad():  # as after training: move s and z off their init, z partly out of range
        fq.scale.mul_(1 + 0.1 * torch.rand_like(fq.scale))
        fq.zero_point.add_(torch.randn_like(fq.zero_point) * 2)
        fq.scale.copy_(fq.scale.half().float())  # the stored step is fp16
    packed = fq.to_quant_linear()
    x = torch.randn(5, 64)
    with torch.no_grad():
        torch.testing.assert_close(packed(x), fq(x), rtol=0, atol=1e-5)
        torch.testing.assert_close(packed.dequantize(torch.float32), fq.quantized_weight(), rtol=0, atol=0)
    assert set(dict(packed.named_buffers())) == {"qweight", "qzeros", "g_idx", "bias"}
    assert packed.qweight.shape == (-(-64 // (32 // bits)), 40)
    assert packed.qzeros.shape == (64 // group, -(-40 // (32 // bits)))
    assert packed.scales.shape == (64 // group, 40) and packed.scales.dtype == torch.float16


def test_from_linear_is_round_to_nearest():
    torch.manual_seed(2)
    linear = nn.Linear(128, 16, bias=False)
    layer = QuantLinear.from_linear(linear, 4, 64)
    s, z = init_scale_zero(linear.weight, 4, 64)
    s = s.half().float()
    expected = fake_quantize(linear.weight.detach(), s, z, 4, 64)
    torch.testing.assert_close(layer.dequantize(torch.float32), expected, rtol=0, atol=0)
    assert torch.equal(layer.g_idx, torch.arange(128, dtype=torch.int32) // 64)


def test_rtn_8bit_perplexity_within_one_percent_and_save_load_roundtrip(tmp_path):
    model = tiny_llama()
    ids = torch.randint(0, 97, (4, 32))
    with torch.no_grad():
        fp_loss = model(input_ids=ids, labels=ids).loss
        quantize_model_rtn(model, 8, 32)
        q_loss = model(input_ids=ids, labels=ids).loss
    assert abs(q_loss.exp() / fp_loss.exp() - 1) < 0.01
    assert all(type(m) is not nn.Linear for m in model.model.layers.modules())
    assert type(model.lm_head) is nn.Linear
    save_quantized(model, tmp_path, 8, 32)
    loaded = load_quantized(tmp_path)
    import json
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["bits"] == 8
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model.half().float()(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits,group", [(2, 64), (3, 32)])
def test_packed_save_load_is_exact(tmp_path, bits, group):
    model = tiny_llama().half().float()  # fp16-representable full-precision part: the file is exact
    quantize_model_rtn(model, bits, group)
    save_quantized(model, tmp_path, bits, group)
    loaded = load_quantized(tmp_path)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key].to(value.dtype), value), key
