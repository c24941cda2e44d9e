"""UIO-LLMs memory model: a frozen LLaMA read as an encoder/decoder RNN over segments (arXiv 2406.18173, §3.1-3.2).

```
segment x_s (l tokens) + m <mem> ──► encoder = base + LoRA(W_Q, W_V), mask below ──► m_s: the <mem> tokens'
                                                                                     input-normed hidden state
                                                                                     at every layer [L, B, m, d]
segment x_t ──► decoder = base (own tokens: base weights) ─ attends to ─ [K_mem; V_mem] of m_1..m_{t-1}
                                      transfer head: K_mem = h W_K^lora, V_mem = h W_V^lora (Eq. 2), layer by layer
```

- Encoder (Eq. 1): ordinary tokens are causal; <mem> token i sees ordinary tokens [0, (i+1)·l/m) and itself;
  RoPE positions 0..l-1 for tokens and (i+1)·l/m for <mem> token i. It reads no earlier memory, so segments
  compress independently. All <mem> tokens share one learned embedding, initialised from EOS.
- Decoder: the memory K/V form a prefix ahead of the segment's own K/V; RoPE positions run from 0 over the
  concatenation. With no memory the decoder is exactly the base model.
- The two LoRAs (``uio_encoder`` on q/v, ``uio_transfer`` on k/v; peft's LoRA init, B = 0) sit beside the
  frozen base, not inside it: the base model object given to ``from_base`` keeps its modules and state dict
  (only ``requires_grad`` is switched off). The attention is written here because each LoRA applies to a
  subset of the tokens only.
- Saving follows transformers: ``save_pretrained`` writes ``config.json`` (``model_type: effitrain_memory_lm``,
  the base's config nested) and the weights; ``AutoModel.from_pretrained`` loads it once ``effitrain.models``
  is imported (it registers ``MemoryLMConfig``/``MemoryLM`` with the Auto classes).
- Context budget: the k-th segment's tokens sit at positions m·(k-1) + [0, l), so a base with P positions
  reads ``max_context_length`` = l·(⌊(P-l)/m⌋ + 1) tokens (99,328 for Llama-2 at 32x).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from effitrain.methods.incremental_tbptt import IncrementalTBPTT
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv, rotate_half

ENCODER_ADAPTER, TRANSFER_ADAPTER = "uio_encoder", "uio_transfer"
KVCache = list[tuple[Tensor, Tensor]]
MemoryMode = Literal["on", "zero", "off"]


def max_context_length(segment_length: int, num_memory_tokens: int, max_positions: int) -> int:
    """Longest input whose decoder positions fit in ``max_positions`` (the §4 "100K" for l=1024, m=32, 4K)."""
    if max_positions < segment_length:
        return 0
    return segment_length * ((max_positions - segment_length) // num_memory_tokens + 1)


def encoder_attention_mask(segment_length: int, num_memory_tokens: int) -> Tensor:
    """Boolean [l+m, l+m] mask (True = may attend): causal tokens; <mem> i sees [0, (i+1)·l/m) and itself."""
    seg, m = segment_length, num_memory_tokens
    mask = torch.ones(seg + m, seg + m, dtype=torch.bool).tril()
    mask[seg:, seg:] = torch.eye(m, dtype=torch.bool)
    stride = seg // m
    for i in range(m):
        mask[seg + i, (i + 1) * stride:seg] = False
    return mask


def encoder_positions(segment_length: int, num_memory_tokens: int) -> Tensor:
    """RoPE positions [1, l+m]: 0..l-1 for the tokens, (i+1)·l/m for <mem> token i."""
    stride = segment_length // num_memory_tokens
    memory = torch.arange(1, num_memory_tokens + 1) * stride
    return torch.cat([torch.arange(segment_length), memory])[None]


class LoraDelta(nn.Module):
    """The LoRA update s·B·A·dropout(x) of one projection (peft's init: A kaiming-uniform a=√5, B = 0)."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.lora_A = nn.Linear(in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, out_features, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.scaling = alpha / rank
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: Tensor) -> Tensor:
        return self.lora_B(self.lora_A(self.dropout(x.to(self.lora_A.weight.dtype)))) * self.scaling


def _project(linear: nn.Module, x: Tensor, lora: LoraDelta | None) -> Tensor:
    """``linear(x)`` with the base weights, plus the LoRA's delta when one is given."""
    out = linear(x)
    return out if lora is None else out + lora(x).to(out.dtype)


class MemoryLMConfig(PretrainedConfig):
    """The settings of a ``MemoryLM`` and its base's config (a dict with the base's ``model_type``).

    Args:
        base_config: the base causal LM's config (``PretrainedConfig`` or its ``to_dict()``).
        segment_length, num_memory_tokens, encoder_rank, encoder_alpha, transfer_rank, transfer_alpha,
        lora_dropout, max_positions: as ``MemoryLM.from_base``.
    """

    model_type = "effitrain_memory_lm"

    def __init__(self, base_config: dict[str, Any] | PretrainedConfig | None = None, segment_length: int = 1024,
                 num_memory_tokens: int = 32, encoder_rank: int = 128, encoder_alpha: float = 512,
                 transfer_rank: int = 128, transfer_alpha: float = 512, lora_dropout: float = 0.0,
                 max_positions: int | None = None, **kwargs: Any) -> None:
        self.base_config = base_config.to_dict() if isinstance(base_config, PretrainedConfig) else base_config
        self.segment_length, self.num_memory_tokens = segment_length, num_memory_tokens
        self.encoder_rank, self.encoder_alpha = encoder_rank, encoder_alpha
        self.transfer_rank, self.transfer_alpha = transfer_rank, transfer_alpha
        self.lora_dropout, self.max_positions = lora_dropout, max_positions
        super().__init__(**kwargs)

    def base(self) -> PretrainedConfig:
        """The base's config object."""
        if not self.base_config:
            raise ValueError("MemoryLMConfig has no base_config: build the model with MemoryLM.from_base(base, ...).")
        settings = dict(self.base_config)
        return AutoConfig.for_model(settings.pop("model_type"), **settings)


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


class MemoryLM(PreTrainedModel):
    """Encoder/decoder memory model on a transformers LLaMA-family causal LM (frozen).

    Build it around a loaded base with ``MemoryLM.from_base(base, segment_length=..., ...)``; save and load it
    as any transformers model (``save_pretrained``, ``MemoryLM.from_pretrained`` or ``AutoModel.from_pretrained``).

    Args:
        config: a ``MemoryLMConfig``.
        base: the base model (``from_base`` passes it); ``None`` builds one from ``config.base_config``
            (``from_pretrained`` then loads its weights).

    Raises:
        ValueError: if m does not divide l, the base is not LLaMA-style, or it does not fit in its own position
            budget.
    """

    config_class = MemoryLMConfig
    main_input_name = "input_ids"

    def __init__(self, config: MemoryLMConfig, base: PreTrainedModel | None = None):
        super().__init__(config)
        segment_length, num_memory_tokens = config.segment_length, config.num_memory_tokens
        if num_memory_tokens < 1 or segment_length % num_memory_tokens:
            raise ValueError(f"num_memory_tokens ({num_memory_tokens}) must divide segment_length "
                             f"({segment_length}): <mem> token i sits at position (i+1)·l/m.")
        if base is None:
            base = AutoModelForCausalLM.from_config(config.base())
        layers = getattr(getattr(base, "model", None), "layers", None)
        if layers is None or not hasattr(layers[0], "self_attn"):
            raise ValueError(f"{type(base).__name__} is not a LLaMA-style causal LM (no model.layers[i].self_attn).")
        self.segment_length, self.num_memory_tokens = segment_length, num_memory_tokens
        self.max_positions = config.max_positions or base.config.max_position_embeddings
        if self.max_positions < segment_length + 1:
            raise ValueError(f"segment_length {segment_length} does not fit the base's {self.max_positions} "
                             "positions (the encoder needs l+1): use shorter segments.")
        base.requires_grad_(False)
        self.base = base

        def loras(names: tuple[str, ...], rank: int, alpha: float) -> nn.ModuleList:
            return nn.ModuleList(
                nn.ModuleDict({name: LoraDelta(getattr(layer.self_attn, name).in_features,
                                               getattr(layer.self_attn, name).out_features, rank, alpha,
                                               config.lora_dropout) for name in names})
                for layer in layers)

        self.uio_encoder = loras(("q_proj", "v_proj"), config.encoder_rank, config.encoder_alpha)
        self.uio_transfer = loras(("k_proj", "v_proj"), config.transfer_rank, config.transfer_alpha)
        # The memory is read at the last layer's input norm: its encoder q/v LoRA never reaches it.
        self.uio_encoder[-1].requires_grad_(False)
        embeddings = base.get_input_embeddings().weight
        eos = base.config.eos_token_id
        eos = eos[0] if isinstance(eos, (list, tuple)) else eos
        init = embeddings[eos] if eos is not None else embeddings.mean(0)
        self.memory_embedding = nn.Parameter(init.detach().clone())
        self.post_init()

    @classmethod
    def from_base(cls, base: PreTrainedModel, segment_length: int = 1024, num_memory_tokens: int = 32,
                  encoder_rank: int = 128, encoder_alpha: float = 512, transfer_rank: int = 128,
                  transfer_alpha: float = 512, lora_dropout: float = 0.0, max_positions: int | None = None) -> MemoryLM:
        """Wrap a loaded causal LM (frozen, not otherwise changed) with fresh LoRAs and <mem> embedding.

        Args:
            base: a ``LlamaForCausalLM`` (or any model with the same ``model.layers[i].self_attn.{q,k,v,o}_proj``
                layout: Mistral, Qwen2 without biases...).
            segment_length: l, tokens per segment (1024 in the paper).
            num_memory_tokens: m, <mem> tokens per segment (32 for 32x compression, 128 for 8x); divides l.
            encoder_rank, encoder_alpha: the encoder LoRA on W_Q, W_V (r=128, α=512 in the paper).
            transfer_rank, transfer_alpha: the transfer-head LoRA on W_K, W_V (r=128, α=512).
            lora_dropout: dropout on the LoRA inputs (0 in the paper).
            max_positions: RoPE budget; defaults to ``base.config.max_position_embeddings``.
        """
        config = MemoryLMConfig(base.config, segment_length, num_memory_tokens, encoder_rank, encoder_alpha,
                                transfer_rank, transfer_alpha, lora_dropout, max_positions)
        return cls(config, base=base)

    def _init_weights(self, module: nn.Module) -> None:
        # Everything is initialised in __init__ (the base by its own class); nothing to redo after loading.
        pass

    def _lora(self, adapter: str | None, index: int, name: str) -> LoraDelta | None:
        if adapter is None:
            return None
        loras = getattr(self, adapter)[index]
        return loras[name] if name in loras else None

    # ----------------------------------------------------------------------------------------- structure
    @property
    def layers(self) -> nn.ModuleList:
        return self.base.model.layers

    def max_context(self) -> int:
        return max_context_length(self.segment_length, self.num_memory_tokens, self.max_positions)

    def check_context(self, num_tokens: int) -> None:
        """Raise before any work if ``num_tokens`` do not fit the RoPE budget l + m·(segments-1) <= P."""
        if num_tokens > self.max_context():
            raise ValueError(
                f"{num_tokens} tokens do not fit: with segment_length={self.segment_length} and "
                f"num_memory_tokens={self.num_memory_tokens} the last segment would need positions beyond "
                f"max_positions={self.max_positions}; the longest context is {self.max_context()} tokens. "
                "Shorten the input, or use fewer memory tokens per segment (higher compression).")

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """The LoRAs and the <mem> embedding: everything UIO trains (about 2% of a 7B model)."""
        return {name: p.detach() for name, p in self.named_parameters() if p.requires_grad}

    def encoder_mask(self, device: torch.device) -> Tensor:
        return encoder_attention_mask(self.segment_length, self.num_memory_tokens).to(device)

    def encoder_positions(self, device: torch.device) -> Tensor:
        return encoder_positions(self.segment_length, self.num_memory_tokens).to(device)

    # ------------------------------------------------------------------------------------------- layers
    def _run_layers(self, hidden: Tensor, positions: Tensor, mask: Tensor, past: KVCache | None,
                    adapter: str | None, capture_from: int | None = None) -> tuple[Tensor, KVCache, list[Tensor]]:
        """The LLaMA stack with explicit masks/positions; ``adapter`` adds its LoRA to q and v of every token.

        With ``capture_from`` it returns the input-normed hidden states of tokens [capture_from:] at every
        layer and stops at the last layer's input norm (nothing after it reaches the memory).
        """
        batch, length, _ = hidden.shape
        cos, sin = self.base.model.rotary_emb(hidden, positions)
        cache, captured = [], []
        for index, layer in enumerate(self.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)
            if capture_from is not None:
                captured.append(x[:, capture_from:])
                if index == len(self.layers) - 1:
                    break
            shape = (batch, length, -1, attn.head_dim)
            q = _project(attn.q_proj, x, self._lora(adapter, index, "q_proj")).view(shape).transpose(1, 2)
            k = _project(attn.k_proj, x, None).view(shape).transpose(1, 2)
            v = _project(attn.v_proj, x, self._lora(adapter, index, "v_proj")).view(shape).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            if past is not None:
                k, v = torch.cat([past[index][0], k], dim=2), torch.cat([past[index][1], v], dim=2)
            cache.append((k, v))
            groups = attn.num_key_value_groups
            out = F.scaled_dot_product_attention(q, repeat_kv(k, groups), repeat_kv(v, groups), attn_mask=mask,
                                                 scale=attn.scaling)
            hidden = hidden + attn.o_proj(out.transpose(1, 2).reshape(batch, length, -1))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return hidden, cache, captured

    # ------------------------------------------------------------------------------------ encoder/decoder
    def encode(self, segment_ids: Tensor) -> Tensor:
        """Compress a full segment [B, l] into its memory [L, B, m, d] (Eq. 1)."""
        batch, length = segment_ids.shape
        if length != self.segment_length:
            raise ValueError(f"the encoder takes full segments of {self.segment_length} tokens, got {length}.")
        tokens = self.base.get_input_embeddings()(segment_ids)
        memory = self.memory_embedding.to(tokens.dtype).expand(batch, self.num_memory_tokens, -1)
        hidden = torch.cat([tokens, memory], dim=1)
        _, _, captured = self._run_layers(hidden, self.encoder_positions(hidden.device),
                                          self.encoder_mask(hidden.device), None, ENCODER_ADAPTER,
                                          capture_from=length)
        return torch.stack(captured)

    def memory_kv(self, memories: Sequence[Tensor]) -> KVCache | None:
        """Transfer head (Eq. 2): per layer K_mem = rope(h W_K^lora), V_mem = h W_V^lora at positions 0..P-1."""
        if not memories:
            return None
        states = torch.cat(list(memories), dim=2)  # [L, B, P, d]
        _, batch, length, _ = states.shape
        positions = torch.arange(length, device=states.device)[None]
        cos, sin = self.base.model.rotary_emb(states[0], positions)
        cache = []
        for index, (layer, h) in enumerate(zip(self.layers, states, strict=True)):
            attn = layer.self_attn
            shape = (batch, length, -1, attn.head_dim)
            k = _project(attn.k_proj, h, self._lora(TRANSFER_ADAPTER, index, "k_proj")).view(shape).transpose(1, 2)
            v = _project(attn.v_proj, h, self._lora(TRANSFER_ADAPTER, index, "v_proj")).view(shape).transpose(1, 2)
            cache.append((_rope(k, cos, sin), v))
        return cache

    def decode(self, input_ids: Tensor, past: KVCache | None = None) -> tuple[Tensor, KVCache]:
        """Logits of ``input_ids`` [B, T] after the ``past`` K/V (memory prefix and/or cached tokens).

        Positions continue from the past length; the returned cache includes the new tokens.
        """
        length = input_ids.shape[1]
        start = past[0][0].shape[2] if past else 0
        device = input_ids.device
        positions = torch.arange(start, start + length, device=device)[None]
        mask = torch.arange(start + length, device=device)[None] <= positions[0, :, None]
        hidden = self.base.get_input_embeddings()(input_ids)
        hidden, cache, _ = self._run_layers(hidden, positions, mask, past, None)
        return self.base.lm_head(self.base.model.norm(hidden)), cache

    # ------------------------------------------------------------------------------------------- training
    @staticmethod
    def shifted_targets(labels: Tensor) -> Tensor:
        """Next-token targets over the whole sequence, so a segment's last token predicts the next segment's first."""
        return F.pad(labels[:, 1:], (0, 1), value=-100)

    @staticmethod
    def segment_loss(logits: Tensor, targets: Tensor) -> Tensor:
        """J_t: token-mean cross-entropy over the segment's labelled targets."""
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)

    def incremental_backward(self, input_ids: Tensor, labels: Tensor, tbptt: IncrementalTBPTT) -> Tensor:
        """One sequence of UIO training (§3.3, App. B): accumulates the gradient of Σ_t J_t in ``.grad``.

        Per segment t: decoder on x_t with the leaves m̃_1..m̃_{t-1} → J_t, ``tbptt.backward_loss`` (scales the
        fresh leaf gradients), encode x_t → m_t and hand it to ``tbptt`` (which flushes the graphs its policy
        drops); the last segment is never encoded (nothing reads it), then ``tbptt.finish()``.
        Segments without labelled targets skip the decoder. Returns Σ_t J_t (detached).
        """
        self.check_context(input_ids.shape[1])
        targets = self.shifted_targets(labels)
        segments = input_ids.split(self.segment_length, dim=1)
        tbptt.reset()
        total = input_ids.new_zeros((), dtype=torch.float32)
        for index, (segment, target) in enumerate(zip(segments, targets.split(self.segment_length, dim=1), strict=True)):
            if bool((target != -100).any()):
                logits, _ = self.decode(segment, self.memory_kv(tbptt.memories))
                loss = self.segment_loss(logits, target)
                tbptt.backward_loss(loss)
                total = total + loss.detach()
            if index < len(segments) - 1:
                tbptt.add_memory(self.encode(segment))
        tbptt.finish()
        return total

    def full_bptt_loss(self, input_ids: Tensor, labels: Tensor, window: int | None = None) -> Tensor:
        """Σ_t J_t as one graph: full BPTT (Eq. 5) or, with ``window`` S, plain TBPTT (Eq. 6: J_t reaches the
        encoders of segments t-S..t-1 only). The naive reference for the incremental estimator; memory grows with T.
        """
        targets = self.shifted_targets(labels)
        segments = input_ids.split(self.segment_length, dim=1)
        memories: list[Tensor] = []
        total = input_ids.new_zeros((), dtype=torch.float32)
        for index, (segment, target) in enumerate(zip(segments, targets.split(self.segment_length, dim=1), strict=True)):
            if bool((target != -100).any()):
                cut = 0 if window is None else max(0, index - window)
                visible = [m.detach() for m in memories[:cut]] + memories[cut:]
                total = total + self.segment_loss(self.decode(segment, self.memory_kv(visible))[0], target)
            if index < len(segments) - 1:
                memories.append(self.encode(segment))
        return total

    # ------------------------------------------------------------------------------------------ inference
    def forward(self, input_ids: Tensor, memory: MemoryMode = "on") -> Tensor:
        """Logits of a whole document [B, N] read segment by segment (teacher forcing, for evaluation).

        ``memory``: "on" (UIO), "zero" (memory states replaced by zeros: same positions, no content) or "off"
        (no memory at all: the base model on each segment alone).
        """
        self.check_context(input_ids.shape[1])
        memories: list[Tensor] = []
        logits = []
        for segment in input_ids.split(self.segment_length, dim=1):
            prefix = self.memory_kv(memories) if memory != "off" else None
            logits.append(self.decode(segment, prefix)[0])
            if segment.shape[1] == self.segment_length and memory != "off":
                states = self.encode(segment)
                memories.append(torch.zeros_like(states) if memory == "zero" else states)
        return torch.cat(logits, dim=1)

    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int, eos_token_id: int | None = None) -> Tensor:
        """Greedy generation with memory: prefill by segments, then decode with a K/V cache of
        length m·⌊n/l⌋ + (n mod l) <= l + m·⌊n/l⌋ after n tokens.

        Every time l raw tokens have accumulated they are encoded into memory and their raw K/V dropped.
        """
        self.check_context(input_ids.shape[1] + max_new_tokens)
        seg = self.segment_length
        memories: list[Tensor] = []
        pending = input_ids
        while pending.shape[1] > seg:  # complete segments that are followed by more prompt: encode only
            memories.append(self.encode(pending[:, :seg]))
            pending = pending[:, seg:]
        logits, cache = self.decode(pending, self.memory_kv(memories))
        generated = []
        for _ in range(max_new_tokens):
            if pending.shape[1] == seg:
                memories.append(self.encode(pending))
                pending, cache = pending[:, :0], self.memory_kv(memories)
            token = logits[:, -1].argmax(-1, keepdim=True)
            generated.append(token)
            if eos_token_id is not None and bool((token == eos_token_id).all()):
                break
            logits, cache = self.decode(token, cache)
            pending = torch.cat([pending, token], dim=1)
        self.last_cache_length = cache[0][0].shape[2] if cache else 0
        return torch.cat([input_ids, *generated], dim=1)


AutoConfig.register(MemoryLMConfig.model_type, MemoryLMConfig, exist_ok=True)
AutoModel.register(MemoryLMConfig, MemoryLM, exist_ok=True)
