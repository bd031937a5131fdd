"""Measurement helpers shared by benchmarks/ and `xent bench`.

Timing runs the implementations interleaved in one process (so machine noise hits all of them alike)
and reports medians and ratios. Peak memory is measured in a fresh process per implementation, from the
kernel's resident-set high-water mark (VmHWM in /proc/self/status, reset through /proc/self/clear_refs
where the kernel allows it), so one measurement cannot inherit another's peak.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .problems import TokenStatistics

# ----------------------------------------------------------------------------------------------------
# The workloads: each builds its tensors once and returns a step() doing forward + backward.


@dataclass(frozen=True)
class Workload:
    kind: str  # "ce" (logits -> loss) or "linear" (hidden states, lm_head weight -> loss)
    tokens: int
    vocab: int
    hidden: int = 0
    dtype: str = "float32"
    device: str = "cpu"

    @property
    def logits_bytes(self) -> int:
        return self.tokens * self.vocab * torch.finfo(getattr(torch, self.dtype)).bits // 8

    def label(self) -> str:
        size = f"N={self.tokens}" + (f" H={self.hidden}" if self.kind == "linear" else "") + f" V={self.vocab}"
        return f"{'cross_entropy' if self.kind == 'ce' else 'linear_cross_entropy'} {size} {self.dtype}"


CE_IMPLS = ("xent", "torch")
# torch's chunked F.linear_cross_entropy exists from torch 2.13 on; older installs compare with the rest.
LINEAR_IMPLS = ("xent", "naive") + (("torch-chunked",) if hasattr(torch.nn, "LinearCrossEntropyOptions") else ())


def make_step(w: Workload, impl: str, seed: int = 0) -> tuple[Callable[[], torch.Tensor], Callable[[], list]]:
    """(step, grads): step() runs forward + backward and returns the loss; grads() the gradients."""
    import xent

    gen = torch.Generator(device=w.device).manual_seed(seed)
    dtype = getattr(torch, w.dtype)
    target = torch.randint(0, w.vocab, (w.tokens,), generator=gen, device=w.device)
    if w.kind == "ce":
        x = torch.randn(w.tokens, w.vocab, generator=gen, device=w.device, dtype=dtype).requires_grad_()
        params = [x]
        if impl in STATS_IMPLS:  # the loss plus every per-token statistic

            def forward():
                if impl == "xent-stats":
                    return xent.cross_entropy(x, target, return_stats=STATISTICS)[0]
                return naive_statistics(x, target)[0]
        else:
            fn = {"xent": xent.cross_entropy, "torch": F.cross_entropy}[impl]

            def forward():
                return fn(x, target)
    else:
        h = (torch.randn(w.tokens, w.hidden, generator=gen, device=w.device, dtype=dtype)).requires_grad_()
        lm = (
            torch.randn(w.vocab, w.hidden, generator=gen, device=w.device, dtype=dtype) / w.hidden**0.5
        ).requires_grad_()
        params = [h, lm]
        if impl == "xent":

            def forward():
                return xent.linear_cross_entropy(h, lm, target)
        elif impl == "naive":

            def forward():
                return F.cross_entropy(h @ lm.T, target)
        elif impl == "torch-chunked":
            options = torch.nn.LinearCrossEntropyOptions()

            def forward():
                return F.linear_cross_entropy(h, lm, target, options=options)
        elif impl in RL_IMPLS:  # a policy-gradient objective from log-probabilities and entropies
            advantages = torch.randn(w.tokens, generator=gen, device=w.device)

            def forward():
                if impl == "xent-rl":
                    logp, entropy = xent.token_logprobs(h, lm, target, temperature=0.7, return_entropy=True)
                else:
                    logp, entropy = naive_token_logprobs(h @ lm.T, target, 0.7)
                return -(logp * advantages).mean() - 0.01 * entropy.mean()
        else:
            raise ValueError(impl)

    def step():
        loss = forward()
        loss.backward()
        return loss.detach()

    def release():  # outside the timed region: freeing the previous gradients is not the loss's cost
        for p in params:
            p.grad = None

    step.release = release
    return step, lambda: [p.grad for p in params]


STATISTICS = TokenStatistics._fields  # every statistic of return_stats=
STATS_IMPLS = ("xent-stats", "naive-stats")  # ce workloads: the loss and every statistic of return_stats
RL_IMPLS = ("xent-rl", "naive-rl")  # linear workloads: token log-probabilities and entropies


def naive_statistics(x: torch.Tensor, y: torch.Tensor):
    """The loss and return_stats' statistics from fp32 log-softmax, as a trainer writes them in torch."""
    logp = x.float().log_softmax(-1)
    loss = F.nll_loss(logp, y)
    with torch.no_grad():
        valid = y != -100
        safe = torch.where(valid, y, 0)
        lse = torch.logsumexp(x.float(), -1)
        logprob = torch.where(valid, logp.gather(1, safe[:, None])[:, 0], 0)
        entropy = -(logp.exp() * logp).sum(-1)
        argmax = x.argmax(-1)
        correct = valid & (argmax == y)
    return loss, (lse, logprob, entropy, argmax, correct)


def naive_token_logprobs(logits: torch.Tensor, y: torch.Tensor, temperature: float):
    """Token log-probabilities and entropies from the materialized logits (TRL/verl's formulation)."""
    logp = (logits.float() / temperature).log_softmax(-1)
    chosen = logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return chosen, entropy


# ----------------------------------------------------------------------------------------------------
# Time


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_interleaved(
    steps: dict[str, Callable],
    repeats: int,
    warmup: int = 1,
    device: str = "cpu",
    on_step: Callable[[], None] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each step, alternating which goes first in every round."""
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    times = {name: [] for name in names}
    for r in range(repeats):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            getattr(steps[name], "release", lambda: None)()
            gc.collect()
            _sync(device)
            t0 = time.perf_counter()
            steps[name]()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
            if on_step:
                on_step()
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


# ----------------------------------------------------------------------------------------------------
# Memory


def status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def peak_growth_of(step: Callable[[], object], device: str) -> tuple[int, bool]:
    """(peak memory growth in bytes while step() runs, whether the measurement's baseline was exact).

    CUDA: max_memory_allocated. CPU: the resident-set high-water mark, reset first where the kernel
    allows it (without a reset, VmHWM may still hold an earlier, higher peak and the growth reads low)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, True
    gc.collect()
    exact = reset_peak()
    base = status_bytes("VmRSS")
    step()
    return status_bytes("VmHWM") - base, exact


def peak_growth_here(w: Workload, impl: str, warm: bool = True) -> dict:
    """Peak memory growth of one forward + backward, measured in *this* process (call it in a fresh one).

    warm: first run one identical step and free it, so that one-time allocations (BLAS packing buffers
    sized by the matmul shapes, torch's lazy initialization: ~10-20 MB around a large matmul, paid by every
    implementation) are not counted. The measurement is then a training step's, not a cold start's.
    """
    step, grads = make_step(w, impl)
    if warm:
        step()
        step.release()
    peak, exact = peak_growth_of(step, w.device)
    grad_bytes = sum(g.numel() * g.element_size() for g in grads() if g is not None)
    return {
        "impl": impl,
        "peak_growth_bytes": peak,
        "grad_bytes": grad_bytes,
        "logits_bytes": w.logits_bytes,
        "peak_reset": exact if not w.device.startswith("cuda") else True,
        "warm": warm,
    }


def peak_growth_fresh(w: Workload, impl: str, threads: int | None = None, warm: bool = True) -> dict:
    """Run peak_growth_here in a new Python process and return its result."""
    spec = json.dumps({"workload": w.__dict__, "impl": impl, "threads": threads, "warm": warm})
    env = dict(os.environ)
    done = subprocess.run([sys.executable, "-m", "xent.bench", spec], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"memory probe failed for {impl}:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _probe_main(spec: str) -> None:
    args = json.loads(spec)
    if args.get("threads"):
        torch.set_num_threads(args["threads"])
    print(json.dumps(peak_growth_here(Workload(**args["workload"]), args["impl"], args.get("warm", True))))


if __name__ == "__main__":
    _probe_main(sys.argv[1])
