"""MoSLoRA: Mixture-of-Subspaces in Low-Rank Adaptation, as a peft LoRA variant.

Wu et al., "Mixture-of-Subspaces in Low-Rank Adaptation", arXiv 2406.11909 (official code:
wutaiqiang/MoSLoRA, a patched peft). LoRA's update ΔW = s·B·A is split into r rank-one subspaces;
MoSLoRA mixes all of them with a learnable r×r mixer M (Sec. 3, Eq. 3-4):

    y = W0·x + s·B·M·A·dropout(x),    ΔW = s·B·M·A,    s = alpha/r  (alpha/√r with rsLoRA)

    x ──dropout──► A (r×in) ──► M (r×r) ──► B (out×r) ──×s──► (+) ──► y
    └──────────────────────────► W0 ───────────────────────────┘

M = I is plain LoRA. Init (official code): A as peft's default (kaiming-uniform a=√5) or gaussian,
B = 0, M kaiming-uniform a=√5 (options: orthogonal, identity). M = 0 together with B = 0 gives zero
gradients for both, so that init is refused.

Use::

    model = get_peft_model(base, MoSLoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained("adapter")                  # native form: lora_A, lora_AB (the mixer), lora_B
    model = load_moslora(base, "adapter")             # the one call that restores the mixer (to train on)
    save_as_plain_lora(model, "adapter_lora")         # exact fold A' = M·A: every LoRA loader reads it

How it plugs into peft (0.21) without monkeypatching: peft picks a `LoraVariant` per adapter from
the layer's `lora_variants` mapping, keyed by LoraConfig fields tagged `is_lora_variant` (as KaSA's
`kasa_config`). `MoSLoraConfig` is a `LoraConfig` with one such field, `mixer_init`, and registers
`MoSLoraLinear` for `nn.Linear` targets through peft's `_register_custom_module` hook; that layer is
peft's `Linear` with `("mixer_init",)` added to its variant mapping.

Saved adapters. In memory the config is a LoRA config (`peft_type` LORA, so every LoRA code path in peft
applies), but a plain LoRA loader would drop the mixers and load a different model without an error. So
the native folder's `adapter_config.json` says `peft_type: "MOSLORA: load with effitrain.methods.moslora.
load_moslora"`: `PeftModel.from_pretrained`, `AutoPeftModelForCausalLM` and transformers' adapter loading
stop with that text (peft knows no such type), and `load_moslora` reads it. For every other loader write
the exact plain-LoRA fold with `save_as_plain_lora` (the adapter recipe exports both).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import torch
from peft import LoraConfig, PeftModel
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.layer import LoraVariant
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, get_peft_model_state_dict
from peft.utils.other import transpose
from safetensors.torch import save_file
from torch import nn

MixerInit = Literal["kaiming", "orthogonal", "identity"]
MIXER_INITS: tuple[str, ...] = ("kaiming", "orthogonal", "identity")
MIXER_NAME = "lora_AB"  # the official code's and PaddleNLP's key, so their adapter weights load
#: `peft_type` of a saved native MoSLoRA folder: no loader knows it, so plain LoRA loaders stop with this text
SAVED_PEFT_TYPE = "MOSLORA: load with effitrain.methods.moslora.load_moslora"


#: peft inits that subtract a decomposition of W0 as B·A (assuming no mixer) from the base weight
_W0_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "eva")


@dataclass
class MoSLoraConfig(LoraConfig):
    """A `LoraConfig` whose adapters carry an r×r mixer between A and B (MoSLoRA, Eq. 4).

    Args:
        mixer_init: init of the mixer M: "kaiming" (kaiming-uniform a=√5, the official default),
            "orthogonal" (a random orthogonal matrix) or "identity" (starts as plain LoRA).
        All other arguments are `peft.LoraConfig`'s.

    Raises:
        ValueError: on an unknown `mixer_init` (a zero mixer with B = 0 never trains), with DoRA or
            any other LoRA variant, which MoSLoRA does not compose with, or with an `init_lora_weights` that
            rewrites W0 from the pretrained weights (pissa, olora, corda, loftq, eva).
    """

    mixer_init: str = field(
        default="kaiming",
        metadata={
            "help": "Init of the MoSLoRA mixer: 'kaiming' (official), 'orthogonal' or 'identity' (= plain LoRA at step 0).",
            "is_lora_variant": True,  # peft's hook: a truthy value selects the ("mixer_init",) variant
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mixer_init not in MIXER_INITS:
            hint = " A zero mixer with B = 0 gets zero gradients and never trains." if self.mixer_init == "zeros" else ""
            raise ValueError(f"mixer_init={self.mixer_init!r} is not one of {MIXER_INITS}.{hint}")
        if self.use_dora:
            raise ValueError("MoSLoRA does not compose with DoRA: set use_dora=False or use a plain LoraConfig.")
        init = self.init_lora_weights
        if isinstance(init, str) and init.split("[")[0].split("_")[0].lower() in _W0_REWRITING_INITS:
            raise ValueError(
                f"init_lora_weights={init!r} rewrites W0 assuming ΔW = s·B·A, but MoSLoRA's ΔW = s·B·M·A with a "
                "random mixer M, so the model's output would change at initialisation. Use True (kaiming A, zero "
                "B; the official init) or 'gaussian'.")
        # peft's experimental hook for custom LoRA layers; checked before the built-in dispatchers. It is
        # not serialized, which is why `load_moslora` rebuilds a MoSLoraConfig at load time.
        # (nn.Module last: any other matched layer type gets a clear error instead of peft's variant error)
        self._register_custom_module({nn.Linear: MoSLoraLinear, nn.Module: _refuse_non_linear})

    @classmethod
    def from_peft_type(cls, **kwargs: Any) -> MoSLoraConfig:
        """Build a MoSLoraConfig from a saved adapter_config.json (peft would build a plain LoraConfig)."""
        known = {f.name for f in fields(cls) if f.init} - {"peft_type"}
        return cls(**{k: v for k, v in kwargs.items() if k in known})

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """Write adapter_config.json with `peft_type` = `SAVED_PEFT_TYPE`, which plain LoRA loaders refuse."""
        super().save_pretrained(save_directory, **kwargs)
        path = Path(save_directory) / CONFIG_NAME
        saved = json.loads(path.read_text())
        saved["peft_type"] = SAVED_PEFT_TYPE
        path.write_text(json.dumps(saved, indent=2, sort_keys=True))


class MoSLoraLinearVariant(LoraVariant):
    """peft `LoraVariant` hooks for MoSLoRA on a Linear layer (peft's `KasaLinearVariant` with a dense mixer)."""

    @staticmethod
    def init(module: LoraLinear, adapter_name: str, config: MoSLoraConfig, **kwargs: Any) -> None:
        if not hasattr(module, MIXER_NAME):
            module.lora_AB = nn.ModuleDict({})
            # adapter_layer_names drives set_adapter (requires_grad), delete_adapter and device moves
            module.adapter_layer_names = module.adapter_layer_names[:] + (MIXER_NAME,)
        r = module.r[adapter_name]
        weight_A = module.lora_A[adapter_name].weight
        mixer = nn.Linear(r, r, bias=False, device=weight_A.device, dtype=weight_A.dtype)
        init_mixer_(mixer.weight, config.mixer_init)
        module.lora_AB[adapter_name] = mixer

    @staticmethod
    def delta_weight(module: LoraLinear, adapter: str) -> torch.Tensor:
        """ΔW = s·B·M·A in the base weight's layout (transposed for fan_in_fan_out)."""
        weight_A = module.lora_A[adapter].weight
        weight_B = module.lora_B[adapter].weight
        mixer = module.lora_AB[adapter].weight
        dtype = weight_B.dtype
        # CPU half-precision matmuls are slow and lossy: merge in float32 like peft does for LoRA
        if weight_B.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
            weight_A, weight_B, mixer = weight_A.float(), weight_B.float(), mixer.float()
        delta = weight_B @ (mixer @ weight_A)  # (out, r) @ (r, in): the r×r product first is cheapest
        return (transpose(delta, module.fan_in_fan_out) * module.scaling[adapter]).to(dtype)

    @staticmethod
    def merge_safe(module: LoraLinear, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        delta = MoSLoraLinearVariant.delta_weight(module, active_adapter)
        return orig_weight + delta.to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module: LoraLinear, active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data += MoSLoraLinearVariant.delta_weight(module, active_adapter).to(orig_weight.dtype)

    @staticmethod
    def unmerge(module: LoraLinear, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight - MoSLoraLinearVariant.delta_weight(module, active_adapter).to(orig_weight.dtype)

    @staticmethod
    def forward(
        module: LoraLinear, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs: Any
    ) -> torch.Tensor:
        lora_A = module.lora_A[active_adapter]
        mixer = module.lora_AB[active_adapter]
        lora_B = module.lora_B[active_adapter]
        dropout = module.lora_dropout[active_adapter]
        return result + lora_B(mixer(lora_A(dropout(x)))) * module.scaling[active_adapter]


class MoSLoraLinear(LoraLinear):
    """peft's LoRA `Linear` that also knows the MoSLoRA variant (selected by `MoSLoraConfig.mixer_init`)."""

    @property
    def lora_variants(self) -> dict[tuple[str, ...], type[LoraVariant] | None]:
        return {**super().lora_variants, ("mixer_init",): MoSLoraLinearVariant}

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        # peft's add_weighted_adapter / convert_to_lora read ΔW from here: include the mixer
        if isinstance(self.lora_variant.get(adapter), MoSLoraLinearVariant):
            return MoSLoraLinearVariant.delta_weight(self, adapter)
        return super().get_delta_weight(adapter)


def _refuse_non_linear(target: nn.Module, adapter_name: str, config: MoSLoraConfig, **kwargs: Any) -> nn.Module:
    base = target.get_base_layer() if hasattr(target, "get_base_layer") else target
    raise ValueError(
        f"MoSLoRA puts its mixer in nn.Linear layers only, but target_modules={config.target_modules!r} also "
        f"matched a {type(base).__name__}. Narrow target_modules (e.g. 'attn.proj' rather than 'proj' on a timm "
        "ViT, whose patch_embed.proj is a Conv2d)."
    )


def init_mixer_(weight: torch.Tensor, how: str) -> torch.Tensor:
    """Initialize an r×r mixer in place (official default: kaiming-uniform a=√5, i.e. U(±1/√r))."""
    with torch.no_grad():
        if how == "kaiming":
            return nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        if how == "orthogonal":
            if weight.device.type == "meta":  # QR has no meta kernel; shapes are all that matter there
                return weight
            return nn.init.orthogonal_(weight)
        if how == "identity":
            return nn.init.eye_(weight)
    raise ValueError(f"mixer_init={how!r} is not one of {MIXER_INITS}.")


def load_moslora(model: nn.Module, path: str | os.PathLike, is_trainable: bool = False, **kwargs: Any) -> PeftModel:
    """Load a MoSLoRA adapter folder onto `model` with its mixers (plain `PeftModel.from_pretrained` drops them).

    Also reads adapters saved by the official fork (`use_moslora` / `lora_use_mixer` flags), whose
    mixer keys are the same `lora_AB`.
    """
    if not is_moslora_adapter(path):
        raise ValueError(f"{path} holds a plain LoRA adapter (no mixer): load it with PeftModel.from_pretrained.")
    saved = json.loads((Path(path) / CONFIG_NAME).read_text())
    config = MoSLoraConfig.from_peft_type(**saved)
    return PeftModel.from_pretrained(model, str(path), config=config, is_trainable=is_trainable, **kwargs)


def is_moslora_adapter(path: str | os.PathLike) -> bool:
    """Whether an adapter folder was saved from a MoSLoRA model (ours or the official fork's)."""
    with open(Path(path) / CONFIG_NAME) as f:
        saved = json.load(f)
    return bool(str(saved.get("peft_type", "")).startswith("MOSLORA") or saved.get("mixer_init")
                or saved.get("use_moslora") or saved.get("lora_use_mixer"))


def is_moslora_model(model: nn.Module) -> bool:
    """Whether a peft model carries MoSLoRA mixers."""
    return isinstance(model, PeftModel) and any(isinstance(c, MoSLoraConfig) for c in model.peft_config.values())


def plain_lora_state_dict(model: PeftModel, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's state dict with each mixer folded into A (A' = M·A), exact: B·M·A = B·A'.

    Keys are those `PeftModel.save_pretrained` writes; `lora_AB` keys are gone, other keys
    (e.g. modules_to_save heads) are kept.
    """
    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if f".{MIXER_NAME}." in key:
            continue
        if ".lora_A." in key:
            mixer_key = key.replace(".lora_A.", f".{MIXER_NAME}.")
            if mixer_key in state:
                value = (state[mixer_key].float() @ value.float()).to(value.dtype)
        out[key] = value.detach().contiguous()
    return out


def save_as_plain_lora(model: PeftModel, path: str | os.PathLike, adapter_name: str = "default") -> Path:
    """Write a plain-LoRA adapter folder (A' = M·A) that any LoRA loader reads, e.g. `PeftModel.from_pretrained`."""
    config = model.peft_config[adapter_name]
    lora_fields = {f.name for f in fields(LoraConfig) if f.init}
    plain = LoraConfig(**{k: v for k, v in config.to_dict().items() if k in lora_fields})
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(plain_lora_state_dict(model, adapter_name), str(path / SAFETENSORS_WEIGHTS_NAME))
    plain.save_pretrained(str(path))
    return path
