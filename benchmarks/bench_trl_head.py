"""xent's TRL fused head against TRL's own ChunkedLogProbFunction: forward + backward time, interleaved.

    .venv/bin/python benchmarks/bench_trl_head.py [--n 2048 --h 512 --v 32000 --repeats 5]

Both get the same hidden states, head and targets; the upstream covers the log-probabilities and the
entropy (as GRPO with an entropy term), or the log-probabilities alone. Medians of the repeats and their
ratio; CPU numbers are noisy, so quote ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from trl.trainer import utils as trl_utils

import xent.integrations.trl as xent_trl

TRL = trl_utils._ChunkedLogProbFunction if not xent_trl.is_applied() else xent_trl._original()


def step(fn, hidden, weight, targets, outputs):
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    out = fn.apply(h, w, None, targets, 1.0, 32768, None, 1.0, outputs)
    loss = out[0].sum() + (out[1].sum() * 0.01 if out[1] is not None else 0)
    loss.backward()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--h", type=int, default=512)
    parser.add_argument("--v", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=5)
    a = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(a.n, a.h, generator=gen)
    weight = torch.randn(a.v, a.h, generator=gen) / a.h**0.5
    targets = torch.randint(0, a.v, (a.n,), generator=gen)
    print(f"N={a.n} H={a.h} V={a.v} fp32, {torch.get_num_threads()} threads, torch {torch.__version__}")
    for outputs in (("log_probs",), ("log_probs", "entropy"), ("log_probs", "entropy", "is_top1")):
        times = {"trl": [], "xent": []}
        for fn in (TRL, xent_trl.XentChunkedLogProb):  # warm-up
            step(fn, hidden, weight, targets, outputs)
        for _ in range(a.repeats):
            for name, fn in (("trl", TRL), ("xent", xent_trl.XentChunkedLogProb)):
                t = time.perf_counter()
                step(fn, hidden, weight, targets, outputs)
                times[name].append(time.perf_counter() - t)
        trl_s, xent_s = statistics.median(times["trl"]), statistics.median(times["xent"])
        print(f"{'+'.join(outputs):32s} trl {trl_s:.3f} s  xent {xent_s:.3f} s  xent/trl {xent_s / trl_s:.2f}")


if __name__ == "__main__":
    main()
