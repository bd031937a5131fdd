"""What fp32 logits cost (logits_dtype=torch.float32) against logits rounded to a bf16 head's dtype, on CPU:
RL log-probabilities with the entropy (token_logprobs, whose default they are) and linear cross-entropy,
forward + backward time, peak memory beyond the returned gradients, and the log-probabilities' error
against a float64 reference of the same bf16 values; verl's formulation (the upcast fp32 logits
materialized) alongside.

    .venv/bin/python benchmarks/bench_fp32_logits.py [--n 2048 --h 1024 --v 32768 --repeats 3]

Time: medians of interleaved repeats of one step (gradients of the hidden states and the head, upstreams
U(-1, 1) on the log-probabilities and U(-0.5, 0.5) on the entropy, T = 1.5). Memory: as
benchmarks/bench_lean.py (a fresh process per implementation, an allocator that returns freed buffers),
in units of the logits' bytes in bf16 (N x V x 2).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

import xent
from xent.bench import median, peak_growth_of, time_interleaved

EXACT_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
T = 1.5


def verl_formulation(x, w, y):
    z = (x.float() @ w.float().T) / T
    logp = z.log_softmax(-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
    p = z.softmax(-1)
    return logp, torch.logsumexp(z, -1) - (p * z).sum(-1)


IMPLEMENTATIONS = {
    "token_logprobs + entropy": {
        "verl formulation (fp32 logits materialized)": verl_formulation,
        "xent, bf16 logits": lambda x, w, y: xent.token_logprobs(
            x, w, y, temperature=T, return_entropy=True, logits_dtype=torch.bfloat16
        ),
        "xent, fp32 logits (default)": lambda x, w, y: xent.token_logprobs(x, w, y, temperature=T, return_entropy=True),
    },
    "linear_cross_entropy": {
        "xent, bf16 logits (default)": lambda x, w, y: (
            xent.linear_cross_entropy(x, w, y, output_dtype=torch.float32),
        ),
        "xent, fp32 logits": lambda x, w, y: (
            xent.linear_cross_entropy(x, w, y, output_dtype=torch.float32, logits_dtype=torch.float32),
        ),
    },
}


def make(a):
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(a.n, a.h, generator=gen, dtype=torch.bfloat16) - 0.5).requires_grad_()
    w = (torch.rand(a.v, a.h, generator=gen, dtype=torch.bfloat16) - 0.5).requires_grad_()
    y = torch.randint(0, a.v, (a.n,), generator=gen)
    ups = (torch.rand(a.n, generator=gen) * 2 - 1, torch.rand(a.n, generator=gen) - 0.5)
    return x, w, y, ups


def step_of(fn, x, w, y, ups):
    def step():
        out = fn(x, w, y)
        return torch.autograd.grad(sum((o * u).sum() for o, u in zip(out, ups)), (x, w))

    return step


def probe(a) -> dict:
    x, w, y, ups = make(a)
    step = step_of(IMPLEMENTATIONS[a.loss][a.probe], x, w, y, ups)
    step()  # warm
    grads = []
    peak, exact = peak_growth_of(lambda: grads.extend(step()), "cpu")
    returned = sum(g.numel() * g.element_size() for g in grads)
    return {"extra": (peak - returned) / (a.n * a.v * 2), "exact": exact}


def logprob_error(fn, x, w, y) -> float:
    """Max |log-probability - float64's| (the loss per token for linear cross-entropy: its negative)."""
    with torch.no_grad():
        exact = torch.log_softmax((x.double() @ w.double().T) / T, -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
        if fn in IMPLEMENTATIONS["linear_cross_entropy"].values():
            exact = torch.log_softmax(x.double() @ w.double().T, -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
            ld = torch.float32 if fn is IMPLEMENTATIONS["linear_cross_entropy"]["xent, fp32 logits"] else None
            got = -xent.linear_cross_entropy(x, w, y, reduction="none", output_dtype=torch.float32, logits_dtype=ld)
        else:
            got = fn(x, w, y)[0]
        return float((got.double() - exact).abs().max())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--h", type=int, default=1024)
    parser.add_argument("--v", type=int, default=32768)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--probe", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--loss", default=None, help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.probe:
        print(json.dumps(probe(a)))
        return
    print(f"N={a.n} H={a.h} V={a.v} bf16, T={T}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| loss | implementation | time (s) | / first row | extra memory / bf16 logits | max log-prob error |")
    print("|---|---|---|---|---|---|")
    env = {**os.environ, **EXACT_MALLOC}
    x, w, y, ups = make(a)
    for loss, impls in IMPLEMENTATIONS.items():
        times = time_interleaved({k: step_of(f, x, w, y, ups) for k, f in impls.items()}, a.repeats)
        first = median(times[next(iter(impls))])
        for name, fn in impls.items():
            args = [sys.executable, __file__, "--probe", name, "--loss", loss, f"--n={a.n}", f"--h={a.h}", f"--v={a.v}"]
            run = subprocess.run(args, capture_output=True, text=True, check=True, env=env)
            mem = json.loads(run.stdout.splitlines()[-1])
            t = median(times[name])
            approx = "" if mem["exact"] else " (approx.)"
            err = logprob_error(fn, x.detach(), w.detach(), y)
            print(
                f"| {loss} | {name} | {t:.2f} | {t / first:.2f} | {mem['extra']:.3f}{approx} | {err:.1e} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
