"""Every private or internal API of a dependency that the code relies on, exercised as the code uses it.

A dependency upgrade that changes one of them fails here with a message naming the API, the installed
version and the file that relies on it (instead of a wrong number somewhere in a method's tests).
"""

from __future__ import annotations

import contextlib
from importlib import metadata

import pytest
import torch
from torch import nn


@contextlib.contextmanager
def private_api(api: str, package: str, used_in: str):
    """Turn any failure inside into one that names the private API and where this project uses it."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - any change of the API is the finding
        pytest.fail(f"{api} (installed {package} {metadata.version(package)}) no longer behaves as {used_in} "
                    f"expects: {type(err).__name__}: {err}", pytrace=False)


# ------------------------------------------------------------------------------------------------ torch
def test_torch_fused_adamw_writes_the_adam_step():
    from effitrain.methods.mofo import _adam_step_into

    torch.manual_seed(0)
    grads = [torch.randn(5, 7), torch.randn(3)]
    steps = {fused: [torch.tensor(3.0), torch.tensor(3.0)] for fused in (True, False)}
    moments = {fused: ([torch.full((5, 7), 0.1), torch.full((3,), 0.2)],
                       [torch.full((5, 7), 0.3), torch.full((3,), 0.4)]) for fused in (True, False)}
    outs = {fused: [torch.zeros(5, 7), torch.zeros(3)] for fused in (True, False)}
    with private_api("torch._fused_adamw_", "torch", "methods/mofo.py (_adam_step_into)"):
        for fused in (True, False):
            exp_avgs, exp_avg_sqs = moments[fused]  # the step count is already incremented (MoFO._update)
            _adam_step_into(outs[fused], grads, exp_avgs, exp_avg_sqs, steps[fused], lr=0.1, beta1=0.9,
                            beta2=0.99, eps=1e-8, fused=fused)
        for a, b in zip(outs[True], outs[False], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        for a, b in zip(moments[True][0] + moments[True][1], moments[False][0] + moments[False][1], strict=True):
            torch.testing.assert_close(a, b)


def test_torch_foreach_ops_match_per_tensor_ops():
    xs, ys = [torch.randn(4), torch.randn(2, 3)], [torch.randn(4), torch.randn(2, 3)]
    with private_api("torch._foreach_* (add_, mul_, lerp_, addcmul_, sqrt, div_, addcdiv_)", "torch",
                     "methods/mofo.py"):
        a = [x.clone() for x in xs]
        torch._foreach_lerp_(a, ys, 0.25)
        torch._foreach_addcmul_(a, ys, ys, 0.5)
        torch._foreach_mul_(a, 2.0)
        torch._foreach_add_(a, 1.0)
        root = torch._foreach_sqrt([t.abs() for t in a])
        torch._foreach_div_(root, [2.0, 4.0])
        torch._foreach_addcdiv_(a, ys, [r + 1 for r in root], [-0.1, -0.2])
        for x, y, got, scale, factor in zip(xs, ys, a, [2.0, 4.0], [-0.1, -0.2], strict=True):
            ref = (torch.lerp(x, y, 0.25) + 0.5 * y * y) * 2.0 + 1.0
            ref = ref + factor * y / (ref.abs().sqrt() / scale + 1)
            torch.testing.assert_close(got, ref)


def test_torch_fake_tensor_and_batchnorm_base():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with private_api("torch._subclasses.FakeTensor", "torch", "methods/sparsity.py (_MaskedWeight.forward)"):
        with FakeTensorMode():
            fake = torch.empty(3)
        assert isinstance(fake, torch._subclasses.FakeTensor)
    with private_api("torch.nn.modules.batchnorm._BatchNorm", "torch", "methods/sparsity.py (BatchNorm recalibration)"):
        assert isinstance(nn.BatchNorm2d(3), nn.modules.batchnorm._BatchNorm)
        assert isinstance(nn.BatchNorm1d(3), nn.modules.batchnorm._BatchNorm)



def test_torch_tensor_version_counter_moves_on_every_edit_of_alive():
    """LBC caches its mask per ``alive`` buffer, keyed by (data_ptr, ``Tensor._version``): removal,
    ``load_state_dict`` and direct in-place edits must each move the key, so the mask is never stale."""
    from effitrain.methods.lbc import LearnableNMMask

    with private_api("torch.Tensor._version", "torch", "methods/lbc.py (LearnableNMMask._refresh)"):
        mask = LearnableNMMask((4, 8), 2, 4)
        assert mask.current_keep() is None  # all 6 candidates alive: m = 1
        with torch.no_grad():
            mask.alpha.copy_(torch.randn_like(mask.alpha))
        mask.keep_best(1)
        after_removal = mask.current_keep()
        assert after_removal is not None and int(after_removal.sum()) == 16  # 2 of every 4 of 32 weights
        fresh = LearnableNMMask((4, 8), 2, 4)
        assert fresh.current_keep() is None
        fresh.load_state_dict(mask.state_dict())
        assert torch.equal(fresh.current_keep(), after_removal)
        fresh.alive.fill_(True)  # a direct in-place edit
        assert fresh.current_keep() is None

# ------------------------------------------------------------------------------------------------- timm
def test_timm_manipulate_checkpoint():
    from timm.models._manipulate import checkpoint

    block = nn.Sequential(nn.Linear(4, 4), nn.GELU())
    x = torch.randn(2, 4, requires_grad=True)
    with private_api("timm.models._manipulate.checkpoint", "timm", "models/illama.py, models/mamba_r.py"):
        out = checkpoint(block, x)
        torch.testing.assert_close(out, block(x))
        out.sum().backward()
        assert x.grad is not None and block[0].weight.grad is not None


def test_timm_factory_records_model_args_for_exports(tmp_path):
    import json

    import effitrain.models  # noqa: F401
    import timm
    from timm.models import save_for_hf

    with private_api("timm create_model's `_model_args` (the reload arguments save_for_hf writes)", "timm",
                     "models/illama.py (mask_mode setter)"):
        model = timm.create_model("test_illama", class_token_position="first")
        model.mask_mode = "official"
        assert model._model_args["class_token_position"] == "first"
        save_for_hf(model, tmp_path, safe_serialization=True)
        saved = json.loads((tmp_path / "config.json").read_text())["model_args"]
        assert saved["mask_mode"] == "official" and saved["class_token_position"] == "first"


# ------------------------------------------------------------------------------------------------- peft
def test_peft_custom_module_hook_and_lora_variant():
    from effitrain.methods.moslora import MoSLoraConfig, MoSLoraLinear
    from peft import get_peft_model
    from peft.tuners.lora.layer import LoraVariant
    from peft.utils.other import transpose

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(6, 5)

        def forward(self, x):
            return self.proj(x)

    torch.manual_seed(0)
    with private_api("peft LoraConfig._register_custom_module, LoraVariant and the `is_lora_variant` field hook",
                     "peft", "methods/moslora.py"):
        assert all(callable(getattr(LoraVariant, hook)) for hook in
                   ("init", "forward", "merge_safe", "merge_unsafe", "unmerge"))
        base = Tiny()
        x = torch.randn(3, 6)
        expected_base = base(x)
        model = get_peft_model(base, MoSLoraConfig(r=2, lora_alpha=4, target_modules=["proj"],
                                                   init_lora_weights=False))
        layer = model.base_model.model.proj
        assert isinstance(layer, MoSLoraLinear), type(layer)
        assert type(layer.lora_variant["default"]).__name__ == "MoSLoraLinearVariant"
        assert "lora_AB" in layer.adapter_layer_names
        a, m, b = (layer.lora_A["default"].weight, layer.lora_AB["default"].weight, layer.lora_B["default"].weight)
        scale = layer.scaling["default"]
        torch.testing.assert_close(model(x), expected_base + scale * x @ a.T @ m.T @ b.T)
        torch.testing.assert_close(layer.get_delta_weight("default"), transpose(scale * b @ m @ a, False))


# ----------------------------------------------------------------------------------------- transformers
def test_transformers_llama_attention_internals():
    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv, rotate_half

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    attn = model.model.layers[0].self_attn
    hidden = torch.randn(2, 7, 32)
    positions = torch.arange(7)[None].expand(2, -1)
    with private_api("transformers LLaMA internals (modeling_llama.apply_rotary_pos_emb / repeat_kv / "
                     "rotate_half, LlamaModel.rotary_emb, LlamaAttention.head_dim / num_key_value_groups / "
                     "scaling)", "transformers", "models/memory_lm.py"), torch.no_grad():
        cos, sin = model.model.rotary_emb(hidden, positions)
        shape = (2, 7, -1, attn.head_dim)
        q = attn.q_proj(hidden).view(shape).transpose(1, 2)
        k = attn.k_proj(hidden).view(shape).transpose(1, 2)
        v = attn.v_proj(hidden).view(shape).transpose(1, 2)
        q_rot, k_rot = apply_rotary_pos_emb(q, k, cos, sin)
        torch.testing.assert_close(q_rot, q * cos[:, None] + rotate_half(q) * sin[:, None])
        groups = attn.num_key_value_groups
        assert groups == 2 and repeat_kv(k_rot, groups).shape == (2, 4, 7, attn.head_dim)
        out = F.scaled_dot_product_attention(q_rot, repeat_kv(k_rot, groups), repeat_kv(v, groups),
                                             is_causal=True, scale=attn.scaling)
        ours = attn.o_proj(out.transpose(1, 2).reshape(2, 7, -1))
        theirs = attn(hidden, position_embeddings=(cos, sin), attention_mask=None)[0]
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------- tokenizers, stdlib
def test_tokenizers_implementation_object():
    from tokenizers import ByteLevelBPETokenizer, Tokenizer
    from transformers import PreTrainedTokenizerFast

    with private_api("tokenizers ByteLevelBPETokenizer._tokenizer", "tokenizers",
                     "datamodules/tokenizer.py (train_bpe_tokenizer)"):
        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator(["hello world"] * 20 + ["world of hello"] * 20, vocab_size=300, min_frequency=2,
                                special_tokens=["<|endoftext|>"], show_progress=False)
        assert isinstance(bpe._tokenizer, Tokenizer)
        fast = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer)
        assert fast("hello world")["input_ids"] == bpe.encode("hello world").ids


def test_pydoc_topics_corpus_is_available():
    with private_api("pydoc_data.topics.topics (the built-in corpus)", "pip", "datamodules/corpus.py"):
        from pydoc_data.topics import topics

        assert isinstance(topics, dict) and len(topics) > 50


# --------------------------------------------------------------------------------------------- Lightning
def test_lightning_cli_instantiate_trainer_appends_callbacks(tmp_path):
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
    from lightning.pytorch.demos.boring_classes import BoringDataModule, BoringModel

    class Marker(Callback):
        pass

    marker = Marker()
    with private_api("lightning LightningCLI._instantiate_trainer(config, callbacks)", "lightning",
                     "lightning_modules/cli.py (EffitrainCLI.instantiate_trainer)"):
        cli = LightningCLI(BoringModel, BoringDataModule, run=False,
                           args=["--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}"])
        trainer = cli._instantiate_trainer({"max_steps": 1, "logger": False, "enable_progress_bar": False,
                                            "default_root_dir": str(tmp_path), "callbacks": None}, [marker])
        assert marker in trainer.callbacks
        assert any(isinstance(cb, SaveConfigCallback) for cb in trainer.callbacks)
        assert trainer.max_steps == 1
