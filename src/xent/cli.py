"""The `xent` command line.

xent bench     time, peak memory and accuracy of xent against torch on this machine (the main job)
xent verify    the worked example of docs/torch-semantics.md: formula vs xent vs torch
"""

from __future__ import annotations

import argparse
import sys

import torch

# ----------------------------------------------------------------------------------------------------
# xent verify: the worked example (docs/torch-semantics.md), computed three ways

EXAMPLE_LOGITS = [[1.5, 2.0, 0.5], [1.0, 0.5, 2.5]]
EXAMPLE_TARGETS = [1, 2]
EXAMPLE_WEIGHTS = [0.7, 0.2, 0.1]
EXAMPLE_ALPHA = 0.1
# torch's value of each example, as the worked example records it.
EXAMPLE_PRINTED = {
    "plain": 0.45524317026138306,
    "weight": 0.5048722624778748,
    "label smoothing": 0.5469098091125488,
    "weight + label smoothing": 0.7722168564796448,
}


def _written_formula(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, alpha: float) -> torch.Tensor:
    """The weight + smoothing formula as the worked example *writes* it: the target's weight w[y_i] scales the
    whole smoothed row, l_i = w[y_i] * (-sum_c y'_ic log p_ic), mean over sum_i w[y_i]. torch instead
    weights each class's term by its own w[c]."""
    from . import reference

    lp = reference.log_softmax(logits.double(), 1)
    c = logits.shape[1]
    smooth = torch.full_like(lp, alpha / c)
    smooth[torch.arange(len(targets)), targets] += 1 - alpha
    w_y = weights.double()[targets]
    return (w_y * -(smooth * lp).sum(1)).sum() / w_y.sum()


def verify(tolerance: float = 1e-6) -> int:
    import torch.nn.functional as F

    import xent

    logits = torch.tensor(EXAMPLE_LOGITS)
    targets = torch.tensor(EXAMPLE_TARGETS)
    weights = torch.tensor(EXAMPLE_WEIGHTS)
    examples = {
        "plain": {},
        "weight": dict(weight=weights),
        "label smoothing": dict(label_smoothing=EXAMPLE_ALPHA),
        "weight + label smoothing": dict(weight=weights, label_smoothing=EXAMPLE_ALPHA),
    }
    print(
        "xent verify: the worked example (2 samples, 3 classes, weights "
        f"{EXAMPLE_WEIGHTS}, label_smoothing {EXAMPLE_ALPHA})\n"
    )
    header = (
        f"{'example':<26}{'formula (float64)':>20}{'xent':>14}{'torch':>14}{'as written':>14}"
        f"{'max|grad diff|':>16}  result"
    )
    print(header)
    print("-" * len(header))
    failures = 0
    for name, kwargs in examples.items():
        formula = float(xent.reference.cross_entropy(logits, targets, **kwargs))
        x_ours = logits.clone().requires_grad_()
        x_torch = logits.clone().requires_grad_()
        ours = xent.cross_entropy(x_ours, targets, **kwargs)
        theirs = F.cross_entropy(x_torch, targets, **kwargs)
        ours.backward()
        theirs.backward()
        ours, theirs = ours.detach(), theirs.detach()
        grad_diff = float((x_ours.grad - x_torch.grad).abs().max())
        ok = (
            abs(float(ours) - formula) <= tolerance
            and abs(float(theirs) - formula) <= tolerance
            and abs(EXAMPLE_PRINTED[name] - formula) <= tolerance
            and grad_diff <= tolerance
        )
        failures += not ok
        print(
            f"{name:<26}{formula:>20.12f}{float(ours):>14.8f}{float(theirs):>14.8f}"
            f"{EXAMPLE_PRINTED[name]:>14.8f}{grad_diff:>16.2e}  {'PASS' if ok else 'FAIL'}"
        )

    printed = float(_written_formula(logits, targets, weights, EXAMPLE_ALPHA))
    per_class = float(xent.reference.cross_entropy(logits, targets, weight=weights, label_smoothing=EXAMPLE_ALPHA))
    torch_both = float(F.cross_entropy(logits, targets, weight=weights, label_smoothing=EXAMPLE_ALPHA))
    print("\nweight + label smoothing, the two ways of writing it:")
    print(
        f"  the formula as written       l_i = w[y_i] * (-sum_c y'_ic log p_ic)   = {printed:.10f}  "
        f"{'agrees' if abs(printed - torch_both) <= tolerance else 'DISAGREES'} with torch ({torch_both:.10f})"
    )
    print(
        f"  per-class form              l_i = -sum_c w[c] * y'_ic * log p_ic     = {per_class:.10f}  "
        f"{'agrees' if abs(per_class - torch_both) <= tolerance else 'DISAGREES'} with torch"
    )
    # The printed formula is expected to be wrong; if it ever matched, our understanding would be.
    failures += abs(printed - torch_both) <= tolerance or abs(per_class - torch_both) > tolerance
    print(f"\n{'all checks passed' if not failures else f'{failures} check(s) FAILED'}")
    return 1 if failures else 0


# ----------------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------------
# xent bench: xent against torch on the user's machine


class Progress:
    """A one-line progress bar on stderr (redrawn in place on a terminal, one line per step otherwise)."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.done, self.enabled = total, 0, enabled
        self.tty = sys.stderr.isatty()

    def step(self, label: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        width = 30
        filled = width * self.done // max(1, self.total)
        line = f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {label}"
        sys.stderr.write(("\r" + line.ljust(100)) if self.tty else line + "\n")
        if self.tty and self.done == self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _max_diff(ours: list, theirs: list) -> float:
    return max(
        (
            float((a.double() - b.double()).abs().max())
            for a, b in zip(ours, theirs)
            if a is not None and b is not None and a.numel()
        ),
        default=0.0,
    )


def _bench_workload(w, impls: tuple, repeats: int, progress: Progress, memory: bool) -> list[dict]:
    from .bench import make_step, median, peak_growth_fresh, time_interleaved

    baseline = impls[-1] if w.kind == "ce" else "naive"
    steps, results = {}, {}
    for impl in impls:
        step, grads = make_step(w, impl)
        loss = step()
        results[impl] = (loss, [g.detach().clone() for g in grads()])
        step.release()
        steps[impl] = step
    times = time_interleaved(
        steps, repeats, warmup=0, device=w.device, on_step=lambda: progress.step(f"timing {w.label()}")
    )
    del steps
    rows = []
    for impl in impls:
        mem = peak_growth_fresh(w, impl) if memory else None
        if memory:
            progress.step(f"memory {impl}")
        extra = mem["peak_growth_bytes"] - (mem["grad_bytes"] if w.kind == "linear" else 0) if mem else None
        rows.append(
            dict(
                workload=w.label(),
                impl=impl,
                time=median(times[impl]),
                time_ratio=median(times[impl]) / median(times[baseline]),
                peak_mb=mem["peak_growth_bytes"] / 2**20 if mem else float("nan"),
                mem_ratio=extra / w.logits_bytes if mem else float("nan"),
                loss_diff=abs(float(results[impl][0]) - float(results[baseline][0])),
                grad_diff=_max_diff(results[impl][1], results[baseline][1]),
            )
        )
    return rows


def bench(args) -> int:
    import warnings

    from .bench import CE_IMPLS, LINEAR_IMPLS, Workload

    warnings.filterwarnings("ignore", message=".*LinearCrossEntropy.*")
    if args.threads:
        torch.set_num_threads(args.threads)
    workloads = []
    if args.what in ("all", "ce"):
        workloads.append((Workload("ce", args.tokens, args.vocab, dtype=args.dtype, device=args.device), CE_IMPLS))
    if args.what in ("all", "linear"):
        workloads.append(
            (
                Workload("linear", args.tokens, args.vocab, hidden=args.hidden, dtype=args.dtype, device=args.device),
                LINEAR_IMPLS,
            )
        )
    memory = not args.no_memory
    total = sum(args.repeats * len(impls) + (len(impls) if memory else 0) for _, impls in workloads)
    progress = Progress(total, enabled=not args.quiet)
    print(
        f"xent bench: torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads; "
        f"medians of {args.repeats} interleaved runs, forward + backward, mean loss"
    )
    rows = []
    for w, impls in workloads:
        rows += _bench_workload(w, impls, args.repeats, progress, memory)
    _print_table(rows)
    if args.plot:
        _plot(args, progress_enabled=not args.quiet)
    return 0


def _print_table(rows: list[dict]) -> None:
    print()
    print("ratio: time over torch's (cross_entropy) or over the naive matmul + cross_entropy (linear).")
    print("x logits: peak memory growth (beyond the returned gradients, for linear) over the full logits' bytes.")
    print("|d loss|, |d grad|: largest difference from that baseline.")
    header = (
        f"  {'impl':<15}{'time (s)':>10}{'ratio':>8}{'peak (MB)':>11}{'x logits':>10}{'|d loss|':>11}{'|d grad|':>11}"
    )
    last = None
    for r in rows:
        if r["workload"] != last:
            print(f"\n{r['workload']}\n{header}")
            last = r["workload"]
        print(
            f"  {r['impl']:<15}{r['time']:>10.3f}{r['time_ratio']:>8.2f}{r['peak_mb']:>11.1f}"
            f"{r['mem_ratio']:>10.3f}{r['loss_diff']:>11.2e}{r['grad_diff']:>11.2e}"
        )


def _plot(args, progress_enabled: bool) -> None:
    """Time and peak memory against vocabulary size, for the workloads --what asks for (a column each)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("xent bench --plot needs matplotlib: pip install -e '.[plot]' from the xent clone") from None
    from .bench import CE_IMPLS, LINEAR_IMPLS, Workload

    vocabs = [int(v) for v in args.plot_vocabs.split(",")]
    kinds = ("ce", "linear") if args.what == "all" else (args.what,)
    impls_of = {"ce": CE_IMPLS, "linear": LINEAR_IMPLS}
    series = {}
    per_impl = args.plot_repeats + (0 if args.no_memory else 1)
    count = len(vocabs) * per_impl * sum(len(impls_of[k]) for k in kinds)
    progress = Progress(count, enabled=progress_enabled)
    for v in vocabs:
        for kind in kinds:
            hidden = args.hidden if kind == "linear" else 0
            w = Workload(kind, args.tokens, v, hidden=hidden, dtype=args.dtype, device=args.device)
            for r in _bench_workload(w, impls_of[kind], args.plot_repeats, progress, memory=not args.no_memory):
                series.setdefault((w.kind, r["impl"]), []).append((v, r["time"], r["peak_mb"]))
    fig, axes = plt.subplots(2, len(kinds), figsize=(5.5 * len(kinds), 8), squeeze=False)
    for col, kind in enumerate(kinds):
        for (k, impl), pts in series.items():
            if k != kind:
                continue
            vs, ts, ms = zip(*pts)
            axes[0, col].plot(vs, ts, marker="o", label=impl)
            axes[1, col].plot(vs, ms, marker="o", label=impl)
        title = "cross_entropy" if kind == "ce" else f"linear_cross_entropy (H={args.hidden})"
        axes[0, col].set_title(f"{title}, N={args.tokens}, {args.dtype}")
        axes[0, col].set_ylabel("forward + backward (s)")
        axes[1, col].set_ylabel("peak memory growth (MB)")
        for ax in axes[:, col]:
            ax.set_xlabel("vocabulary size")
            ax.set_xscale("log", base=2)
            ax.grid(alpha=0.3)
            ax.legend()
    fig.tight_layout()
    fig.savefig(args.plot, dpi=110)
    print(f"\nplot written to {args.plot}")


# ----------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="xent", description="Fused cross-entropy for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_bench = sub.add_parser("bench", help="time and memory of xent against torch on this machine")
    p_bench.add_argument(
        "--what",
        choices=["all", "ce", "linear"],
        default="all",
        help="all: both (default); ce: cross_entropy; linear: linear_cross_entropy",
    )
    p_bench.add_argument("--tokens", type=int, default=1024, help="rows / tokens N (default 1024)")
    p_bench.add_argument("--hidden", type=int, default=512, help="hidden size H of the linear head (default 512)")
    p_bench.add_argument("--vocab", type=int, default=32768, help="classes / vocabulary V (default 32768)")
    p_bench.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "float64"], default="float32")
    p_bench.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="a torch device: cpu, cuda, cuda:1 (default: cuda where there is one, else cpu)",
    )
    p_bench.add_argument("--repeats", type=int, default=5, help="timed rounds per implementation (default 5)")
    p_bench.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p_bench.add_argument("--no-memory", action="store_true", help="skip the fresh-process memory measurements")
    p_bench.add_argument(
        "--plot", metavar="FILE.png", help="also write time and memory against vocabulary size (for --what's losses)"
    )
    p_bench.add_argument("--plot-vocabs", default="8192,16384,32768,65536", help="vocabulary sizes for --plot")
    p_bench.add_argument("--plot-repeats", type=int, default=2)
    p_bench.add_argument("--quiet", action="store_true", help="no progress bar")
    p_verify = sub.add_parser("verify", help="the worked example of docs/torch-semantics.md: formula vs xent vs torch")
    p_verify.add_argument("--tolerance", type=float, default=1e-6)
    args = parser.parse_args(argv)
    if args.command == "verify":
        return verify(args.tolerance)
    if args.command == "bench":
        problem = device_problem(args.device)
        if problem is not None:  # one line, not torch's traceback from deep inside the first allocation
            print(f"xent bench: error: {problem}", file=sys.stderr)
            return 2
        return bench(args)
    return 2


def device_problem(name: str) -> str | None:
    """Why `xent bench --device NAME` cannot run here (one line for the parser's error), or None."""
    try:
        device = torch.device(name)
    except RuntimeError:
        return f"--device {name}: not a torch device (try cpu or cuda)"
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return f"--device {name}: this machine has no CUDA device (torch.cuda.is_available() is False)"
        if device.index is not None and device.index >= torch.cuda.device_count():
            return f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)"
        return None
    return f"--device {name}: xent bench runs on cpu or cuda devices"


if __name__ == "__main__":
    sys.exit(main())
