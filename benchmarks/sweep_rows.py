"""Sweep of the cross-entropy row kernel's launch shape on a GPU: block size, warps and programs per
multiprocessor (0: one program per row), timed as xent.cross_entropy forward + backward against a device
copy of the same bytes. Prints a markdown table, best first per shape, and the best launch per shape.

    PYTHONPATH=src python benchmarks/sweep_rows.py [--out FILE]

Also times linear_cross_entropy at (8192, 4096, 128256) bf16 under a few memory budgets (the chunk size).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import xent  # noqa: E402
from xent.kernels import triton_rows  # noqa: E402

PAIRS = [(2048, 4), (2048, 8), (4096, 8), (4096, 16), (8192, 8), (8192, 16), (8192, 32), (16384, 16), (16384, 32)]
PER_SM = [0, 1, 2, 4]


def timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def sweep_shape(n: int, v: int, dtype: torch.dtype, repeats: int):
    x = torch.randn(n, v, device="cuda", dtype=dtype).requires_grad_()
    y = torch.randint(0, v, (n,), device="cuda")
    src = torch.empty(n * v * x.element_size(), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t_copy = timed(lambda: dst.copy_(src), repeats)

    def step():
        x.grad = None
        xent.cross_entropy(x, y).backward()

    rows = []
    for block, warps in PAIRS:
        for per_sm in PER_SM:
            triton_rows.LAUNCH_OVERRIDE = (block, warps, per_sm)
            try:
                t = timed(step, repeats)
            except Exception as e:  # noqa: BLE001 (a launch the GPU refuses is reported)
                print(f"{block},{warps},{per_sm}: {type(e).__name__}", flush=True)
                continue
            rows.append((t, block, warps, per_sm))
    triton_rows.LAUNCH_OVERRIDE = None
    t_default = timed(step, repeats)
    rows.sort()
    return t_default, t_copy, rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    lines = [f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}", ""]
    lines += ["| N x V | dtype | block, warps, per SM | ms | % of copy |", "|---|---|---|---|---|"]
    best = []
    for dtype in (torch.bfloat16, torch.float32):
        for n, v in ((8192, 128256), (32768, 32000)):
            name = str(dtype).replace("torch.", "")
            t_default, t_copy, rows = sweep_shape(n, v, dtype, args.repeats)
            lines.append(f"| {n} x {v} | {name} | default | {t_default:.3f} | {100 * t_copy / t_default:.0f}% |")
            for t, block, warps, per_sm in rows[:8]:
                lines.append(f"| {n} x {v} | {name} | {block}, {warps}, {per_sm} | {t:.3f} | {100 * t_copy / t:.0f}% |")
            best.append((n, v, name, rows[0]))
            print("\n".join(lines[-9:]), flush=True)
            torch.cuda.empty_cache()
    lines.append("")
    for n, v, name, (t, block, warps, per_sm) in best:
        lines.append(f"best {n} x {v} {name}: block {block}, warps {warps}, per SM {per_sm}: {t:.3f} ms")
    # linear cross-entropy under a few chunk budgets
    lines += ["", "| linear 8192, 4096, 128256 bf16: memory_budget | ms | TFLOP/s |", "|---|---|---|"]
    n, h, v = 8192, 4096, 128256
    x = torch.randn(n, h, device="cuda", dtype=torch.bfloat16).requires_grad_()
    w = (torch.randn(v, h, device="cuda", dtype=torch.bfloat16) / h**0.5).requires_grad_()
    y = torch.randint(0, v, (n,), device="cuda")
    for budget in (None, 1 << 30, 2 << 30, 4 << 30):

        def lstep(budget=budget):
            x.grad = w.grad = None
            xent.linear_cross_entropy(x, w, y, memory_budget=budget).backward()

        try:
            t = timed(lstep, 5)
            lines.append(f"| {budget} | {t:.2f} | {6 * n * h * v / t / 1e9:.0f} |")
        except Exception as e:  # noqa: BLE001
            lines.append(f"| {budget} | {type(e).__name__} | - |")
        print(lines[-1], flush=True)
    # where linear cross-entropy's time goes (default budget)
    from torch.profiler import ProfilerActivity, profile

    def lstep_default():
        x.grad = w.grad = None
        xent.linear_cross_entropy(x, w, y).backward()

    lstep_default()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        lstep_default()
        torch.cuda.synchronize()
    lines += ["", "```", prof.key_averages().table(sort_by="cuda_time_total", row_limit=14), "```"]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
