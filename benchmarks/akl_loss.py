"""AKL's cost, measured in one run:

1. the distillation training step (student forward + backward + AdamW, teacher forward under no_grad, the KD
   loss) against the SFT step (student only, cross-entropy), for FKL, RKL and AKL, on the testbed's shapes
   (a 5.5M tiny-LLaMA teacher, a 1.5M student, vocabulary 4096); the two sides run interleaved and the ratio is
   the median of per-round ratios of this process's CPU time (`--clock process`), so that other processes'
   load hits both alike;
2. the peak memory of the AKL loss + its backward at V = 32,000 and N = 4,096 tokens, chunked (1024 tokens)
   against the plain autograd form, each in a fresh process (peak resident memory above the inputs, which are
   the fp32 student logits, requiring grad, and the teacher logits: 2 x 0.52 GB). The student's logit gradient
   (one [N, V] tensor) is part of both.

    python benchmarks/akl_loss.py
    python benchmarks/akl_loss.py --tokens 1024 --vocab 32000   # a smaller memory case
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import time

import torch
import torch.nn.functional as F
from effitrain.methods.distillation import AdaptiveKL, ForwardKL, ReverseKL
from transformers import LlamaConfig, LlamaForCausalLM

TEACHER = dict(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
               num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512)
STUDENT = dict(TEACHER, hidden_size=128, intermediate_size=384, num_hidden_layers=2)
CLOCKS = {"wall": time.perf_counter, "process": time.process_time}


def step_ratios(batch: int, seq: int, rounds: int, clock) -> dict:
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(**TEACHER)).eval().requires_grad_(False)
    student = LlamaForCausalLM(LlamaConfig(**STUDENT))
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    ids = torch.randint(0, 4096, (batch, seq))
    labels = ids.clone()
    labels[:, : seq // 2] = -100  # the prompt half, as instruction data

    def sft():
        logits = student(input_ids=ids).logits[:, :-1]
        loss = F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        loss.backward(), optimizer.step(), optimizer.zero_grad()

    def kd(objective):
        def step():
            logits = student(input_ids=ids).logits[:, :-1]
            with torch.no_grad():
                t = teacher(input_ids=ids).logits[:, :-1]
            ce = F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
            loss = 0.5 * ce + 0.5 * objective(logits, t, labels[:, 1:])
            loss.backward(), optimizer.step(), optimizer.zero_grad()
        return step

    results = {}
    for name, objective in (("fkl", ForwardKL()), ("rkl", ReverseKL()), ("akl", AdaptiveKL())):
        a, b = kd(objective), sft
        a(), b()
        ratios, ta_all, tb_all = [], [], []
        for i in range(rounds):
            order = (a, b) if i % 2 == 0 else (b, a)
            times = {}
            for fn in order:
                start = clock()
                fn()
                times[fn] = clock() - start
            ratios.append(times[a] / times[b]), ta_all.append(times[a]), tb_all.append(times[b])
        results[name] = {"kd_over_sft": round(statistics.median(ratios), 3),
                         "kd_ms": round(1e3 * statistics.median(ta_all), 1),
                         "sft_ms": round(1e3 * statistics.median(tb_all), 1)}
    return results


def _peak_child(tokens: int, vocab: int, chunk: int | None, queue) -> None:
    torch.manual_seed(0)
    student = torch.randn(tokens, vocab, requires_grad=True)
    teacher = torch.randn(tokens, vocab)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    loss = AdaptiveKL(chunk_size=chunk)(student, teacher)
    loss.backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before  # kB on Linux
    queue.put({"peak_mb": round(peak / 1024, 1), "seconds": round(seconds, 2), "loss": float(loss)})


def loss_memory(tokens: int, vocab: int, chunk: int) -> dict:
    ctx = mp.get_context("spawn")
    out = {}
    for name, size in ((f"chunked_{chunk}", chunk), ("unchunked", None)):
        queue = ctx.Queue()
        proc = ctx.Process(target=_peak_child, args=(tokens, vocab, size, queue))
        proc.start()
        out[name] = queue.get()
        proc.join()
    nv_mb = tokens * vocab * 4 / 2**20
    for value in out.values():
        value["in_NxV_fp32"] = round(value["peak_mb"] / nv_mb, 2)
    out["one_NxV_fp32_mb"] = round(nv_mb, 1)
    out["unchunked_over_chunked"] = round(out["unchunked"]["peak_mb"] / out[f"chunked_{chunk}"]["peak_mb"], 2)
    out["same_loss"] = abs(out["unchunked"]["loss"] - out[f"chunked_{chunk}"]["loss"]) < 1e-4
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="process")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--chunk", type=int, default=1024)
    args = parser.parse_args()
    report = {"threads": torch.get_num_threads(), "clock": args.clock,
              "step": step_ratios(args.batch, args.seq, args.rounds, CLOCKS[args.clock]),
              "akl_loss_memory": {"tokens": args.tokens, "vocab": args.vocab,
                                  **loss_memory(args.tokens, args.vocab, args.chunk)}}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
