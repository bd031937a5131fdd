"""xent's TRL fused head against TRL's own ChunkedLogProbFunction: forward + backward time, interleaved, and
peak memory, each implementation in a fresh process.

    .venv/bin/python benchmarks/bench_trl_head.py [--n 2048 --h 512 --v 32000 --repeats 5]

Both get the same hidden states, head and targets and are asked for the same outputs: the log-probabilities
alone (DPO's reference pass), with the entropy (GRPO with an entropy term), and all five (SFT's metrics
need entropy and is_top1; the others cost TRL one more reduction per tile and xent one more statistic).
The upstream covers the log-probabilities and the entropy. Medians of the repeats and their ratio; CPU
numbers are noisy, so quote ratios. Memory: the resident-set growth of one warm step beyond the gradients
it returns (xent.bench.peak_growth_of).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
from trl.trainer import utils as trl_utils

import xent.integrations.trl as xent_trl
from xent.bench import peak_growth_of

TRL = trl_utils._ChunkedLogProbFunction if not xent_trl.is_applied() else xent_trl._original()
IMPLS = {"trl": TRL, "xent": xent_trl.XentChunkedLogProb}
OUTPUT_SETS = {
    "log_probs": ("log_probs",),
    "+entropy": ("log_probs", "entropy"),
    "all five": xent_trl.OUTPUTS,
}


def inputs(a):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(a.n, a.h, generator=gen)
    weight = torch.randn(a.v, a.h, generator=gen) / a.h**0.5
    targets = torch.randint(0, a.v, (a.n,), generator=gen)
    return hidden, weight, targets


def step(fn, hidden, weight, targets, outputs):
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    out = fn.apply(h, w, None, targets, 1.0, 32768, None, 1.0, outputs)
    loss = out[0].sum() + (out[1].sum() * 0.01 if out[1] is not None else 0)
    loss.backward()
    return h.grad, w.grad


def probe(a) -> dict:
    """This process's peak growth for one implementation and output set (after a warm-up step)."""
    hidden, weight, targets = inputs(a)
    fn, outputs = IMPLS[a.probe], OUTPUT_SETS[a.outputs]
    step(fn, hidden, weight, targets, outputs)
    grads = []
    peak, exact = peak_growth_of(lambda: grads.extend(step(fn, hidden, weight, targets, outputs)), "cpu")
    return {"peak": peak, "grad_bytes": sum(g.numel() * g.element_size() for g in grads), "exact": exact}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--h", type=int, default=512)
    parser.add_argument("--v", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--probe", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--outputs", default="log_probs", help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.probe:
        print(json.dumps(probe(a)))
        return
    hidden, weight, targets = inputs(a)
    logits_mb = a.n * a.v * 4 / 2**20
    print(f"N={a.n} H={a.h} V={a.v} fp32, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"logits {logits_mb:.0f} MiB; peak = resident-set growth of one step beyond its gradients")
    print("| outputs | TRL (s) | xent (s) | xent / TRL | TRL peak / logits | xent peak / logits |")
    print("|---|---|---|---|---|---|")
    for label, outputs in OUTPUT_SETS.items():
        times = {name: [] for name in IMPLS}
        for fn in IMPLS.values():  # warm-up
            step(fn, hidden, weight, targets, outputs)
        for _ in range(a.repeats):
            for name, fn in IMPLS.items():
                t = time.perf_counter()
                step(fn, hidden, weight, targets, outputs)
                times[name].append(time.perf_counter() - t)
        peaks = {}
        for name in IMPLS:
            args = [sys.executable, __file__, "--probe", name, "--outputs", label]
            args += [f"--{k}={getattr(a, k)}" for k in ("n", "h", "v")]
            mem = json.loads(subprocess.run(args, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
            peaks[name] = (mem["peak"] - mem["grad_bytes"]) / 2**20 / logits_mb
        trl_s, xent_s = statistics.median(times["trl"]), statistics.median(times["xent"])
        print(
            f"| {label} | {trl_s:.3f} | {xent_s:.3f} | {xent_s / trl_s:.2f} | {peaks['trl']:.2f} | "
            f"{peaks['xent']:.2f} |"
        )


if __name__ == "__main__":
    main()
