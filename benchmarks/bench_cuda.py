"""GPU benchmark of xent against torch eager, torch.compile, Liger Kernel and Cut Cross-Entropy: one command.

On the GPU machine (torch >= 2.4 with triton; the .whl folder holds the liger_kernel and cut_cross_entropy
wheels, installed without network; transformers is used if present):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=/tmp/site:src; python benchmarks/bench_cuda.py --out $OUT/bench_cuda.md

Other uses:

    python benchmarks/bench_cuda.py --only ce            # a subset: ce, linear, e2e (comma-separated)
    python benchmarks/bench_cuda.py --no-compile         # without the torch.compile rows (they compile per shape)
    python benchmarks/bench_cuda.py --smoke              # tiny sizes on the GPU (a check that it runs)
    python benchmarks/bench_cuda.py --smoke --device cpu --repeats 1   # CPU, xent through Triton's interpreter

Sections (markdown tables on stdout, and in --out FILE, written as they are produced):

* ce: cross_entropy forward + backward (mean) for bf16 and fp32 at several N x V: median time, bandwidth
  (logits read + gradient written), "% of copy" (a device-to-device copy of the same bytes, timed in the
  same interleaved rounds on a same-size buffer), peak memory growth beyond the inputs and the returned
  gradient (also as a multiple of the logits' bytes). Then xent's option variants (weight,
  label_smoothing, ignore_index, z_loss, softcap, reduction='none', a non-unit upstream) against its plain
  case.
* linear: linear_cross_entropy forward + backward (input and weight gradients), bf16: median time,
  effective TFLOP/s (6 N H V / time) next to a dense bf16 torch.mm (N,H)x(H,V) timed in the same rounds,
  peak growth beyond the returned gradients. Then the weight/input gradients' error against float64 at a
  small shape.
* e2e: forward + backward of a randomly initialised 2-layer Llama-shaped transformers model (vocab 128256)
  on 8 x 2048 tokens: unpatched, xent (xent.integrations.transformers.apply) and Liger's fused linear CE.

Implementations are interleaved (the order alternates every round), each after one untimed warm-up call
and one peak-memory call; times are medians of CUDA-event timings. Whatever the installed torch or a peer
lacks, or a peer call that fails, is skipped with a note; an out-of-memory is reported as OOM.
"""

from __future__ import annotations

import os
import sys

if "--device=cpu" in sys.argv or any(a == "--device" and b == "cpu" for a, b in zip(sys.argv, sys.argv[1:])):
    # before torch/triton/xent are imported: xent's Triton kernels run on CPU through the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("XENT_BACKEND", "triton")

import argparse  # noqa: E402
import gc  # noqa: E402
import importlib.util  # noqa: E402
import inspect  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

if importlib.util.find_spec("xent") is None:  # run from a checkout without an install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

GB = 1e9


# ----------------------------------------------------------------------------------------------- output


class Report:
    """Prints markdown lines to stdout and, with --out, appends them to a file as they come."""

    def __init__(self, path: str | None):
        self.file = None
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.file = open(path, "w")

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        if self.file:
            self.file.write(line + "\n")
            self.file.flush()

    def table(self, header: list[str]) -> None:
        self("| " + " | ".join(header) + " |")
        self("|" + "---|" * len(header))

    def row(self, cells: list) -> None:
        self("| " + " | ".join(str(c) for c in cells) + " |")

    def note(self, text: str) -> None:
        self(f"> note: {text}")


def progress(text: str) -> None:
    print(f"[bench_cuda] {text}", file=sys.stderr, flush=True)


def _ms(t: float) -> str:
    ms = t * 1e3
    return f"{ms:.1f}" if ms >= 100 else f"{ms:.2f}" if ms >= 1 else f"{ms:.3f}"


def _gb(b: float | None) -> str:
    return "n/a" if b is None or math.isnan(b) else f"{b / GB:.2f}"


def _times(b: float | None, ref: float) -> str:
    return "n/a" if b is None or math.isnan(b) else f"{b / ref:.2f}x"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _short(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg[:160]}{'...' if len(msg) > 160 else ''}"


def _pct(x: float) -> str:
    return "nan" if math.isnan(x) else f"{x:.0%}" if x >= 0.01 else f"{x * 100:.2g}%"


def _rate(x: float) -> str:
    return "nan" if math.isnan(x) else f"{x:.0f}" if x >= 10 else f"{x:.1f}" if x >= 1 else f"{x:.2g}"


def _version(dist: str, module: str) -> str:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        pass
    if importlib.util.find_spec(module) is None:
        return "not installed"
    try:
        return str(getattr(__import__(module), "__version__", "unknown version"))
    except Exception as e:  # noqa: BLE001
        return f"not importable ({type(e).__name__})"


# ---------------------------------------------------------------------------------------------- timing


class Case:
    """One implementation's step. `run` is timed; `reset` (untimed, before and after every run) frees what
    the previous run left (gradients) and restores inputs; `returned` gives the bytes of the fresh gradient
    buffers a run hands back (subtracted from its peak memory growth)."""

    def __init__(self, name: str, run, reset=None, returned=None, memory: bool = True):
        self.name = name
        self.run = run
        self.reset = reset or (lambda: None)
        self.returned = returned or (lambda: 0)
        self.memory = memory  # False for references (copy, GEMM) whose peak is not reported


class Result:
    def __init__(self):
        self.times: list[float] = []
        self.peak: float = float("nan")  # bytes of growth beyond the inputs and the returned gradients
        self.error: str | None = None

    @property
    def time(self) -> float:
        return statistics.median(self.times) if self.times else float("nan")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _cleanup(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def _timed(fn, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _fail(case: Case, res: Result, e: BaseException, device: str) -> None:
    oom = isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()
    res.error = "OOM" if oom else f"failed ({_short(e)})"
    try:
        case.reset()
    except Exception:
        pass
    _cleanup(device)
    progress(f"  {case.name}: {res.error}")


def measure(cases: list[Case], repeats: int, device: str) -> dict[str, Result]:
    """Warm-up call, then one peak-memory call per case, then `repeats` interleaved timed rounds."""
    results = {c.name: Result() for c in cases}
    live = []
    for c in cases:
        try:
            c.reset()
            c.run()
            _sync(device)
            c.reset()
            live.append(c)
        except Exception as e:  # noqa: BLE001 (a peer's failure is reported, not fatal)
            _fail(c, results[c.name], e, device)
    if device.startswith("cuda"):
        for c in list(live):
            try:
                c.reset()
                _cleanup(device)
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                c.run()
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated() - base
                results[c.name].peak = peak - c.returned() if c.memory else float("nan")
                c.reset()
            except Exception as e:  # noqa: BLE001
                _fail(c, results[c.name], e, device)
                live.remove(c)
    for r in range(repeats):
        for c in live if r % 2 == 0 else live[::-1]:
            if results[c.name].error:
                continue
            try:
                c.reset()
                results[c.name].times.append(_timed(c.run, device))
                c.reset()
            except Exception as e:  # noqa: BLE001
                _fail(c, results[c.name], e, device)
    return results


def _fresh_grad_bytes(*tensors) -> int:
    """Bytes of the tensors' .grad buffers that are new allocations (not the tensor's own storage, which
    Liger's cross-entropy reuses for the gradient)."""
    total = 0
    for t in tensors:
        g = t.grad
        if g is not None and g.untyped_storage().data_ptr() != t.untyped_storage().data_ptr():
            total += g.numel() * g.element_size()
    return total


def _configure_dynamo() -> None:
    try:
        import torch._dynamo

        for name in (
            "cache_size_limit",
            "recompile_limit",
            "accumulated_cache_size_limit",
            "accumulated_recompile_limit",
        ):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 256))
    except Exception:
        pass


def _dynamo_reset() -> None:
    try:
        import torch._dynamo

        torch._dynamo.reset()
    except Exception:
        pass


# ------------------------------------------------------------------------------------------------- peers


class Peers:
    """Optional implementations, each import guarded; `notes` says what was skipped and why."""

    def __init__(self, device: str, use_compile: bool):
        self.notes: list[str] = []
        self.compile = use_compile
        if not use_compile:
            self.notes.append("torch.compile skipped (--no-compile, or --device cpu)")
        self.liger_ce = self.liger_flce = self.cce = None
        try:
            from liger_kernel.transformers.functional import liger_cross_entropy, liger_fused_linear_cross_entropy

            self.liger_ce, self.liger_flce = liger_cross_entropy, liger_fused_linear_cross_entropy
        except Exception as e:  # noqa: BLE001 (ImportError, or a failure inside the package)
            self.notes.append(f"Liger Kernel skipped: {_short(e)}")
        try:
            from cut_cross_entropy import linear_cross_entropy as cce

            self.cce = cce
        except Exception as e:  # noqa: BLE001
            self.notes.append(f"Cut Cross-Entropy skipped: {_short(e)}")
        self.torch_chunked = hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")
        if not self.torch_chunked:
            self.notes.append(
                f"torch chunked F.linear_cross_entropy skipped: torch {torch.__version__} lacks "
                f"F.linear_cross_entropy / torch.nn.LinearCrossEntropyOptions (torch >= 2.13)"
            )
        if device == "cpu":
            self.liger_ce = self.liger_flce = self.cce = None  # Triton kernels for CUDA only


def _whole_row(fn, columns: int):
    """fn with the Triton kernel's read-once launch switched on for rows of up to `columns` columns."""
    from xent.kernels import triton_rows

    def run(*args):
        before, triton_rows.WHOLE_ROW_MAX_COLUMNS = triton_rows.WHOLE_ROW_MAX_COLUMNS, columns
        try:
            return fn(*args)
        finally:
            triton_rows.WHOLE_ROW_MAX_COLUMNS = before

    return run


def _ce(x, y):
    return F.cross_entropy(x, y)


def _naive_linear_ce(x, w, y):
    return F.cross_entropy((x @ w.T).float(), y)  # as transformers: logits upcast to fp32 for the loss


def _naive_linear_ce_bf16(x, w, y):
    return F.cross_entropy(x @ w.T, y)  # loss computed on the bf16 logits


def _torch_chunked(x, w, y):
    return F.linear_cross_entropy(x, w, y, options=torch.nn.LinearCrossEntropyOptions())


def linear_impls(peers: Peers, precision: bool = False) -> dict:
    import xent

    impls = {
        "xent": lambda x, w, y: xent.linear_cross_entropy(x, w, y),
        "naive matmul + CE (fp32 logits)": _naive_linear_ce,
    }
    if not precision:  # the lean memory plan (vocabulary slabs), which 'auto' does not pick on a GPU unmeasured
        impls["xent memory_mode='lean'"] = lambda x, w, y: xent.linear_cross_entropy(x, w, y, memory_mode="lean")
    # fp32 logits (the RL functions' default; docs/precision.md): what mm(out_dtype=fp32) and the fp32
    # workspace cost against the bf16 workspace, unmeasured on a GPU so far
    impls["xent logits_dtype=fp32"] = lambda x, w, y: xent.linear_cross_entropy(x, w, y, logits_dtype=torch.float32)
    if precision:
        impls["naive matmul + CE (bf16 logits)"] = _naive_linear_ce_bf16
    elif peers.compile:
        impls["torch.compile(naive matmul + CE)"] = torch.compile(_naive_linear_ce, dynamic=False)
    if peers.torch_chunked:
        impls["torch chunked F.linear_cross_entropy"] = _torch_chunked
    if peers.cce is not None:
        impls["cut cross-entropy"] = lambda x, w, y: peers.cce(x, w, y)
    if peers.liger_flce is not None:
        impls["liger fused linear CE"] = lambda x, w, y: peers.liger_flce(x, w, y)
    return impls


# ------------------------------------------------------------------------------------------ cross_entropy


def ce_section(report: Report, args, peers: Peers) -> None:
    import xent

    device = args.device
    if args.smoke:
        sizes = {torch.bfloat16: [(16, 512)], torch.float32: [(16, 512)]}
    else:
        full = [(8192, 32000), (8192, 128256), (32768, 32000), (16384, 151936), (4096, 256000)]
        if args.quick:
            full = [(8192, 128256), (32768, 32000)]
        sizes = {torch.bfloat16: full, torch.float32: [s for s in full if s != (16384, 151936)]}
    report("## cross_entropy, forward + backward (mean)\n")
    report(
        'GB/s counts the logits read once and the gradient written once; "% of copy" is the time of a '
        "device-to-device copy of the same bytes (same-size buffer, same rounds) over this time. Peak "
        "growth: torch.cuda.max_memory_allocated during one step beyond the inputs and the returned "
        "gradient.\n"
    )
    report.table(
        [
            "N x V",
            "dtype",
            "implementation",
            "time (ms)",
            "GB/s",
            "% of copy",
            "peak growth beyond grad (GB)",
            "x logits",
        ]
    )
    for dtype in (torch.bfloat16, torch.float32):
        for n, v in sizes[dtype]:
            progress(f"ce {n} x {v} {_dtype_name(dtype)}")
            _dynamo_reset()
            gen = torch.Generator(device=device).manual_seed(0)
            x = torch.randn(n, v, generator=gen, device=device, dtype=dtype).requires_grad_()
            y = torch.randint(0, v, (n,), generator=gen, device=device)
            nbytes = x.numel() * x.element_size()
            x0 = x.detach().clone() if peers.liger_ce is not None else None  # Liger overwrites its input
            src = torch.empty(nbytes, dtype=torch.uint8, device=device)
            dst = torch.empty_like(src)

            def reset(restore=False):
                x.grad = None
                if restore:
                    with torch.no_grad():
                        x.copy_(x0)

            def make(name, fn, restore=False):
                return Case(name, lambda: fn(x, y).backward(), lambda: reset(restore), lambda: _fresh_grad_bytes(x))

            impls = {"xent": xent.cross_entropy, "torch eager": F.cross_entropy}
            if v <= 32768:  # the read-once launch (kernels/triton_rows.py WHOLE_ROW), off by default: measured here
                impls["xent read-once rows (WHOLE_ROW)"] = _whole_row(xent.cross_entropy, v)
            if peers.compile:
                impls["torch.compile(F.cross_entropy)"] = torch.compile(_ce, dynamic=False)
            cases = [make(name, fn) for name, fn in impls.items()]
            if peers.liger_ce is not None:
                cases.append(make("liger", peers.liger_ce, restore=True))
            cases.append(Case("device-to-device copy (reference)", lambda: dst.copy_(src), memory=False))
            res = measure(cases, args.repeats, device)
            t_copy = res[cases[-1].name].time
            for c in cases:
                r = res[c.name]
                label = [f"{n} x {v}", _dtype_name(dtype), c.name]
                if r.error:
                    report.row(label + [r.error, "-", "-", "-", "-"])
                    continue
                bw = 2 * nbytes / r.time
                report.row(
                    label
                    + [
                        _ms(r.time),
                        _rate(bw / GB),
                        _pct(t_copy / r.time),
                        _gb(r.peak) if c.memory else "-",
                        _times(r.peak, nbytes) if c.memory else "-",
                    ]
                )
            del cases, impls, res, x, y, x0, src, dst
            _cleanup(device)
    if peers.liger_ce is not None:
        report(
            "\nLiger's cross-entropy writes the gradient into the logits' storage (a returned gradient that "
            "shares the input's storage is not subtracted); the logits are restored between its runs, "
            "untimed."
        )
    report()
    ce_options_section(report, args)


def ce_options_section(report: Report, args) -> None:
    import xent

    device = args.device
    n, v = (16, 512) if args.smoke else (8192, 128256)
    dtype = torch.bfloat16
    progress(f"ce options {n} x {v}")
    report("### xent cross_entropy options, forward + backward\n")
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, v, generator=gen, device=device, dtype=dtype).requires_grad_()
    y = torch.randint(0, v, (n,), generator=gen, device=device)
    weight = (torch.rand(v, generator=gen, device=device) + 0.5).to(dtype)
    y_ignored = y.clone()
    y_ignored[torch.rand(n, generator=gen, device=device) < 0.1] = -100
    upstream = torch.rand(n, generator=gen, device=device).to(dtype)
    nbytes = x.numel() * x.element_size()

    def none_step():
        loss = xent.cross_entropy(x, y, reduction="none")
        loss.backward(upstream.to(loss.dtype))

    variants = {
        "plain (mean)": lambda: xent.cross_entropy(x, y).backward(),
        "weight=": lambda: xent.cross_entropy(x, y, weight=weight).backward(),
        "label_smoothing=0.1": lambda: xent.cross_entropy(x, y, label_smoothing=0.1).backward(),
        "ignore_index (10% ignored)": lambda: xent.cross_entropy(x, y_ignored, ignore_index=-100).backward(),
        "z_loss=1e-4": lambda: xent.cross_entropy(x, y, z_loss=1e-4).backward(),
        "softcap=30": lambda: xent.cross_entropy(x, y, softcap=30.0).backward(),
        "reduction='none', random upstream": none_step,
        "(loss * 2).backward()": lambda: (xent.cross_entropy(x, y) * 2).backward(),
    }

    def reset():
        x.grad = None

    cases = [Case(name, fn, reset, lambda: _fresh_grad_bytes(x)) for name, fn in variants.items()]
    res = measure(cases, args.repeats, device)
    plain = res["plain (mean)"]
    report.table(
        ["N x V", "dtype", "xent variant", "time (ms)", "time / plain", "peak growth beyond grad (GB)", "x logits"]
    )
    for c in cases:
        r = res[c.name]
        label = [f"{n} x {v}", _dtype_name(dtype), c.name]
        if r.error:
            report.row(label + [r.error, "-", "-", "-"])
            continue
        ratio = r.time / plain.time if not plain.error else float("nan")
        report.row(label + [_ms(r.time), f"{ratio:.2f}", _gb(r.peak), _times(r.peak, nbytes)])
    report()
    del cases, res, x, y, weight, y_ignored, upstream
    _cleanup(device)


# ------------------------------------------------------------------------------------ per-token statistics


def _relative_rows(report: Report, label: list, cases: list, args) -> None:
    """Measure `cases` and report each one's time relative to the first's, and its peak growth."""
    res = measure(cases, args.repeats, args.device)
    first = res[cases[0].name].time
    for c in cases:
        r = res[c.name]
        if r.error:
            report.row(label + [c.name, r.error, "-", "-"])
            continue
        report.row(label + [c.name, _ms(r.time), f"{r.time / first:.2f}", _gb(r.peak)])


def stats_section(report: Report, args, peers: Peers) -> None:
    """cross_entropy and linear_cross_entropy with every per-token statistic against without, and against
    the statistics computed from the logits in torch; RL log-probabilities and entropies likewise."""
    import xent
    from xent.bench import STATISTICS, naive_statistics, naive_token_logprobs

    device = args.device
    report("## Per-token statistics and RL log-probabilities, forward + backward\n")
    report(
        "xent with `return_stats=` all six statistics against xent without, and against torch computing the "
        "loss and the same statistics from fp32 log-softmax; `xent.token_logprobs(..., return_entropy=True)` "
        "in a policy-gradient objective (temperature 0.7) against the same objective from the materialized "
        "logits. Peak growth: beyond the inputs and the returned gradients.\n"
    )
    report.table(["problem", "dtype", "implementation", "time (ms)", "time / first row", "peak growth (GB)"])
    dtype = torch.bfloat16
    n, v = (16, 512) if args.smoke else (8192, 128256)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, v, generator=gen, device=device, dtype=dtype).requires_grad_()
    y = torch.randint(0, v, (n,), generator=gen, device=device)

    def reset():
        x.grad = None

    variants = {
        "xent cross_entropy": lambda: xent.cross_entropy(x, y).backward(),
        "xent + all statistics": lambda: xent.cross_entropy(x, y, return_stats=STATISTICS)[0].backward(),
        "torch: loss + statistics from log_softmax": lambda: naive_statistics(x, y)[0].backward(),
    }
    cases = [Case(name, fn, reset, lambda: _fresh_grad_bytes(x)) for name, fn in variants.items()]
    _relative_rows(report, [f"cross_entropy {n} x {v}", _dtype_name(dtype)], cases, args)
    del cases, x, y
    _cleanup(device)

    n, h, v = (16, 32, 512) if args.smoke else (8192, 4096, 128256)
    xh = torch.randn(n, h, generator=gen, device=device, dtype=dtype).requires_grad_()
    w = (torch.randn(v, h, generator=gen, device=device, dtype=dtype) / h**0.5).requires_grad_()
    y = torch.randint(0, v, (n,), generator=gen, device=device)
    advantages = torch.randn(n, generator=gen, device=device)

    def reset_linear():
        xh.grad = w.grad = None

    def rl_objective(logp, entropy):
        return -(logp * advantages).mean() - 0.01 * entropy.mean()

    variants = {
        "xent linear_cross_entropy": lambda: xent.linear_cross_entropy(xh, w, y).backward(),
        "xent + all statistics": lambda: xent.linear_cross_entropy(xh, w, y, return_stats=STATISTICS)[0].backward(),
        "torch: matmul, loss + statistics from log_softmax": lambda: naive_statistics(xh @ w.T, y)[0].backward(),
        "xent token_logprobs + entropy (RL objective)": lambda: rl_objective(
            *xent.token_logprobs(xh, w, y, temperature=0.7, return_entropy=True)
        ).backward(),
        "torch: matmul, log_softmax, gather + entropy (RL objective)": lambda: rl_objective(
            *naive_token_logprobs(xh @ w.T, y, 0.7)
        ).backward(),
    }
    cases = [Case(name, fn, reset_linear, lambda: _fresh_grad_bytes(xh, w)) for name, fn in variants.items()]
    _relative_rows(report, [f"linear {n}, {h}, {v}", _dtype_name(dtype)], cases, args)
    report()
    del cases, xh, w, y
    _cleanup(device)


# ------------------------------------------------------------------------------------ linear_cross_entropy


def linear_section(report: Report, args, peers: Peers) -> None:
    device = args.device
    dtype = torch.bfloat16
    sizes = [(16, 32, 512)] if args.smoke else [(8192, 4096, 128256), (8192, 2304, 256000), (16384, 2048, 128256)]
    if args.quick and not args.smoke:
        sizes = sizes[:2]
    report("## linear_cross_entropy, forward + backward (gradients for input and weight), mean\n")
    report(
        "TFLOP/s = 6 N H V / time (the three GEMMs of forward + backward). The dense GEMM row is one "
        "torch.mm (N,H)x(H,V) in bf16, timed in the same rounds: its TFLOP/s (2 N H V / time) is the "
        'machine\'s matmul rate at this shape, and "% of GEMM" compares each implementation with it. Peak '
        "growth: beyond the inputs and the returned input and weight gradients; x logits = per N*V*2 "
        "bytes.\n"
    )
    report(f"torch.backends.cuda.matmul.allow_tf32 = {torch.backends.cuda.matmul.allow_tf32} (left as is)\n")
    report.table(
        [
            "N, H, V",
            "dtype",
            "implementation",
            "time (ms)",
            "TFLOP/s",
            "% of GEMM",
            "peak growth beyond grads (GB)",
            "x logits",
        ]
    )
    for n, h, v in sizes:
        progress(f"linear {n}, {h}, {v}")
        _dynamo_reset()
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(n, h, generator=gen, device=device, dtype=dtype).requires_grad_()
        w = (torch.randn(v, h, generator=gen, device=device, dtype=dtype) / h**0.5).requires_grad_()
        y = torch.randint(0, v, (n,), generator=gen, device=device)
        logits_bytes = n * v * 2
        gemm_out = torch.empty(n, v, device=device, dtype=dtype)

        def reset():
            x.grad = w.grad = None

        def make(name, fn):
            return Case(name, lambda: fn(x, w, y).backward(), reset, lambda: _fresh_grad_bytes(x, w))

        cases = [make(name, fn) for name, fn in linear_impls(peers).items()]
        cases.append(
            Case(
                "dense bf16 GEMM torch.mm (reference)",
                lambda: torch.mm(x.detach(), w.detach().t(), out=gemm_out),
                memory=False,
            )
        )
        res = measure(cases, args.repeats, device)
        gemm = res[cases[-1].name]
        gemm_tflops = 2 * n * h * v / gemm.time / 1e12 if not gemm.error else float("nan")
        for c in cases:
            r = res[c.name]
            label = [f"{n}, {h}, {v}", _dtype_name(dtype), c.name]
            if r.error:
                report.row(label + [r.error, "-", "-", "-", "-"])
                continue
            if c is cases[-1]:
                report.row(label + [_ms(r.time), _rate(gemm_tflops), "100%", "-", "-"])
                continue
            tflops = 6 * n * h * v / r.time / 1e12
            report.row(
                label
                + [_ms(r.time), _rate(tflops), _pct(tflops / gemm_tflops), _gb(r.peak), _times(r.peak, logits_bytes)]
            )
        del cases, res, x, w, y, gemm_out
        _cleanup(device)
    report()
    precision_section(report, args, peers)


def precision_section(report: Report, args, peers: Peers) -> None:
    device = args.device
    n, h, v = (16, 32, 512) if args.smoke else (2048, 1024, 32000)
    dtype = torch.bfloat16
    progress(f"linear precision {n}, {h}, {v}")
    report("### linear_cross_entropy precision against float64\n")
    report(
        "The same bf16 inputs; the reference computes loss and gradients in float64. Errors: "
        "max |grad - ref| / max |ref| (weight and input gradients), and |loss - ref| with the loss in the "
        "dtype each implementation returns (bf16 for xent and torch on bf16 inputs).\n"
    )
    gen = torch.Generator(device=device).manual_seed(1)
    x0 = torch.randn(n, h, generator=gen, device=device, dtype=dtype)
    w0 = (torch.randn(v, h, generator=gen, device=device, dtype=dtype) / h**0.5).to(dtype)
    y = torch.randint(0, v, (n,), generator=gen, device=device)
    x64 = x0.double().requires_grad_()
    w64 = w0.double().requires_grad_()
    loss64 = F.cross_entropy(x64 @ w64.T, y)
    loss64.backward()
    ref = (loss64.item(), x64.grad, w64.grad)
    del x64, w64, loss64
    report.table(
        [
            "N, H, V",
            "dtype",
            "implementation",
            "weight grad: max err / max ref",
            "input grad: max err / max ref",
            "loss abs err",
        ]
    )

    def rel(g, r):
        return ((g.double() - r).abs().max() / r.abs().max()).item()

    for name, fn in linear_impls(peers, precision=True).items():
        label = [f"{n}, {h}, {v}", _dtype_name(dtype), name]
        x = x0.clone().requires_grad_()
        w = w0.clone().requires_grad_()
        try:
            loss = fn(x, w, y)
            loss.backward()
            report.row(
                label + [f"{rel(w.grad, ref[2]):.2e}", f"{rel(x.grad, ref[1]):.2e}", f"{abs(loss.item() - ref[0]):.2e}"]
            )
        except Exception as e:  # noqa: BLE001
            oom = isinstance(e, torch.cuda.OutOfMemoryError)
            report.row(label + ["OOM" if oom else f"failed ({_short(e)})", "-", "-"])
        del x, w
        _cleanup(device)
    report()


# ------------------------------------------------------------------------------------------- end to end


def _apply_liger(model) -> None:
    """Liger's fused linear CE on this Llama instance only (everything else of Liger off)."""
    from liger_kernel.transformers import apply_liger_kernel_to_llama

    params = inspect.signature(apply_liger_kernel_to_llama).parameters
    if "fused_linear_cross_entropy" not in params:
        raise RuntimeError("apply_liger_kernel_to_llama has no fused_linear_cross_entropy option")
    kwargs = {}
    for name, p in params.items():
        if name == "fused_linear_cross_entropy":
            kwargs[name] = True
        elif name == "model":
            kwargs[name] = model
        elif isinstance(p.default, bool):
            kwargs[name] = False
    cls = type(model)
    before = cls.__dict__.get("forward")
    apply_liger_kernel_to_llama(**kwargs)
    after = cls.__dict__.get("forward")
    if after is not before:  # an older Liger patches the class (every instance): keep it to this one
        if before is None:
            delattr(cls, "forward")
        else:
            cls.forward = before
        model.forward = types.MethodType(after, model)
    if "forward" not in vars(model):
        raise RuntimeError("apply_liger_kernel_to_llama did not replace the model's forward")


def e2e_section(report: Report, args) -> None:
    device = args.device
    report("## End to end: transformers Llama-shaped model, forward + backward (no optimizer)\n")
    try:
        import transformers
        from transformers import LlamaConfig, LlamaForCausalLM
    except Exception as e:  # noqa: BLE001
        report.note(f"skipped: transformers is not importable ({_short(e)})\n")
        return
    import xent.integrations.transformers as xent_hf

    if args.smoke:
        shape = dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            vocab_size=512,
        )
        batch, seq = 2, 32
    else:
        shape = dict(
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=2,
            num_attention_heads=16,
            num_key_value_heads=16,
            vocab_size=128256,
        )
        batch, seq = 8, 2048
    dtype = torch.bfloat16
    config = LlamaConfig(**shape, max_position_embeddings=max(seq, 2048), use_cache=False)
    desc = (
        f"{shape['num_hidden_layers']} layers, hidden {shape['hidden_size']}, intermediate "
        f"{shape['intermediate_size']}, {shape['num_attention_heads']} heads, vocab {shape['vocab_size']}"
    )
    report(
        f"LlamaConfig({desc}), {_dtype_name(dtype)}, randomly initialised (same seed for every "
        f"variant), transformers {transformers.__version__}; model.train(), labels = input_ids. Peak "
        f"growth: beyond the parameters, including their gradients.\n"
    )
    progress(f"e2e {desc}, {batch} x {seq}")

    def build():
        torch.manual_seed(0)
        with torch.device(device):
            model = LlamaForCausalLM(config)
        return model.to(dtype).train()

    gen = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, shape["vocab_size"], (batch, seq), generator=gen, device=device)
    models: dict[str, object] = {}
    notes = []
    try:
        models["transformers (unpatched)"] = build()
        models["xent (xent_hf.apply)"] = xent_hf.apply(build())
    except Exception as e:  # noqa: BLE001
        report.note(f"skipped: could not build the model ({_short(e)})\n")
        return
    if device == "cpu":
        notes.append("Liger skipped on CPU")
    else:
        try:
            models["liger (fused linear CE)"] = build()
            _apply_liger(models["liger (fused linear CE)"])
        except Exception as e:  # noqa: BLE001
            models.pop("liger (fused linear CE)", None)
            notes.append(f"Liger skipped: {_short(e)}")
            _cleanup(device)
    losses = {}

    def make(name, model):
        def run():
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss  # outputs dropped, as Trainer does
            loss.backward()
            losses[name] = loss.detach()

        return Case(name, run, lambda: model.zero_grad(set_to_none=True))

    cases = [make(name, m) for name, m in models.items()]
    res = measure(cases, args.repeats, device)
    param_grad_bytes = sum(p.numel() * p.element_size() for p in next(iter(models.values())).parameters())
    report.table(["model", "tokens", "implementation", "step time (ms)", "tokens/s", "peak growth (GB)", "loss"])
    for c in cases:
        r = res[c.name]
        label = ["Llama-shaped", f"{batch} x {seq}", c.name]
        if r.error:
            report.row(label + [r.error, "-", "-", "-"])
            continue
        loss = losses.get(c.name)
        report.row(
            label
            + [
                _ms(r.time),
                f"{batch * seq / r.time:,.0f}",
                _gb(r.peak),
                f"{loss.float().item():.4f}" if loss is not None else "-",
            ]
        )
    report()
    for note in notes:
        report.note(note)
    report(f"\n(parameter gradients, included in every peak growth: {param_grad_bytes / GB:.2f} GB)\n")
    del cases, res, models, losses, ids
    _cleanup(device)


# ------------------------------------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--repeats", type=int, default=20, help="timed rounds per size (median reported)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (a check that the script runs)")
    ap.add_argument("--only", default="ce,linear,e2e,stats", help="comma-separated subset of ce, linear, e2e, stats")
    ap.add_argument("--quick", action="store_true", help="fewer sizes (a lease's worth: ce 2 shapes, linear 2)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile comparisons")
    ap.add_argument("--out", default=None, help="also write the markdown to this file")
    args = ap.parse_args()
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(sections) - {"ce", "linear", "e2e", "stats"}
    if unknown:
        ap.error(f"--only takes ce, linear, e2e, stats (got {', '.join(sorted(unknown))})")
    device = args.device
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # in case main() is called without the module guard
        os.environ.setdefault("XENT_BACKEND", "triton")
    elif device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("CUDA is not available here; use --smoke --device cpu for a CPU check")
    warnings.filterwarnings("ignore")
    import xent  # noqa: F401 (after TRITON_INTERPRET is set)

    report = Report(args.out)
    use_compile = not args.no_compile and device != "cpu"
    if use_compile:
        _configure_dynamo()
    peers = Peers(device, use_compile)
    if device.startswith("cuda"):
        name = f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    else:
        name = f"{device} (xent through Triton's interpreter: TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')})"
    report("# xent GPU benchmark\n")
    report(
        f"device: {name}; torch {torch.__version__}; triton {_version('triton', 'triton')}; "
        f"liger-kernel {_version('liger-kernel', 'liger_kernel')}; "
        f"cut-cross-entropy {_version('cut-cross-entropy', 'cut_cross_entropy')}; "
        f"transformers {_version('transformers', 'transformers')}; "
        f"xent backend {os.environ.get('XENT_BACKEND', 'auto')}; "
        f"medians of {args.repeats} interleaved runs{' (smoke sizes)' if args.smoke else ''}\n"
    )
    for note in peers.notes:
        report.note(note)
    if peers.notes:
        report()
    t_start = time.perf_counter()
    for section in ("ce", "linear", "e2e", "stats"):
        if section not in sections:
            continue
        t0 = time.perf_counter()
        if section == "ce":
            ce_section(report, args, peers)
        elif section == "stats":
            stats_section(report, args, peers)
        elif section == "linear":
            linear_section(report, args, peers)
        else:
            e2e_section(report, args)
        progress(f"{section}: {time.perf_counter() - t0:.0f} s")
    report(f"(total {time.perf_counter() - t_start:.0f} s)")


if __name__ == "__main__":
    main()
