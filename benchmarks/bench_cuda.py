"""CUDA benchmarks of the Triton backend: cross-entropy bandwidth and linear cross-entropy time/memory.

cross_entropy, forward + backward, against torch eager, torch.compile and (if installed) Liger Kernel:
time (median of interleaved runs, CUDA-synchronized) and the effective bandwidth, bytes of logits read +
gradient written per second, next to what a device-to-device copy reaches on the same GPU.

linear_cross_entropy, forward + backward (gradients for input and weight), against the naive matmul +
cross_entropy, torch's chunked F.linear_cross_entropy and (if installed) Cut Cross-Entropy and Liger's
fused linear CE: time and peak memory growth (torch.cuda.max_memory_allocated) beyond the inputs.

    python benchmarks/bench_cuda.py                        # on a GPU: the full sizes
    python benchmarks/bench_cuda.py --smoke --device cpu   # tiny sizes through Triton's interpreter

Results go to stdout as markdown tables (benchmarks/RESULTS.md records them with this command).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

import torch
import torch.nn.functional as F


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time(steps: dict, repeats: int, device: str) -> dict:
    """Median seconds per call, interleaved; every step gets one untimed warm-up call first."""
    for step in steps.values():
        step()
    times = {k: [] for k in steps}
    for r in range(repeats):
        for name in (list(steps) if r % 2 == 0 else list(steps)[::-1]):
            _sync(device)
            t0 = time.perf_counter()
            steps[name]()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _peak(step, device: str) -> float:
    """Peak memory growth (bytes) of one call beyond what was allocated before it (CUDA only)."""
    if not device.startswith("cuda"):
        return float("nan")
    _sync(device)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    _sync(device)
    return torch.cuda.max_memory_allocated() - base


def _copy_bandwidth(device: str, nbytes: int) -> float:
    if not device.startswith("cuda"):
        return float("nan")
    a = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    b = torch.empty_like(a)
    t = _time({"copy": lambda: b.copy_(a)}, 10, device)["copy"]
    return 2 * nbytes / t  # read + write


def _ce_steps(n: int, v: int, dtype, device: str) -> dict:
    import xent

    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, v, generator=gen, device=device, dtype=dtype).requires_grad_()
    y = torch.randint(0, v, (n,), generator=gen, device=device)
    impls = {"xent": xent.cross_entropy, "torch eager": F.cross_entropy}
    if device.startswith("cuda"):
        impls["torch.compile"] = torch.compile(F.cross_entropy)
    try:
        from liger_kernel.transformers.functional import liger_cross_entropy

        impls["liger"] = liger_cross_entropy
    except ImportError:
        pass

    def make(fn):
        def step():
            x.grad = None
            fn(x, y).backward()
        return step
    return {name: make(fn) for name, fn in impls.items()}


def _linear_steps(n: int, h: int, v: int, dtype, device: str) -> dict:
    import xent

    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, h, generator=gen, device=device, dtype=dtype).requires_grad_()
    w = (torch.randn(v, h, generator=gen, device=device, dtype=dtype) / h**0.5).requires_grad_()
    y = torch.randint(0, v, (n,), generator=gen, device=device)
    impls = {
        "xent": lambda: xent.linear_cross_entropy(x, w, y),
        "naive matmul + CE": lambda: F.cross_entropy((x @ w.T).float(), y),
        "torch chunked": lambda: F.linear_cross_entropy(x, w, y, options=torch.nn.LinearCrossEntropyOptions()),
    }
    try:
        from cut_cross_entropy import linear_cross_entropy as cce

        impls["cut cross-entropy"] = lambda: cce(x, w, y)
    except ImportError:
        pass
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        impls["liger fused"] = lambda: liger_fused_linear_cross_entropy(x, w, y)
    except ImportError:
        pass

    def make(fn):
        def step():
            x.grad = w.grad = None
            fn().backward()
        return step
    return {name: make(fn) for name, fn in impls.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (a check that the script runs)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    if args.device == "cpu":
        os.environ.setdefault("XENT_BACKEND", "triton")
    ce_sizes = [(16, 512)] if args.smoke else [(8192, 32768), (8192, 128256), (4096, 256000)]
    lin_sizes = [(16, 32, 512)] if args.smoke else [(8192, 2304, 256000), (8192, 4096, 128256)]
    dtypes = [torch.bfloat16] if args.smoke else [torch.bfloat16, torch.float32]
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu (Triton interpreter)"
    print(f"device: {name}; torch {torch.__version__}; medians of {args.repeats} interleaved runs\n")

    copy_bw = _copy_bandwidth(args.device, 4 << 30)
    print(f"device-to-device copy: {copy_bw / 1e9:.0f} GB/s (read + write)\n")
    print("### cross_entropy, forward + backward\n")
    print("| N x V | dtype | implementation | time (ms) | bandwidth (GB/s) | vs copy |")
    print("|---|---|---|---|---|---|")
    for dtype in dtypes:
        for n, v in ce_sizes:
            steps = _ce_steps(n, v, dtype, args.device)
            times = _time(steps, args.repeats, args.device)
            moved = 2 * n * v * torch.finfo(dtype).bits // 8  # logits read once + gradient written once
            for impl, t in times.items():
                bw = moved / t
                print(f"| {n} x {v} | {str(dtype)[6:]} | {impl} | {t * 1e3:.2f} | {bw / 1e9:.0f} | "
                      f"{bw / copy_bw:.0%} |", flush=True)
            del steps
    print("\n### linear_cross_entropy, forward + backward (input and weight gradients)\n")
    print("| N, H, V | dtype | implementation | time (ms) | peak growth (GB) |")
    print("|---|---|---|---|---|")
    for dtype in dtypes:
        for n, h, v in lin_sizes:
            steps = _linear_steps(n, h, v, dtype, args.device)
            times = _time(steps, args.repeats, args.device)
            for impl, t in times.items():
                peak = _peak(steps[impl], args.device)
                print(f"| {n}, {h}, {v} | {str(dtype)[6:]} | {impl} | {t * 1e3:.2f} | {peak / 1e9:.2f} |", flush=True)
            del steps


if __name__ == "__main__":
    main()
