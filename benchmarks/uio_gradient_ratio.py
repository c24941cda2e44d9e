"""UIO-LLMs Table 4 analogue: how close is the incremental-TBPTT gradient to full BPTT, with and without the
App. B compensation factor max(1, (t-1)/S)?

For each window S and sampler it runs the incremental estimator over ``--draws`` reservoir draws on the same
sequence and reports, against the full-BPTT gradient of the encoder parameters (the only ones the sampling
touches; the decoder's direct term is exact in every variant):
- ``|E g| / |g_full|``: norm of the draw-averaged gradient (1 = unbiased in norm),
- ``cos(E g, g_full)``,
- ``E|g| / |g_full|``: the average per-draw norm ratio.

    python benchmarks/uio_gradient_ratio.py                      # artifacts/tiny_llama if present, else random
    python benchmarks/uio_gradient_ratio.py --segments 12 --draws 64 --windows 1 2 4 8
"""

from __future__ import annotations

import argparse
import os

import torch
from effitrain.methods.incremental_tbptt import IncrementalTBPTT  # noqa: E402
from effitrain.methods.reservoir import RecencyWindow, ReservoirSampler  # noqa: E402
from effitrain.models.memory_lm import MemoryLM  # noqa: E402


def build(args) -> tuple[MemoryLM, torch.Tensor]:
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    if os.path.isdir(args.pretrained):
        base = AutoModelForCausalLM.from_pretrained(args.pretrained)
        source = args.pretrained
    else:
        base = LlamaForCausalLM(LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=768,
                                            num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=512))
        source = "random tiny LLaMA"
    model = MemoryLM.from_base(base, args.segment_length, args.memory_tokens, encoder_rank=16, encoder_alpha=32,
                     transfer_rank=16, transfer_alpha=32).double()
    if args.adapters and os.path.exists(args.adapters):  # the trained LoRAs and <mem> of a UIO export
        from safetensors.torch import load_file
        trained = {k: v.double() for k, v in load_file(args.adapters).items() if k in model.trainable_state_dict()}
        model.load_state_dict(trained, strict=False)
        source += f" + {args.adapters}"
    else:  # LoRA starts B at 0, which zeroes every encoder gradient: use a random point instead
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.05)
    vocab = base.config.vocab_size
    ids = torch.randint(0, vocab, (1, args.segments * args.segment_length),
                        generator=torch.Generator().manual_seed(args.seed))
    if os.path.isdir(args.pretrained):  # real text from the built-in corpus
        from effitrain.datamodules.corpus import builtin_documents
        from effitrain.datamodules.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(args.pretrained)
        text = " ".join(builtin_documents()[:200])
        stream = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = torch.tensor(stream[: ids.shape[1]])[None]
    print(f"model: {source}; {args.segments} segments of {args.segment_length}, m={args.memory_tokens}, fp64")
    return model, ids


def encoder_grad(model: MemoryLM) -> torch.Tensor:
    out = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                     for n, p in model.named_parameters()
                     if p.requires_grad and ("uio_encoder" in n or n == "memory_embedding")])
    model.zero_grad(set_to_none=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained", default="artifacts/tiny_llama")
    parser.add_argument("--adapters", default="artifacts/uio_passkey/model.safetensors")
    parser.add_argument("--segments", type=int, default=8)
    parser.add_argument("--segment-length", type=int, default=64)
    parser.add_argument("--memory-tokens", type=int, default=8)
    parser.add_argument("--windows", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--draws", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    model, ids = build(args)
    model.full_bptt_loss(ids, ids).backward()
    full = encoder_grad(model)
    print(f"|g_full| = {full.norm():.4g}\n")
    print("| S | variant | \\|E g\\| / \\|g_full\\| | cos(E g, g_full) | E\\|g\\| / \\|g_full\\| |")
    print("|---|---|---|---|---|")
    for window in args.windows:
        variants = [("reservoir, with factor", lambda window=window: ReservoirSampler(window, seed=args.seed), True),
                    ("reservoir, no factor (released code)", lambda window=window: ReservoirSampler(window, seed=args.seed), False),
                    ("recency TBPTT", lambda window=window: RecencyWindow(window), False)]
        for name, policy, compensate in variants:
            tbptt = IncrementalTBPTT(policy(), compensate=compensate)
            draws = 1 if name == "recency TBPTT" else args.draws
            mean, norms = torch.zeros_like(full), []
            for _ in range(draws):
                model.incremental_backward(ids, ids, tbptt)
                g = encoder_grad(model)
                mean += g / draws
                norms.append(float(g.norm() / full.norm()))
            cos = torch.nn.functional.cosine_similarity(mean, full, dim=0)
            print(f"| {window} | {name} | {mean.norm() / full.norm():.3f} | {cos:.3f} | "
                  f"{sum(norms) / len(norms):.3f} |", flush=True)


if __name__ == "__main__":
    main()
