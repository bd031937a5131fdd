"""The memory plans of the losses over a linear head on CPU: memory_mode='fast' against 'lean' and the
naive loss (the logits materialized), for linear cross-entropy and linear distillation (forward KL, a
teacher head): forward + backward time and peak memory beyond the returned gradients.

    .venv/bin/python benchmarks/bench_lean.py [--n 2048 --h 1024 --v 32768 --repeats 3]

Time: medians of interleaved repeats of one step (the gradients of the hidden states and the head).
Memory: the resident-set growth of one warm step beyond the gradients it returns, each implementation in
a fresh process whose allocator returns every buffer above 64 KiB when freed (so the growth counts every
allocation of the step, accumulators and workspaces included), in units of the student's logits' bytes
(N x V in the head's dtype).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch
import torch.nn.functional as F

import xent
from xent.bench import median, peak_growth_of, time_interleaved
from xent.distill import TeacherHead, linear_distillation_loss

EXACT_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
TEACHER_HIDDEN = 256


def naive_distill(x, w, teacher):
    log_p_s = torch.log_softmax(F.linear(x, w).float(), -1)
    log_p_t = torch.log_softmax(F.linear(teacher.input, teacher.weight).float(), -1)
    return F.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean")


LOSSES = {
    "linear_cross_entropy": {
        "naive": lambda x, w, y, t: F.cross_entropy(F.linear(x, w), y),
        "xent fast": lambda x, w, y, t: xent.linear_cross_entropy(x, w, y, memory_mode="fast"),
        "xent lean": lambda x, w, y, t: xent.linear_cross_entropy(x, w, y, memory_mode="lean"),
    },
    "linear_distillation_loss (kl)": {
        "naive": lambda x, w, y, t: naive_distill(x, w, t),
        "xent fast": lambda x, w, y, t: linear_distillation_loss(x, w, t, reduction="batchmean", memory_mode="fast"),
        "xent lean": lambda x, w, y, t: linear_distillation_loss(x, w, t, reduction="batchmean", memory_mode="lean"),
    },
}


def make(a, dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(a.n, a.h, generator=gen).to(dtype).requires_grad_()
    w = (torch.randn(a.v, a.h, generator=gen) / a.h**0.5).to(dtype).requires_grad_()
    y = torch.randint(0, a.v, (a.n,), generator=gen)
    t_in = torch.randn(a.n, TEACHER_HIDDEN, generator=gen).to(dtype)
    teacher = TeacherHead(t_in, (torch.randn(a.v, TEACHER_HIDDEN, generator=gen) / 16).to(dtype))
    return x, w, y, teacher


def step_of(fn, x, w, y, teacher):
    return lambda: torch.autograd.grad(fn(x, w, y, teacher), (x, w))


def probe(a) -> dict:
    x, w, y, teacher = make(a, getattr(torch, a.dtype))
    step = step_of(LOSSES[a.loss][a.probe], x, w, y, teacher)
    step()  # warm
    grads = []
    peak, exact = peak_growth_of(lambda: grads.extend(step()), "cpu")
    returned = sum(g.numel() * g.element_size() for g in grads)
    return {"extra": (peak - returned) / (a.n * a.v * x.element_size()), "exact": exact}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--h", type=int, default=1024)
    parser.add_argument("--v", type=int, default=32768)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--probe", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--loss", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default=None, help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.probe:
        print(json.dumps(probe(a)))
        return
    print(f"N={a.n} H={a.h} V={a.v}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| loss | dtype | implementation | time (s) | / naive | / xent fast | extra memory / logits |")
    print("|---|---|---|---|---|---|---|")
    env = {**os.environ, **EXACT_MALLOC}
    for loss, impls in LOSSES.items():
        for dtype in a.dtypes.split(","):
            x, w, y, teacher = make(a, getattr(torch, dtype))
            times = time_interleaved({k: step_of(f, x, w, y, teacher) for k, f in impls.items()}, a.repeats)
            for name in impls:
                args = [sys.executable, __file__, "--probe", name, "--loss", loss, "--dtype", dtype]
                args += [f"--n={a.n}", f"--h={a.h}", f"--v={a.v}"]
                run = subprocess.run(args, capture_output=True, text=True, check=True, env=env)
                mem = json.loads(run.stdout.splitlines()[-1])
                t = median(times[name])
                approx = "" if mem["exact"] else " (approx.)"
                print(
                    f"| {loss} | {dtype} | {name} | {t:.2f} | {t / median(times['naive']):.2f} | "
                    f"{t / median(times['xent fast']):.2f} | {mem['extra']:.3f}{approx} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
