"""Worker processes for test_distributed.py: each rank checks its results against single-process xent/torch.

A scenario is a sequence of checks (`with check(name):` around each sub-case: one set of options, one
layout, one section). Each rank records every check's outcome, "ok" or what failed, in
rank{r}.json in the result directory, rewritten after every check, so that one failing check does not
hide the others and a rank that hangs or dies still leaves what it had done.

Keeping the ranks in step: the vocab-parallel calls are collectives, so a rank may only leave a check
early where its peers do too. Hence the assertions inside a check are soft: `_close`, `_same_statistics`
and `_require` record a failure and let the check go on, so every rank makes the same calls whatever
the values. Only an exception (from the code under test, or a hard failure such as `_expect`'s missing
exception) ends a check early. After each check the ranks compare, on a process group of their own,
how the check ended: if some ranks raised and others did not (or raised elsewhere), their collectives
may no longer pair, so every rank stops the scenario there (recorded as "stopped") instead of hanging
in or mixing up the next check's collectives.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import json
import math
import os
import sys
import traceback

import torch
import torch.distributed as dist
import torch.nn.functional as F

import xent
from xent import TokenStatistics
from xent.bench import STATISTICS
from xent.distributed import (
    vocab_parallel_cross_entropy,
    vocab_parallel_linear_cross_entropy,
    vocab_parallel_linear_token_logprobs,
    vocab_parallel_token_logprobs,
)
from xent.ops import vocab_parallel as vp_ops
from xent.problems import LinearProblem, Options

# The keys of a rank's result file besides its checks (the pytest side reads them).
RUNNING = "running"  # a check's outcome while it runs: what a hang or a crash leaves behind
OUTSIDE = "(outside any check)"  # an exception raised between checks, which ends the scenario


class _Stopped(Exception):
    """Raised at the end of a check after which the ranks are no longer known to be in step."""


class _Recorder:
    """This rank's outcomes: {check name: "ok" | RUNNING | the failures' text}, written after each check."""

    def __init__(self, rank: int, world: int, path: str, sync_group) -> None:
        self.rank, self.world, self.path, self.sync_group = rank, world, path, sync_group
        self.checks: dict[str, str] = {}
        self.stopped: str | None = None
        self.finished = False
        self.failures: list[str] | None = None  # the running check's soft failures; None between checks

    def write(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"checks": self.checks, "stopped": self.stopped, "finished": self.finished}, f, indent=1)
        os.replace(tmp, self.path)

    @contextlib.contextmanager
    def check(self, name: str):
        if self.failures is not None:
            raise RuntimeError(f"check {name!r} nested in another check")
        base, n = name, 1
        while name in self.checks:  # the same name twice (a loop over repeated options): number them
            n += 1
            name = f"{base} #{n}"
        self.checks[name] = RUNNING
        self.failures = []
        self.write()
        ended = None  # how the check ended early, if it did: the exception's type and where it was raised
        try:
            yield
        except Exception as e:  # noqa: BLE001 - recorded; the ranks then decide together whether to go on
            self.failures.append(traceback.format_exc())
            ended = f"{type(e).__name__} at {_worker_line(e.__traceback__)}"
        failures, self.failures = self.failures, None
        self.checks[name] = "\n".join(failures) if failures else "ok"
        endings: list = [None] * self.world
        try:
            dist.all_gather_object(endings, ended, group=self.sync_group)
        except Exception:  # noqa: BLE001 - a peer died or never reached this point
            self.checks[name] += f"\nthe ranks could not compare how this check ended:\n{traceback.format_exc()}"
            self.stopped = f"after check {name!r}: the ranks could not compare how it ended"
            self.write()
            raise _Stopped(self.stopped) from None
        self.write()
        if any(endings) and len(set(endings)) > 1:
            raised = ", ".join(f"rank {r}: {e or 'no exception'}" for r, e in enumerate(endings))
            self.stopped = (
                f"after check {name!r}: the ranks ended it differently ({raised}), so they may be out of step"
            )
            raise _Stopped(self.stopped)

    def fail_softly(self) -> None:
        """Record the AssertionError being handled in the running check (re-raise it outside any check)."""
        if self.failures is None:
            raise
        stack = traceback.extract_stack()
        names = [frame.name for frame in stack]
        # from the scenario's frame to the one that called _close / _require
        first = names.index("_run_scenario") + 1 if "_run_scenario" in names else 0
        last = min((i for i, name in enumerate(names) if name in ("_close", "_require")), default=len(stack))
        self.failures.append(
            "Traceback (the check went on):\n"
            + "".join(traceback.format_list(stack[first:last]))
            + "".join(traceback.format_exception_only(*sys.exc_info()[:2]))
        )


_RECORDER: _Recorder | None = None


def _worker_line(tb) -> str:
    """Where in this file an exception came from (its innermost frame here): to tell whether every rank
    raised at the same point."""
    line = "?"
    for frame, lineno in traceback.walk_tb(tb):
        if frame.f_code.co_filename == __file__:
            line = f"line {lineno}"
    return line


def check(name: str):
    """`with check(name):` runs one check of the scenario and records its outcome on this rank."""
    return _RECORDER.check(name)


@contextlib.contextmanager
def _soft():
    try:
        yield
    except AssertionError:
        if _RECORDER is None:
            raise
        _RECORDER.fail_softly()


def _require(condition, what=None) -> None:
    """`assert condition, what`, recorded in the running check without ending it."""
    with _soft():
        assert condition, what


def _close(a, b, what, rtol=1e-9, atol=1e-11):
    with _soft():
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"{what}: {m}")


def _same_statistics(ours, expected, what, shape=None, rtol=1e-9, atol=1e-11):
    """Every statistic `ours` holds equals `expected`'s (reshaped to `shape`): floats within tolerance,
    argmax and correct exactly."""
    for name in STATISTICS:
        a, b = getattr(ours, name), getattr(expected, name)
        _require((a is None) == (b is None), (what, name))
        if a is None:
            continue
        b = b.reshape(shape) if shape is not None else b
        if a.dtype.is_floating_point:
            _close(a, b, f"{what}: {name}", rtol=rtol, atol=atol)
        else:
            _require(a.dtype == b.dtype and torch.equal(a, b), (what, name, a, b))


def run(rank: int, world: int, rendezvous: str, sizes: list[int], scenario: str, result_dir: str) -> None:
    global _RECORDER
    dist.init_process_group(
        "gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    # the ranks compare how each check ended on a group of their own, whose collectives pair whatever
    # state the checks left the default group's in
    sync_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=60))
    recorder = _RECORDER = _Recorder(rank, world, os.path.join(result_dir, f"rank{rank}.json"), sync_group)
    recorder.write()
    barrier_group = None
    try:
        _run_scenario(scenario, rank, world, sizes)
        recorder.finished = True
        barrier_group = dist.group.WORLD
    except _Stopped:
        barrier_group = sync_group  # every rank stopped after the same check, but not in step on WORLD
    except Exception:  # noqa: BLE001 - reported to the parent test through the result file
        recorder.checks[OUTSIDE] = traceback.format_exc()
    recorder.write()
    _shut_down(barrier_group)


def _run_scenario(scenario: str, rank: int, world: int, sizes: list[int]) -> None:
    SCENARIOS[scenario](rank, world, sizes)


def _shut_down(barrier_group) -> None:
    """Leave without tearing the interpreter down around gloo.

    A rank that has finished in step waits for the others (so none closes its connections while a peer is
    still in a collective), then destroys the process group and leaves through os._exit. Interpreter
    finalisation would free tensors that gloo's worker threads (and un-waited DTensor collectives) still
    hold, and that can abort the process with "terminate called without an active exception" (SIGABRT)
    after every check has passed, which is what one CI run saw. The outcomes are already in the result
    file, so the exit status carries nothing else. A rank whose scenario raised outside its checks skips
    the barrier (`barrier_group` None): its peers may be stuck in a collective it never joined, and the
    barrier would pair with that; ranks that stopped together after a check meet on the group they
    compared on, not on the default group, whose collectives may be out of step.
    """
    try:
        if barrier_group is not None:
            dist.barrier(group=barrier_group)
        dist.destroy_process_group()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _layout(rank, sizes, reverse: bool):
    """(start, size) of this rank's block; `reverse` puts rank 0's block last (not rank order)."""
    order = list(range(len(sizes)))[::-1] if reverse else list(range(len(sizes)))
    starts, pos = {}, 0
    for r in order:
        starts[r] = pos
        pos += sizes[r]
    return starts[rank], sizes[rank]


OPTIONS = [
    dict(reduction="mean"),
    dict(reduction="sum", label_smoothing=0.3),
    dict(reduction="none", weight=True),
    dict(reduction="mean", weight=True, label_smoothing=0.25, ignore_index=3),
    dict(reduction="mean", z_loss=0.01, label_smoothing=0.1),
    dict(reduction="sum", weight=True, ignore_index=-100, all_ignored=True),
]


def _case(sizes, options, seed, lead=(6,)):
    gen = torch.Generator().manual_seed(seed)
    c = sum(sizes)
    kw = dict(options)
    all_ignored = kw.pop("all_ignored", False)
    if kw.pop("weight", False):
        kw["weight"] = torch.rand(c, generator=gen, dtype=torch.float64) + 0.1
    ii = kw.setdefault("ignore_index", -100)
    target = torch.randint(0, c, lead, generator=gen)
    target.view(-1)[::3] = ii
    if all_ignored:
        target.fill_(ii)
    # make sure some targets land in the smallest block
    small = min(range(len(sizes)), key=lambda r: sizes[r])
    return gen, c, kw, target, small


def _logits(rank, world, sizes):
    for (opt_i, options), reverse, given_start, lead in itertools.product(
        enumerate(OPTIONS), (False, True), (True, False), ((6,), (2, 3))
    ):
        if reverse and not given_start:
            continue  # without vocab_start the blocks follow rank order
        with check(f"options={opt_i} reverse={reverse} vocab_start={given_start} lead={lead}"):
            gen, c, kw, target, _ = _case(sizes, options, seed=100 + opt_i, lead=lead)
            full = (torch.randn(*lead, c, generator=gen, dtype=torch.float64) * 3).requires_grad_()
            start, size = _layout(rank, sizes, reverse)
            local = full.detach()[..., start : start + size].clone().requires_grad_()
            ours = vocab_parallel_cross_entropy(local, target, vocab_start=start if given_start else None, **kw)
            expected = xent.cross_entropy(full.reshape(-1, c), target.reshape(-1), **kw)
            if kw["reduction"] == "none":
                expected = expected.reshape(lead)
            _close(ours, expected, f"loss {options} lead={lead} reverse={reverse}")
            if "z_loss" not in kw:
                torch_kw = {k: v for k, v in kw.items()}
                theirs = F.cross_entropy(full.reshape(-1, c), target.reshape(-1), **torch_kw)
                _close(ours.reshape(-1) if kw["reduction"] == "none" else ours, theirs, f"loss vs torch {options}")
            up = torch.randn(ours.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
            (g_local,) = torch.autograd.grad(ours, local, up)
            (g_full,) = torch.autograd.grad(expected, full, up)
            _close(g_local, g_full[..., start : start + size], f"grad {options} lead={lead} reverse={reverse}")
            # the per-token statistics from the one exchange: the single-process ones, on every rank; one row
            # whose largest logit is tied across the blocks (the first column wins), one all -inf but for its
            # last class, one with a -inf block
            names = STATISTICS if opt_i % 2 else ("correct", "entropy")
            z = full.detach().clone()
            rows = z.view(-1, c)
            rows[0] = 1.0
            rows[1, :-1] = -math.inf
            rows[2, : c // 2] = -math.inf
            local_z = z[..., start : start + size]
            local_stats = vocab_parallel_cross_entropy(
                local_z, target, vocab_start=start if given_start else None, return_stats=names, **kw
            )[1]
            full_stats = xent.cross_entropy(rows, target.reshape(-1), return_stats=names, **kw)[1]
            _same_statistics(local_stats, full_stats, f"stats {options}", lead)
    # a vocabulary masked with -inf (padding at its end, and one row's first half): some ranks' blocks hold
    # no mass for some rows; loss and gradient as torch's (a block's NaN sum exp(-inf - -inf) once made the
    # merged lse NaN)
    gen = torch.Generator().manual_seed(11)
    c = sum(sizes)
    target = torch.tensor([0, c // 2, 1, 2, -100])
    start, size = sum(sizes[:rank]), sizes[rank]
    for dtype, tol in ((torch.float64, {}), (torch.float32, dict(rtol=1e-5, atol=1e-6))):  # fp32: Triton's too
        full = torch.randn(5, c, generator=gen, dtype=dtype)
        full[:, c - c // 3 :] = -math.inf
        full[1, : c // 2] = -math.inf
        for kw in (dict(), dict(reduction="none", weight=torch.rand(c, generator=gen, dtype=dtype))):
            with check(f"masked vocabulary {dtype} {sorted(kw)}"):
                local = full[:, start : start + size].clone().requires_grad_()
                ref_full = full.clone().requires_grad_()
                ours = vocab_parallel_cross_entropy(local, target, **kw)
                expected = F.cross_entropy(ref_full, target, **kw)
                _close(ours, expected, f"masked vocabulary {dtype} {kw}", **tol)
                up = torch.ones_like(expected) * 1.5
                (g,) = torch.autograd.grad(ours, local, up)
                (ge,) = torch.autograd.grad(expected, ref_full, up)
                _close(g, ge[:, start : start + size], f"masked vocabulary grad {dtype} {kw}", **tol)
                stats = vocab_parallel_cross_entropy(local.detach(), target, return_stats=STATISTICS, **kw)[1]
                expected_stats = xent.cross_entropy(full, target, return_stats=STATISTICS, **kw)[1]
                _same_statistics(stats, expected_stats, f"masked vocabulary stats {dtype}", **tol)
    # float32 logits, the default chunking, many rows
    gen = torch.Generator().manual_seed(5)
    c = sum(sizes)
    with check("float32 logits, default chunking"):
        full = torch.randn(300, c, generator=gen)
        target = torch.randint(0, c, (300,), generator=gen)
        start = sum(sizes[:rank])
        local = full[:, start : start + sizes[rank]].clone().requires_grad_()
        ours = vocab_parallel_cross_entropy(local, target, label_smoothing=0.1)
        ref_full = full.clone().requires_grad_()
        expected = F.cross_entropy(ref_full, target, label_smoothing=0.1)
        _close(ours, expected, "float32 loss", rtol=1e-5, atol=1e-6)
        (g,) = torch.autograd.grad(ours, local)
        (ge,) = torch.autograd.grad(expected, ref_full)
        _close(g, ge[:, start : start + sizes[rank]], "float32 grad", rtol=1e-5, atol=1e-6)
    # the per-call backend choice reaches every rank's block passes; a bad one raises before any collective
    with check("backend per call"):
        again = vocab_parallel_cross_entropy(local, target, label_smoothing=0.1, backend="torch")
        _close(again, expected, "backend='torch' loss", rtol=1e-5, atol=1e-6)
        logprobs = vocab_parallel_token_logprobs(local.detach(), target, backend="torch")
        picked = torch.log_softmax(full, 1).gather(1, target.unsqueeze(1)).squeeze(1)
        _close(logprobs, picked, "backend='torch' logprobs", rtol=1e-5, atol=1e-6)
        _expect(ValueError, "backend", lambda: vocab_parallel_cross_entropy(local, target, backend="cuda"))
    # retain_graph: a second backward recomputes (collectively)
    with check("retain_graph"):
        ours = vocab_parallel_cross_entropy(local, target)
        ours.backward(retain_graph=True)
        first = local.grad.clone()
        ours.backward()
        _close(local.grad, 2 * first, "retain_graph", rtol=1e-5, atol=1e-6)


def _linear(rank, world, sizes):
    hidden = 5
    for opt_i, options in enumerate(OPTIONS):
        for given_start, bias in ((True, True), (False, False)):
            with check(f"options={opt_i} vocab_start={given_start} bias={bias}"):
                gen, c, kw, target, _ = _case(sizes, options, seed=200 + opt_i, lead=(2, 4))
                x = torch.randn(2, 4, hidden, generator=gen, dtype=torch.float64)
                w_full = torch.randn(c, hidden, generator=gen, dtype=torch.float64)
                b_full = torch.randn(c, generator=gen, dtype=torch.float64) if bias else None
                start = sum(sizes[:rank])
                size = sizes[rank]
                xi = x.clone().requires_grad_()
                wi = w_full[start : start + size].clone().requires_grad_()
                bi = b_full[start : start + size].clone().requires_grad_() if bias else None
                ours = vocab_parallel_linear_cross_entropy(
                    xi,
                    wi,
                    target,
                    vocab_start=start if given_start else None,
                    linear_bias=bi,
                    memory_budget=3 * 8 * max(1, size),
                    **kw,
                )
                xr, wr = x.clone().requires_grad_(), w_full.clone().requires_grad_()
                br = b_full.clone().requires_grad_() if bias else None
                expected = xent.linear_cross_entropy(xr, wr, target, linear_bias=br, **kw)
                _close(ours, expected, f"linear loss {options}")
                up = torch.randn(ours.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
                params = [xi, wi] + ([bi] if bias else [])
                ref_params = [xr, wr] + ([br] if bias else [])
                grads = torch.autograd.grad(ours, params, up)
                ref = torch.autograd.grad(expected, ref_params, up)
                _close(grads[0], ref[0], f"linear grad input {options}")  # summed across ranks: the full gradient
                _close(grads[1], ref[1][start : start + size], f"linear grad weight {options}")
                if bias:
                    _close(grads[2], ref[2][start : start + size], f"linear grad bias {options}")
                names = STATISTICS if given_start else ("argmax", "logprob", "entropy")
                _, local_stats = vocab_parallel_linear_cross_entropy(
                    xi, wi, target, linear_bias=bi, memory_budget=3 * 8 * max(1, size), return_stats=names, **kw
                )
                _, full_stats = xent.linear_cross_entropy(
                    x, w_full, target, linear_bias=b_full, return_stats=names, **kw
                )
                _same_statistics(local_stats, full_stats, f"linear stats {options}")
    with check("bf16 ties"):
        _linear_bf16_ties(rank, sizes)


def _linear_bf16_ties(rank, sizes):
    """A bf16 head whose rows' largest logits often tie after rounding: the vocab-parallel argmax is the
    single-process one (the first column among the tied), not decided by unrounded recomputed logits."""
    gen = torch.Generator().manual_seed(17)
    c, start, size = sum(sizes), sum(sizes[:rank]), sizes[rank]
    x = torch.randn(600, 32, generator=gen).abs().bfloat16()
    w = torch.randn(c, 32, generator=gen).bfloat16()
    # the first and the last class (on different ranks) lead every row by far and differ by less than a
    # bf16 step of their logits (~50): ties after rounding, though the last is larger before it
    w[0] = 2.0
    w[c - 1] = 2.0
    w[c - 1, 0] = 2.0 + 2.0**-6
    y = torch.randint(0, c, (600,), generator=gen)
    logits = F.linear(x, w).float()
    _require(int(((logits == logits.amax(1, keepdim=True)).sum(1) > 1).sum()) > 300)  # the case exists
    _, ours = vocab_parallel_linear_cross_entropy(x, w[start : start + size], y, return_stats=("argmax", "correct"))
    _, theirs = xent.linear_cross_entropy(x, w, y, return_stats=("argmax", "correct"))
    _same_statistics(ours, theirs, "bf16 ties")


def _expect(exc_type, fragment, fn):
    try:
        fn()
    except exc_type as e:
        _require(fragment in str(e), (fragment, str(e)))
        return
    raise AssertionError(f"expected {exc_type.__name__} containing {fragment!r}")


def _errors(rank, world, sizes):
    c = sum(sizes)
    start, size = sum(sizes[:rank]), sizes[rank]
    local = torch.randn(4, size, dtype=torch.float64)
    good = torch.tensor([0, 1, c - 1, 2])
    # targets that differ between ranks: caught on every rank, with and without vocab_start
    with check("targets differ"):
        differing = good.clone()
        differing[0] = rank % c
        for vs in (None, start):
            _expect(
                ValueError,
                "targets differ",
                lambda vs=vs: vocab_parallel_cross_entropy(local, differing, vocab_start=vs),
            )
    # a target outside [0, C): IndexError on every rank
    with check("target out of bounds"):
        bad = torch.tensor([0, c, 1, 2])
        for vs in (None, start):
            _expect(
                IndexError,
                f"Target {c} is out of bounds",
                lambda vs=vs: vocab_parallel_cross_entropy(local, bad, vocab_start=vs),
            )
    # class weights of the wrong size
    with check("class weights of the wrong size"):
        _expect(
            RuntimeError,
            f"all {c} classes",
            lambda: vocab_parallel_cross_entropy(local, good, weight=torch.ones(c + 1, dtype=torch.float64)),
        )
        _expect(
            RuntimeError,
            f"all {c} classes",
            lambda: vocab_parallel_cross_entropy(
                local, good, vocab_start=start, weight=torch.ones(c - 1, dtype=torch.float64)
            ),
        )
    # blocks that overlap instead of tiling the vocabulary
    with check("overlapping blocks"):
        _expect(ValueError, "do not tile", lambda: vocab_parallel_cross_entropy(local, good, vocab_start=0))
    # options that differ between ranks (each rank would compute another loss): caught on every rank, and
    # the collectives stay matched (a smoothing term on one rank only does not change the payload's size)
    weights = torch.ones(c, dtype=torch.float64)
    for name, options in [
        ("label_smoothing", dict(label_smoothing=0.1 * rank)),
        ("label_smoothing", dict(label_smoothing=0.1 + 0.05 * rank)),
        ("z_loss", dict(z_loss=1e-3 * rank)),
        ("ignore_index", dict(ignore_index=-100 - rank)),
        ("reduction", dict(reduction="sum" if rank else "mean")),
        ("class weights", dict(weight=weights if rank else None)),
    ]:
        with check(f"every rank must pass the same {name}"):
            for vs in (None, start):
                _expect(
                    ValueError,
                    f"every rank must pass the same {name}",
                    lambda vs=vs, options=options: vocab_parallel_cross_entropy(local, good, vocab_start=vs, **options),
                )
    # statistics that widen the exchange, asked for on some ranks only: caught by vocab_start=None's first
    # gather (with vocab_start the payloads' sizes would differ, as with differing numbers of targets)
    with check("return_stats differ"):
        asked = [None, "entropy", ("argmax", "lse")][rank % 3] if world > 2 else [None, "correct"][rank]
        _expect(
            ValueError,
            "every rank must ask for the same return_stats",
            lambda: vocab_parallel_cross_entropy(local, good, return_stats=asked),
        )
    # calls made in different orders on different ranks (as inductor may order two calls in one compiled
    # graph): the collectives pair a logits call with a linear one; every rank raises instead of mixing
    with check("calls in different orders"):
        hidden = torch.randn(4, 3, dtype=torch.float64)
        head = torch.randn(size, 3, dtype=torch.float64)
        calls = [
            lambda vs: vocab_parallel_cross_entropy(local, good, vocab_start=vs),
            lambda vs: vocab_parallel_linear_cross_entropy(hidden, head, good, vocab_start=vs),
        ]
        for vs in (None, start):
            for call in calls if rank % 2 == 0 else calls[::-1]:
                _expect(RuntimeError, "reached this collective from different calls", lambda call=call, vs=vs: call(vs))
    # still usable afterwards
    with check("still usable afterwards"):
        loss = vocab_parallel_cross_entropy(local, good, vocab_start=start)
        _require(torch.isfinite(loss))


def _tensor_parallel(rank, world, sizes):
    """torch's tensor-parallel API: a ColwiseParallel lm_head's output is the local shard to pass in."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    hidden, vocab = 6, 37  # 37 over 2 or 3 ranks: uneven blocks in rank order, as torch.chunk splits them
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    lm_head = torch.nn.Linear(hidden, vocab, bias=True, dtype=torch.float64)
    reference = torch.nn.Linear(hidden, vocab, bias=True, dtype=torch.float64)
    reference.load_state_dict(lm_head.state_dict())
    parallelize_module(lm_head, mesh, ColwiseParallel())
    with check("colwise lm_head"):
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(4, 5, hidden, generator=gen, dtype=torch.float64, requires_grad=True)
        labels = torch.randint(0, vocab, (4, 5), generator=gen)
        labels[0, :2] = -100
        local_logits = lm_head(x)  # (4, 5, vocab / world): this rank's columns
        _require(isinstance(local_logits, torch.Tensor) and local_logits.shape[-1] < vocab)
        loss = vocab_parallel_cross_entropy(local_logits, labels, group=mesh.get_group(), label_smoothing=0.1)
        loss.backward()
        x_ref = x.detach().clone().requires_grad_()
        expected = F.cross_entropy(reference(x_ref).reshape(-1, vocab), labels.reshape(-1), label_smoothing=0.1)
        expected.backward()
        _close(loss, expected, "tensor-parallel loss")
        _close(x.grad, x_ref.grad, "tensor-parallel input gradient")
        local_weight_grad = lm_head.weight.grad.to_local()
        start = sum(block.numel() for block in torch.arange(vocab).chunk(world)[:rank])  # DTensor's Shard(0) split
        _close(
            local_weight_grad,
            reference.weight.grad[start : start + local_weight_grad.shape[0]],
            "tensor-parallel weight gradient",
        )


def _dtensor(rank, world, sizes):
    """DTensor logits sharded on the classes, on the rows or replicated, and a vocab-sharded DTensor head:
    loss, gradient and its placements equal the single-process result (uneven splits: 37 classes)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    n, c, h = 6, 37, 5
    x = torch.randn(n, c, dtype=torch.float64)
    y0 = torch.randint(0, c, (n,))
    y0[1] = -100
    w = torch.rand(c, dtype=torch.float64) + 0.5
    cases = [
        dict(),
        dict(label_smoothing=0.1, weight=w),  # torch's loss_parallel refuses this combination
        dict(reduction="none"),
        dict(reduction="sum", z_loss=1e-3),
        dict(ignore_index=3, label_smoothing=0.2),
    ]
    for kw in cases:
        with check(f"logits {kw}"):
            y = torch.where(y0 == -100, kw.get("ignore_index", -100), y0)
            ref_x = x.clone().requires_grad_()
            ref = xent.cross_entropy(ref_x, y, **kw)
            up = torch.arange(1.0, n + 1, dtype=torch.float64) if kw.get("reduction") == "none" else torch.tensor(2.0)
            (ref_grad,) = torch.autograd.grad(ref, ref_x, up.to(ref.dtype))
            for placement in (Shard(1), Shard(0), Replicate()):
                dx = distribute_tensor(x, mesh, [placement]).requires_grad_()
                target = distribute_tensor(y, mesh, [Shard(0)]) if placement == Shard(0) else y
                loss = xent.cross_entropy(dx, target, **kw)
                _require(isinstance(loss, DTensor), type(loss))
                _close(loss.full_tensor(), ref, f"dtensor loss {placement} {kw}")
                (grad,) = torch.autograd.grad(loss, dx, distribute_tensor(up, mesh, loss.placements))
                _require(grad.placements == dx.placements, (grad.placements, dx.placements))
                _close(grad.full_tensor(), ref_grad, f"dtensor grad {placement} {kw}")
                # per-token statistics: DTensors laid out like the 'none' loss, the single-process values
                stats_loss, stats = xent.cross_entropy(dx.detach(), target, return_stats=STATISTICS, **kw)
                _close(stats_loss.full_tensor(), ref, f"dtensor loss with statistics {placement} {kw}")
                rows_layout = xent.cross_entropy(dx.detach(), target, **{**kw, "reduction": "none"}).placements
                for name in STATISTICS:
                    _require(getattr(stats, name).placements == rows_layout, (name, placement, rows_layout))
                full_stats = TokenStatistics(*(t.full_tensor() for t in stats))
                _same_statistics(full_stats, xent.cross_entropy(x, y, return_stats=STATISTICS, **kw)[1], f"{placement}")
            module = xent.CrossEntropyLoss(**{k: v for k, v in kw.items() if k != "z_loss"})
            dx = distribute_tensor(x, mesh, [Shard(1)])
            plain = xent.CrossEntropyLoss(**{k: v for k, v in kw.items() if k != "z_loss"})(x, y)
            _close(module(dx, y).full_tensor(), plain, f"module {kw}")
    y = y0
    # nll_loss on row-split log-probabilities
    logp = torch.log_softmax(x, 1)
    for reduction in ("mean", "sum", "none"):
        with check(f"nll_loss {reduction}"):
            out = xent.nll_loss(
                distribute_tensor(logp, mesh, [Shard(0)]),
                distribute_tensor(y, mesh, [Shard(0)]),
                weight=w,
                reduction=reduction,
            )
            _close(out.full_tensor(), F.nll_loss(logp, y, weight=w, reduction=reduction), f"nll {reduction}")
    # a head sharded on its classes (tensor parallelism), replicated hidden states
    hidden = torch.randn(n, h, dtype=torch.float64)
    head = torch.randn(c, h, dtype=torch.float64)
    bias = torch.randn(c, dtype=torch.float64)
    for kw in (dict(), dict(label_smoothing=0.1, reduction="sum")):
        with check(f"tensor-parallel head {kw}"):
            ref_p = [t.clone().requires_grad_() for t in (hidden, head, bias)]
            ref = xent.linear_cross_entropy(ref_p[0], ref_p[1], y, linear_bias=ref_p[2], **kw)
            ref_grads = torch.autograd.grad(ref, ref_p)
            params = [
                distribute_tensor(hidden, mesh, [Replicate()]).requires_grad_(),
                distribute_tensor(head, mesh, [Shard(0)]).requires_grad_(),
                distribute_tensor(bias, mesh, [Shard(0)]).requires_grad_(),
            ]
            loss = xent.linear_cross_entropy(params[0], params[1], y, linear_bias=params[2], **kw)
            _close(loss.full_tensor(), ref, f"tp linear loss {kw}")
            for got, want, p in zip(torch.autograd.grad(loss, params), ref_grads, params):
                _require(got.placements == p.placements)
                _close(got.full_tensor(), want, f"tp linear grad {kw}")
            _, stats = xent.linear_cross_entropy(
                params[0], params[1], y, linear_bias=params[2], return_stats=STATISTICS
            )
            _require(all(t.placements == (Replicate(),) for t in stats))
            expected = xent.linear_cross_entropy(hidden, head, y, linear_bias=bias, return_stats=STATISTICS)[1]
            _same_statistics(TokenStatistics(*(t.full_tensor() for t in stats)), expected, "tp linear statistics")
    # rows that do not split evenly (2 * world - 1 of them): the 'none' loss and the statistics keep the
    # global shape; replicated logits with a replicated DTensor target
    xu = torch.randn(2 * world - 1, c, dtype=torch.float64)
    yu = torch.randint(0, c, (2 * world - 1,))
    for reduction in ("none", "mean"):
        with check(f"uneven rows {reduction}"):
            loss, stats = xent.cross_entropy(
                distribute_tensor(xu, mesh, [Shard(0)]),
                distribute_tensor(yu, mesh, [Shard(0)]),
                reduction=reduction,
                return_stats=STATISTICS,
            )
            want_loss, want = xent.cross_entropy(xu, yu, reduction=reduction, return_stats=STATISTICS)
            _close(loss.full_tensor(), want_loss, f"uneven rows loss {reduction}")
            _same_statistics(TokenStatistics(*(t.full_tensor() for t in stats)), want, f"uneven rows {reduction}")
    with check("replicated target"):
        replicated = xent.cross_entropy(
            distribute_tensor(xu, mesh, [Replicate()]), distribute_tensor(yu, mesh, [Replicate()]), reduction="none"
        )
        _close(replicated.full_tensor(), xent.cross_entropy(xu, yu, reduction="none"), "replicated target")
    # RL log-probabilities and entropies: a vocab-sharded head with replicated hidden states (and the
    # FSDP2 case, plain hidden states), logits sharded on the classes, on the rows, or replicated
    with check("tensor-parallel token_logprobs"):
        up_lp, up_h = torch.randn(n, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
        ref_p = [t.clone().requires_grad_() for t in (hidden, head, bias)]
        ref = xent.token_logprobs(ref_p[0], ref_p[1], y, linear_bias=ref_p[2], temperature=0.8, return_entropy=True)
        ref_grads = torch.autograd.grad(ref, ref_p, (up_lp, up_h))
        params = [
            distribute_tensor(hidden, mesh, [Replicate()]).requires_grad_(),
            distribute_tensor(head, mesh, [Shard(0)]).requires_grad_(),
            distribute_tensor(bias, mesh, [Shard(0)]).requires_grad_(),
        ]
        ours = xent.token_logprobs(params[0], params[1], y, linear_bias=params[2], temperature=0.8, return_entropy=True)
        for a, b, what in zip(ours, ref, ("logprob", "entropy")):
            _require(a.placements == (Replicate(),))
            _close(a.full_tensor(), b, f"tp token_logprobs {what}")
        ups = tuple(distribute_tensor(u, mesh, [Replicate()]) for u in (up_lp, up_h))
        for got, want, p in zip(torch.autograd.grad(ours, params, ups), ref_grads, params):
            _require(got.placements == p.placements)
            _close(got.full_tensor(), want, "tp token_logprobs grad")
    with check("gathered head token_logprobs"):
        fsdp_head = distribute_tensor(head, mesh, [Shard(0)]).requires_grad_()
        lp = xent.token_logprobs(hidden, fsdp_head, y, linear_bias=bias, temperature=0.8)
        _close(lp, ref[0], "gathered head token_logprobs")
    logits = hidden @ head.T + bias
    ref_logits = logits.clone().requires_grad_()
    ref = xent.token_logprobs_from_logits(ref_logits, y, temperature=0.8, return_entropy=True)
    (ref_grad,) = torch.autograd.grad(ref, ref_logits, (up_lp, up_h))
    for placement in (Shard(1), Shard(0), Replicate()):
        with check(f"token_logprobs_from_logits {placement}"):
            dl = distribute_tensor(logits, mesh, [placement]).requires_grad_()
            target = distribute_tensor(y, mesh, [Shard(0)]) if placement == Shard(0) else y
            ours = xent.token_logprobs_from_logits(dl, target, temperature=0.8, return_entropy=True)
            for a, b, what in zip(ours, ref, ("logprob", "entropy")):
                _close(a.full_tensor(), b, f"token_logprobs_from_logits {what} {placement}")
            ups = tuple(distribute_tensor(u, mesh, ours[0].placements) for u in (up_lp, up_h))
            (grad,) = torch.autograd.grad(ours, dl, ups)
            _require(grad.placements == dl.placements)
            _close(grad.full_tensor(), ref_grad, f"token_logprobs_from_logits grad {placement}")
    # layouts that cannot work are refused on every rank
    with check("refused layouts"):
        dx = distribute_tensor(x, mesh, [Shard(0)])
        _expect(ValueError, "batch_size", lambda: xent.cross_entropy(dx, y[: dx.to_local().shape[0]]))
        _expect(RuntimeError, "pass target as a DTensor", lambda: xent.cross_entropy(dx, y))
    # plain hidden states with a sharded head (FSDP2 between forwards): the head is gathered, not taken
    # for a shard; the gradient of the shard is the ranks' average (here all ranks agree)
    with check("gathered head"):
        sharded_head = distribute_tensor(head, mesh, [Shard(0)]).requires_grad_()
        loss = xent.linear_cross_entropy(hidden, sharded_head, y)
        _close(loss, xent.linear_cross_entropy(hidden, head, y), "gathered head loss")
        _same_statistics(
            xent.linear_cross_entropy(hidden, sharded_head.detach(), y, return_stats=STATISTICS)[1],
            xent.linear_cross_entropy(hidden, head, y, return_stats=STATISTICS)[1],
            "gathered head statistics",
        )
        (grad,) = torch.autograd.grad(loss, sharded_head)
        _close(
            grad.full_tensor(),
            torch.autograd.grad(xent.linear_cross_entropy(hidden, head.requires_grad_(), y), head)[0],
            "gathered head grad",
        )


def _dtensor_layouts(rank, world, sizes):
    """Every 1-D placement combination torch's DTensor cross_entropy / nll_loss accepts: logits replicated,
    split on the rows, on the classes, on a spatial dimension, or a pending sum (Partial); index or
    probability targets in any placement; class weights replicated or split; the single-process loss and
    gradient (torch's own DTensor answer where torch's is right; it is not for a weighted mean or label
    smoothing on row-split logits, docs/distributed.md). Where torch raises, a RuntimeError as torch's."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    gen = torch.Generator().manual_seed(11)
    n, c = 2 * world + 1, 7  # uneven row and class splits
    x = torch.randn(n, c, generator=gen, dtype=torch.float64) * 2
    y = torch.randint(0, c, (n,), generator=gen)
    y[1] = -100
    probs = torch.softmax(torch.randn(n, c, generator=gen, dtype=torch.float64), 1)
    w = torch.rand(c, generator=gen, dtype=torch.float64) + 0.5

    def logits_as(placement, values):
        if placement == "partial":  # each rank holds a part of the sum
            return DTensor.from_local(values / world, mesh, [Partial()], run_check=False)
        return distribute_tensor(values, mesh, [placement])

    def weight_as(placement):
        return None if placement is None else distribute_tensor(w, mesh, [placement])

    logit_layouts = (Replicate(), Shard(0), Shard(1), "partial")
    for fn_name, targets in (("cross_entropy", (y, "index")), ("cross_entropy", (probs, "probabilities"))):
        target, kind = targets
        target_layouts = (Replicate(), Shard(0)) + ((Shard(1),) if kind == "probabilities" else ())
        for lp, tp, wp, reduction, smoothing in itertools.product(
            logit_layouts, target_layouts, (None, Replicate(), Shard(0)), ("mean", "sum", "none"), (0.0, 0.1)
        ):
            if smoothing and wp is None and reduction != "mean":
                continue  # keep the matrix to what differs
            kw = dict(reduction=reduction, label_smoothing=smoothing)
            with check(f"{fn_name} {kind} logits {lp} target {tp} weight {wp} {reduction} smoothing {smoothing}"):
                ref_x = x.clone().requires_grad_()
                ref = F.cross_entropy(ref_x, target, weight=None if wp is None else w, **kw)
                up = torch.linspace(0.5, 2.0, ref.numel(), dtype=torch.float64).reshape(ref.shape)
                (ref_grad,) = torch.autograd.grad(ref, ref_x, up)
                dx = logits_as(lp, x).requires_grad_()
                dt = distribute_tensor(target, mesh, [tp])
                loss = xent.cross_entropy(dx, dt, weight=weight_as(wp), **kw)
                _require(isinstance(loss, DTensor), type(loss))
                _close(loss.full_tensor(), ref, "loss")
                (grad,) = torch.autograd.grad(loss, dx, distribute_tensor(up, mesh, loss.placements))
                _close(grad.full_tensor(), ref_grad, "gradient")
                if lp != "partial":
                    _require(grad.placements == dx.placements, (grad.placements, dx.placements))
    # nll_loss on log-probabilities in every layout, index targets in any placement
    logp = torch.log_softmax(x, 1)
    for lp, tp, reduction in itertools.product(logit_layouts, (Replicate(), Shard(0)), ("mean", "sum", "none")):
        with check(f"nll_loss logits {lp} target {tp} {reduction}"):
            ref_x = logp.clone().requires_grad_()
            ref = F.nll_loss(ref_x, y, weight=w, reduction=reduction)
            dx = logits_as(lp, logp).requires_grad_()
            loss = xent.nll_loss(
                dx, distribute_tensor(y, mesh, [tp]), weight=distribute_tensor(w, mesh, [Shard(0)]), reduction=reduction
            )
            _close(loss.full_tensor(), ref, "nll loss")
            up = torch.ones_like(ref)
            (grad,) = torch.autograd.grad(loss, dx, distribute_tensor(up, mesh, loss.placements))
            _close(grad.full_tensor(), torch.autograd.grad(ref, ref_x, up)[0], "nll gradient")
    # spatial logits (N, C, d) split on d, with targets (N, d) split on their rows, their d or replicated;
    # torch refuses 'mean' there (its intermediate results), xent computes it
    x3 = torch.randn(3, c, 2 * world + 1, generator=gen, dtype=torch.float64)
    y3 = torch.randint(0, c, (3, 2 * world + 1), generator=gen)
    for tp, reduction in itertools.product((Replicate(), Shard(0), Shard(1)), ("mean", "sum", "none")):
        with check(f"spatial logits Shard(2) target {tp} {reduction}"):
            ref = F.cross_entropy(x3, y3, reduction=reduction)
            loss = xent.cross_entropy(
                distribute_tensor(x3, mesh, [Shard(2)]), distribute_tensor(y3, mesh, [tp]), reduction=reduction
            )
            _close(loss.full_tensor(), ref, "spatial loss")
    # where torch raises, xent raises torch's type: a plain target beside row-split logits, plain logits
    # beside a DTensor target
    with check("refused like torch"):
        dx = distribute_tensor(x, mesh, [Shard(0)])
        for fn in (F.cross_entropy, xent.cross_entropy):
            _expect(ValueError, "batch_size", lambda fn=fn: fn(dx, y[: dx.to_local().shape[0]]))  # this rank's rows
            _expect(RuntimeError, "", lambda fn=fn: fn(dx, y))  # all rows: which are this rank's?
            _expect(RuntimeError, "", lambda fn=fn: fn(x, distribute_tensor(y, mesh, [Replicate()])))


def _distributed_options(rank, world, sizes):
    """Every argument of the single-process call means the same on the distributed paths: fp16 gradients
    under a GradScaler-sized upstream (not flushed by a stored 1/N), softcap and temperature on the
    vocab-parallel losses, output_dtype and softcap through DTensor heads."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    c = sum(sizes)
    start, size = _layout(rank, sizes, False)
    gen = torch.Generator().manual_seed(5)
    n, h = 512, 8
    with check("fp16 vocab-parallel gradient under a 32768 upstream"):
        full = (torch.randn(n, c, generator=gen) * 2).half()
        target = torch.randint(0, c, (n,), generator=gen)
        local = full[:, start : start + size].clone().requires_grad_()
        loss = vocab_parallel_cross_entropy(local, target)
        (grad,) = torch.autograd.grad(loss, local, torch.tensor(32768.0, dtype=torch.float16))
        exact_x = full.double().requires_grad_()
        (exact,) = torch.autograd.grad(F.cross_entropy(exact_x, target) * 32768, exact_x)
        exact = exact[:, start : start + size]
        torch_x = full.clone().requires_grad_()
        (theirs,) = torch.autograd.grad(F.cross_entropy(torch_x, target), torch_x, torch.tensor(32768.0).half())
        theirs = theirs[:, start : start + size]
        representable = exact.abs() >= 2.0**-24
        flushed = ((grad == 0) & representable).sum().item()
        torch_flushed = ((theirs == 0) & representable).sum().item()
        _require(flushed <= torch_flushed, (flushed, torch_flushed))
        scale = exact.abs().sum().clamp_min(1e-30)  # a rank holding no classes has no gradient at all
        err = ((grad.double() - exact).abs().sum() / scale).item()
        torch_err = ((theirs.double() - exact).abs().sum() / scale).item()
        _require(err <= 2 * torch_err + 1e-7, (err, torch_err))
    with check("fp16 vocab-parallel linear gradient under a 32768 upstream"):
        hidden = torch.randn(n, h, generator=gen).half()
        head = (torch.randn(c, h, generator=gen) / 2).half()
        local_head = head[start : start + size].clone().requires_grad_()
        x_ = hidden.clone().requires_grad_()
        loss = vocab_parallel_linear_cross_entropy(x_, local_head, target)
        g_x, g_w = torch.autograd.grad(loss, (x_, local_head), torch.tensor(32768.0, dtype=torch.float16))
        ref_p = [hidden.double().requires_grad_(), head.double().requires_grad_()]
        ref = F.cross_entropy(ref_p[0] @ ref_p[1].T, target) * 32768
        e_x, e_w = torch.autograd.grad(ref, ref_p)
        for got, want in ((g_x, e_x), (g_w, e_w[start : start + size])):
            _require(((got == 0) & (want.abs() >= 2.0**-24)).sum().item() <= got.numel() // 10**4)
            rel = ((got.double() - want).abs().sum() / want.abs().sum().clamp_min(1e-30)).item()
            _require(rel < 1e-2, rel)
    x64 = torch.randn(6, c, generator=gen, dtype=torch.float64) * 8
    y64 = torch.randint(0, c, (6,), generator=gen)
    for kw in (dict(softcap=5.0), dict(softcap=5.0, label_smoothing=0.1, reduction="none")):
        with check(f"vocab-parallel cross-entropy {kw}"):
            local = x64[:, start : start + size].clone().requires_grad_()
            ours = vocab_parallel_cross_entropy(local, y64, **kw)
            full = x64.clone().requires_grad_()
            expected = xent.cross_entropy(full, y64, **kw)
            _close(ours, expected, "loss")
            up = torch.ones_like(ours)
            _close(
                torch.autograd.grad(ours, local, up)[0],
                torch.autograd.grad(expected, full, up)[0][:, start : start + size],
                "gradient",
            )
    hidden64 = torch.randn(6, h, generator=gen, dtype=torch.float64)
    head64 = torch.randn(c, h, generator=gen, dtype=torch.float64)
    with check("vocab-parallel linear softcap"):
        ours = vocab_parallel_linear_cross_entropy(hidden64, head64[start : start + size], y64, softcap=3.0)
        _close(ours, xent.linear_cross_entropy(hidden64, head64, y64, softcap=3.0), "linear softcap")
    with check("vocab-parallel token_logprobs temperature"):
        ours = vocab_parallel_token_logprobs(x64[:, start : start + size], y64, temperature=0.7, return_entropy=True)
        expected = xent.token_logprobs_from_logits(x64, y64, temperature=0.7, return_entropy=True)
        for a, b in zip(ours, expected):
            _close(a, b, "logprobs/entropy at T=0.7")
    mesh = init_device_mesh("cpu", (world,))
    hidden_bf16, head_bf16 = hidden64.bfloat16(), head64.bfloat16()
    for kw in (dict(output_dtype=torch.float32), dict(output_dtype=torch.float32, softcap=3.0, reduction="none")):
        with check(f"DTensor head {kw}"):
            expected = xent.linear_cross_entropy(hidden_bf16, head_bf16, y64, **kw)
            _require(expected.dtype == torch.float32, expected.dtype)
            tp_head = distribute_tensor(head_bf16, mesh, [Shard(0)])
            tensor_parallel = xent.linear_cross_entropy(
                distribute_tensor(hidden_bf16, mesh, [Replicate()]), tp_head, y64, **kw
            ).full_tensor()
            gathered = xent.linear_cross_entropy(hidden_bf16, tp_head, y64, **kw)
            direct = vocab_parallel_linear_cross_entropy(hidden_bf16, head_bf16[start : start + size], y64, **kw)
            for what, got in (("tensor-parallel", tensor_parallel), ("gathered", gathered), ("direct", direct)):
                _require(got.dtype == torch.float32, (what, got.dtype))
                _close(got, expected, what, rtol=1e-5, atol=1e-5)


def _fsdp(rank, world, sizes):
    """fully_shard (FSDP2): the loss inside the root's forward, and with the head its own FSDP unit used
    outside its forward (still sharded there): both equal the single-process gradient of the ranks' mean."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Linear(4, 6, dtype=torch.float64)
            self.lm_head = torch.nn.Linear(6, 11, dtype=torch.float64)

        def forward(self, h, y):
            return xent.linear_cross_entropy(
                self.body(h), self.lm_head.weight, y, linear_bias=self.lm_head.bias, label_smoothing=0.1
            )

    def data(r):
        gen = torch.Generator().manual_seed(100 + r)
        return torch.randn(5, 4, generator=gen, dtype=torch.float64), torch.randint(0, 11, (5,), generator=gen)

    with check("root unit"):
        torch.manual_seed(0)
        reference = Model()
        model = Model()
        model.load_state_dict(reference.state_dict())
        fully_shard(model, mesh=mesh)
        model(*data(rank)).backward()
        ref_loss = sum(reference(*data(r)) for r in range(world)) / world  # FSDP averages the ranks' gradients
        ref_loss.backward()
        for (name, p), ref_p in zip(model.named_parameters(), reference.parameters()):
            _close(p.grad.full_tensor(), ref_p.grad, f"fsdp grad {name}")

    with check("head its own unit"):
        torch.manual_seed(0)
        own_unit = Model()
        own_unit.load_state_dict(reference.state_dict())
        fully_shard(own_unit.lm_head, mesh=mesh)  # the head its own unit, used outside its forward: gathered
        fully_shard(own_unit, mesh=mesh)
        own_unit(*data(rank)).backward()
        for (name, p), ref_p in zip(own_unit.named_parameters(), reference.parameters()):
            _close(p.grad.full_tensor(), ref_p.grad, f"fsdp own-unit head grad {name}")


def _hf(rank, world, sizes):
    """The transformers patch under fully_shard (FSDP2) and with a ColwiseParallel lm_head: the same loss
    and gradients as the unpatched model."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module
    from transformers import LlamaConfig, LlamaForCausalLM

    import xent.integrations.transformers as xent_hf

    mesh = init_device_mesh("cpu", (world,))
    config = LlamaConfig(
        vocab_size=67,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        torch_dtype=torch.float32,
    )
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 67, (2, 9), generator=gen)

    def build():
        torch.manual_seed(0)
        return LlamaForCausalLM(config).train()

    reference = build()
    ref_loss = reference(input_ids=ids, labels=ids).loss
    ref_loss.backward()
    ref_grads = {n: p.grad for n, p in reference.named_parameters()}

    with check("tensor-parallel lm_head"):
        tp = build()
        parallelize_module(tp, mesh, {"lm_head": ColwiseParallel(use_local_output=False)})
        xent_hf.apply(tp)
        loss = tp(input_ids=ids, labels=ids).loss
        loss = loss.full_tensor() if hasattr(loss, "full_tensor") else loss
        _close(loss, ref_loss, "hf tensor-parallel loss", rtol=1e-5, atol=1e-6)
        loss.backward()
        for n, p in tp.named_parameters():
            grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            _close(grad, ref_grads[n], f"hf tensor-parallel grad {n}", rtol=1e-4, atol=1e-6)

    with check("fsdp"):
        fsdp = build()
        fully_shard(fsdp, mesh=mesh)  # every rank the same batch here, so the averaged gradient is the reference
        xent_hf.apply(fsdp)
        loss = fsdp(input_ids=ids, labels=ids).loss
        _close(loss, ref_loss, "hf fsdp loss", rtol=1e-5, atol=1e-6)
        loss.backward()
        for n, p in fsdp.named_parameters():
            _close(p.grad.full_tensor(), ref_grads[n], f"hf fsdp grad {n}", rtol=1e-4, atol=1e-6)


def _ddp(rank, world, sizes):
    """DistributedDataParallel: xent's losses are just losses; gradients are the ranks' average."""
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    reference = torch.nn.Linear(6, 11, dtype=torch.float64)
    model = DistributedDataParallel(torch.nn.Linear(6, 11, dtype=torch.float64))
    model.module.load_state_dict(reference.state_dict())

    def data(r):
        gen = torch.Generator().manual_seed(200 + r)
        return torch.randn(5, 6, generator=gen, dtype=torch.float64), torch.randint(0, 11, (5,), generator=gen)

    with check("weight gradient"):
        h, y = data(rank)
        (
            xent.cross_entropy(model(h), y, label_smoothing=0.1) + xent.linear_cross_entropy(h, model.module.weight, y)
        ).backward()
        total = sum(
            xent.cross_entropy(reference(d[0]), d[1], label_smoothing=0.1)
            + xent.linear_cross_entropy(d[0], reference.weight, d[1])
            for d in map(data, range(world))
        )
        (total / world).backward()
        _close(model.module.weight.grad, reference.weight.grad, "ddp weight grad")


def _compiled(rank, world, sizes):
    """vocab_parallel_cross_entropy under torch.compile(fullgraph=True): one opaque op with the collective
    inside, results equal eager."""
    c = sum(sizes)
    start, size = sum(sizes[:rank]), sizes[rank]
    torch.manual_seed(0)
    full = torch.randn(6, c, dtype=torch.float64)
    y = torch.randint(0, c, (6,))
    y[2] = -100
    local = full[:, start : start + size]
    for kw in (dict(), dict(label_smoothing=0.1, reduction="sum"), dict(reduction="none", z_loss=1e-3)):
        with check(f"logits {kw}"):
            results = []
            for fn in (vocab_parallel_cross_entropy, torch.compile(vocab_parallel_cross_entropy, fullgraph=True)):
                x = local.clone().requires_grad_()
                loss = fn(x * 1.0, y, **kw)
                (grad,) = torch.autograd.grad(loss, x, torch.ones_like(loss) * 3.0)
                results.append((loss.detach(), grad))
            _close(results[1][0], results[0][0], f"compiled loss {kw}")
            _close(results[1][1], results[0][1], f"compiled grad {kw}")
    # statistics through the compiled op
    with check("statistics"):
        stats = [
            fn(local.clone(), y, z_loss=1e-3, return_stats=STATISTICS)[1]
            for fn in (vocab_parallel_cross_entropy, torch.compile(vocab_parallel_cross_entropy, fullgraph=True))
        ]
        _same_statistics(stats[1], stats[0], "compiled statistics")
        expected = xent.cross_entropy(full, y, z_loss=1e-3, return_stats=STATISTICS)[1]
        _same_statistics(stats[1], expected, "compiled statistics vs single-process")
    # with a gradient: the autograd function around the op
    with check("statistics with a gradient"):
        x = local.clone().requires_grad_()
        loss, compiled_stats = torch.compile(vocab_parallel_cross_entropy, fullgraph=True)(
            x * 1.0, y, return_stats=("entropy", "correct")
        )
        loss.backward()
        _same_statistics(
            compiled_stats, xent.cross_entropy(full, y, return_stats=("entropy", "correct"))[1], "with grad"
        )
    # the ops' schemas, fakes and autograd registrations (every rank runs the same calls, collectives too)
    from torch.library import opcheck

    group_name = dist.group.WORLD.group_name
    options = Options("mean", -100, 0.1, 1e-3)
    with check("opcheck"):
        op = vp_ops.VOCAB_PARALLEL_CROSS_ENTROPY
        call = vp_ops.VocabParallelCall(local.clone(), y, None, options, group_name, None, True, ("entropy", "argmax"))
        opcheck(op.op, op.arguments(call))
        hidden, head = torch.randn(6, 5, dtype=torch.float64), torch.randn(size, 5, dtype=torch.float64)
        p = LinearProblem(hidden, head, None, y, None, options, (6,), torch.float64, statistics=("lse", "entropy"))
        op = vp_ops.VOCAB_PARALLEL_LINEAR_CROSS_ENTROPY
        opcheck(op.op, op.arguments(vp_ops.VocabParallelLinearCall(p, group_name, None)))
    torch.manual_seed(1)  # the same random numbers on every rank after opcheck, whatever it drew
    # the linear path too: forward op (exchange inside), backward op (all-reduce inside)
    hidden = torch.randn(6, 5, dtype=torch.float64)
    head = torch.randn(c, 5, dtype=torch.float64)
    local_head = head[start : start + size]
    for kw in (dict(), dict(label_smoothing=0.1, reduction="none")):
        with check(f"linear {kw}"):
            results = []
            for fn in (
                vocab_parallel_linear_cross_entropy,
                torch.compile(vocab_parallel_linear_cross_entropy, fullgraph=True),
            ):
                params = [hidden.clone().requires_grad_(), local_head.clone().requires_grad_()]
                loss = fn(params[0] * 1.0, params[1], y, **kw)
                grads = torch.autograd.grad(loss, params, torch.ones_like(loss) * 3.0)
                results.append((loss.detach(), *grads))
            for a, b in zip(results[1], results[0]):
                _close(a, b, f"compiled linear {kw}")
    with check("linear statistics"):
        stats = [
            fn(hidden.clone(), local_head.clone().requires_grad_(), y, return_stats=STATISTICS)
            for fn in (
                vocab_parallel_linear_cross_entropy,
                torch.compile(vocab_parallel_linear_cross_entropy, fullgraph=True),
            )
        ]
        _same_statistics(stats[1][1], stats[0][1], "compiled linear statistics")
        _same_statistics(stats[1][1], xent.linear_cross_entropy(hidden, head, y, return_stats=STATISTICS)[1], "linear")
        _close(stats[1][0], stats[0][0], "compiled linear loss with statistics")


def _rl(rank, world, sizes):
    """Token log-probabilities and entropies over a split vocabulary: equal to the single-process
    xent.token_logprobs[_from_logits], forward and backward (both upstream gradients), eager and compiled."""
    c = sum(sizes)
    gen = torch.Generator().manual_seed(31)
    lead = (2, 5)
    target = torch.randint(0, c, lead, generator=gen)
    target[0, 1] = -100
    target[1, 4] = c - 1
    g_lp = torch.randn(lead, generator=gen, dtype=torch.float64)
    g_h = torch.randn(lead, generator=gen, dtype=torch.float64)
    g_lp[0, 1] = math.inf  # an ignored token's upstream gradient does not reach the logits
    for reverse, given_start in ((False, False), (True, True)):
        start, size = _layout(rank, sizes, reverse)
        vs = start if given_start else None
        # logits: a masked vocabulary's end and one token's first half at -inf, a temperature
        full = torch.randn(*lead, c, generator=gen, dtype=torch.float64) * 3
        full[..., c - c // 4 :] = -math.inf
        full[1, 2, : c // 2] = -math.inf
        full[1, 2, -1] = 0.5  # one class left finite there
        for temperature, entropy in ((1.0, True), (0.7, True), (1.3, False)):
            with check(f"logits T={temperature} entropy={entropy} reverse={reverse}"):
                local = full[..., start : start + size].clone().requires_grad_()
                ref = full.clone().requires_grad_()
                ours = vocab_parallel_token_logprobs(
                    local, target, vocab_start=vs, temperature=temperature, return_entropy=entropy
                )
                theirs = xent.token_logprobs_from_logits(ref, target, temperature=temperature, return_entropy=entropy)
                ours, theirs = (ours, theirs) if entropy else ((ours,), (theirs,))
                for a, b, what in zip(ours, theirs, ("logprob", "entropy")):
                    _close(a, b, f"rl logits {what} T={temperature} reverse={reverse}")
                ups = (g_lp, g_h)[: len(ours)]
                (g,) = torch.autograd.grad(ours, local, ups)
                (ge,) = torch.autograd.grad(theirs, ref, ups)
                _close(g, ge[..., start : start + size], f"rl logits grad T={temperature} reverse={reverse}")
        # only the entropy used: the log-probabilities' gradient is None
        with check(f"entropy-only grad reverse={reverse}"):
            local = full[..., start : start + size].clone().requires_grad_()
            ref = full.clone().requires_grad_()
            (g,) = torch.autograd.grad(
                vocab_parallel_token_logprobs(local, target, vocab_start=vs, return_entropy=True)[1], local, g_h
            )
            (ge,) = torch.autograd.grad(xent.token_logprobs_from_logits(ref, target, return_entropy=True)[1], ref, g_h)
            _close(g, ge[..., start : start + size], "rl entropy-only grad")
        # the head: replicated hidden states, this rank's rows (a budget small enough for several chunks)
        hidden = 4
        x = torch.randn(*lead, hidden, generator=gen, dtype=torch.float64)
        w = torch.randn(c, hidden, generator=gen, dtype=torch.float64)
        b = torch.randn(c, generator=gen, dtype=torch.float64)
        for temperature, entropy in ((1.0, True), (0.6, True), (1.0, False)):
            with check(f"linear T={temperature} entropy={entropy} reverse={reverse}"):
                params = [x.clone().requires_grad_(), w[start : start + size].clone().requires_grad_()]
                params.append(b[start : start + size].clone().requires_grad_())
                ref = [t.clone().requires_grad_() for t in (x, w, b)]
                ours = vocab_parallel_linear_token_logprobs(
                    params[0],
                    params[1],
                    target,
                    vocab_start=vs,
                    linear_bias=params[2],
                    temperature=temperature,
                    return_entropy=entropy,
                    memory_budget=3 * 8 * max(1, size),
                )
                theirs = xent.token_logprobs(
                    ref[0], ref[1], target, linear_bias=ref[2], temperature=temperature, return_entropy=entropy
                )
                ours, theirs = (ours, theirs) if entropy else ((ours,), (theirs,))
                for a, bb, what in zip(ours, theirs, ("logprob", "entropy")):
                    _close(a, bb, f"rl linear {what} T={temperature}")
                ups = (g_lp, g_h)[: len(ours)]
                grads = torch.autograd.grad(ours, params, ups)
                ref_grads = torch.autograd.grad(theirs, ref, ups)
                _close(grads[0], ref_grads[0], f"rl linear grad input T={temperature}")
                _close(grads[1], ref_grads[1][start : start + size], f"rl linear grad weight T={temperature}")
                _close(grads[2], ref_grads[2][start : start + size], f"rl linear grad bias T={temperature}")
    _rl_frameworks(rank, world, sizes, gen)
    # float32 logits (the Triton kernel's case under XENT_BACKEND=triton)
    start, size = sum(sizes[:rank]), sizes[rank]
    full = torch.randn(40, c, generator=gen)
    y = torch.randint(0, c, (40,), generator=gen)
    with check("float32 logits"):
        local = full[:, start : start + size].clone().requires_grad_()
        ref = full.clone().requires_grad_()
        ours = vocab_parallel_token_logprobs(local, y, return_entropy=True)
        theirs = xent.token_logprobs_from_logits(ref, y, return_entropy=True)
        up = torch.randn(40, generator=gen)
        (g,) = torch.autograd.grad((ours[0] * up + ours[1]).sum(), local)
        (ge,) = torch.autograd.grad((theirs[0] * up + theirs[1]).sum(), ref)
        for a, bb in zip(ours, theirs):
            _close(a, bb, "rl float32", rtol=1e-5, atol=1e-6)
        _close(g, ge[:, start : start + size], "rl float32 grad", rtol=1e-5, atol=1e-6)
    # a bf16 head: each rank's block of logits is the GEMM's fp32 accumulator (logits_dtype's default), so the
    # results are those of float64 over the same bf16 values, up to fp32 rounding; bf16 logits are not
    with check("bf16 head, fp32 logits"):
        xb = (torch.rand(40, 16, generator=gen) - 0.5).bfloat16()
        wb = (torch.rand(c, 16, generator=gen) * 2 - 1).bfloat16()
        local = wb[start : start + size].clone().requires_grad_()
        ours = vocab_parallel_linear_token_logprobs(xb, local, y, temperature=1.5, return_entropy=True)
        z = (xb.double() @ wb.double().T) / 1.5
        logp = z.log_softmax(-1)
        exact = (logp.gather(-1, y.unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1))
        for a, e, what in zip(ours, exact, ("logprob", "entropy")):
            _close(a.double(), e, f"rl bf16 head {what}", rtol=1e-5, atol=1e-5)
        rounded = vocab_parallel_linear_token_logprobs(xb, local, y, temperature=1.5, logits_dtype=torch.bfloat16)
        single = xent.token_logprobs(xb, wb, y, temperature=1.5, logits_dtype=torch.bfloat16)
        _close(rounded, single, "rl bf16 head, bf16 logits", rtol=1e-5, atol=1e-5)
    # torch.compile(fullgraph=True): the custom ops, with and without a gradient
    local = full[:, start : start + size].double()
    head = torch.randn(c, 3, generator=gen, dtype=torch.float64)
    hid = torch.randn(40, 3, generator=gen, dtype=torch.float64)

    # (one vocab-parallel call per compiled graph: inductor may order two of them differently on ranks
    # whose blocks differ in size, which the exchange detects; see _errors)
    def logits_step(logits):
        lp, ent = vocab_parallel_token_logprobs(logits * 1.0, y, temperature=0.9, return_entropy=True)
        return (lp * 2 + ent).sum()

    def linear_step(h, w):
        lp, ent = vocab_parallel_linear_token_logprobs(h, w, y, return_entropy=True)
        return (lp - 0.1 * ent).sum()

    # the ops' schemas, fakes and autograd registrations (every rank runs the same calls, collectives too)
    from torch.library import opcheck

    group_name = dist.group.WORLD.group_name
    options = vp_ops.rl_options(-100)
    with check("opcheck"):
        op = vp_ops.VOCAB_PARALLEL_TOKEN_LOGPROBS
        logits = local.clone().requires_grad_()
        opcheck(op.op, op.arguments(vp_ops.VocabParallelTokenCall(logits, y, options, group_name, None, True)))
        h, w = hid.clone().requires_grad_(), head[start : start + size].clone().requires_grad_()
        p = vp_ops.rl_linear_problem(h, w, None, y, options, None, True)
        op = vp_ops.VOCAB_PARALLEL_LINEAR_TOKEN_LOGPROBS
        opcheck(op.op, op.arguments(vp_ops.VocabParallelLinearCall(p, group_name, None)))

    def transposed_step(local_t):  # column-major logits: the backward op's fake must be contiguous as its real
        lp, ent = vocab_parallel_token_logprobs(local_t.t(), y, return_entropy=True)
        return (lp + ent).sum()

    steps = ((logits_step, (local,)), (linear_step, (hid, head[start : start + size])))
    for step, args in steps + ((transposed_step, (local.t().contiguous(),)),):
        with check(f"compiled {step.__name__}"):
            results = []
            for fn in (step, torch.compile(step, fullgraph=True)):
                inputs = [t.clone().requires_grad_() for t in args]
                value = fn(*inputs)
                results.append((value.detach(), *torch.autograd.grad(value, inputs)))
                with torch.no_grad():
                    results[-1] += (fn(*inputs),)
            for a, bb in zip(results[1], results[0]):
                _close(a, bb, f"rl compiled {step.__name__}")


def _rl_frameworks(rank, world, sizes, gen):
    """What RL frameworks pass over a split vocabulary: per-token temperatures (both paths), an entropy
    without gradient, and verl's fused-kernel form with its tensor-parallel group, whose backward leaves
    each rank its part of the hidden states' gradient (their sum is the gradient)."""
    import xent.integrations.verl as xent_verl

    c = sum(sizes)
    start, size = sum(sizes[:rank]), sizes[rank]
    lead = (3, 4)
    target = torch.randint(0, c, lead, generator=gen)
    target[2, 0] = -100
    temperature = torch.rand(3, 1, generator=gen, dtype=torch.float64) + 0.5
    full = torch.randn(*lead, c, generator=gen, dtype=torch.float64) * 2
    x = torch.randn(*lead, 5, generator=gen, dtype=torch.float64)
    w = torch.randn(c, 5, generator=gen, dtype=torch.float64)
    g_lp = torch.randn(lead, generator=gen, dtype=torch.float64)
    g_h = torch.randn(lead, generator=gen, dtype=torch.float64)
    with check("per-token temperature, logits"):
        local = full[..., start : start + size].clone().requires_grad_()
        ref = full.clone().requires_grad_()
        ours = vocab_parallel_token_logprobs(local, target, temperature=temperature, return_entropy=True)
        theirs = xent.token_logprobs_from_logits(ref, target, temperature=temperature, return_entropy=True)
        for a, bb in zip(ours, theirs):
            _close(a, bb, "per-token temperature logits")
        (g,) = torch.autograd.grad(ours, local, (g_lp, g_h))
        (ge,) = torch.autograd.grad(theirs, ref, (g_lp, g_h))
        _close(g, ge[..., start : start + size], "per-token temperature logits grad")
    with check("per-token temperature, head"):
        params = [x.clone().requires_grad_(), w[start : start + size].clone().requires_grad_()]
        ref = [x.clone().requires_grad_(), w.clone().requires_grad_()]
        ours = vocab_parallel_linear_token_logprobs(
            *params, target, temperature=temperature, return_entropy=True, memory_budget=3 * 8 * max(1, size)
        )
        theirs = xent.token_logprobs(*ref, target, temperature=temperature, return_entropy=True)
        for a, bb in zip(ours, theirs):
            _close(a, bb, "per-token temperature head")
        grads = torch.autograd.grad(ours, params, (g_lp, g_h))
        ref_grads = torch.autograd.grad(theirs, ref, (g_lp, g_h))
        _close(grads[0], ref_grads[0], "per-token temperature head grad input")
        _close(grads[1], ref_grads[1][start : start + size], "per-token temperature head grad weight")
    with check("entropy without gradient"):
        params = [x.clone().requires_grad_(), w[start : start + size].clone().requires_grad_()]
        lp, ent = vocab_parallel_linear_token_logprobs(
            *params, target, return_entropy=True, entropy_requires_grad=False
        )
        _require(not ent.requires_grad, "the entropy is detached")
        grads = torch.autograd.grad((lp * g_lp).sum(), params)
        alone = vocab_parallel_linear_token_logprobs(*params, target)
        expected = torch.autograd.grad((alone * g_lp).sum(), params)
        for a, bb in zip(grads, expected):
            _close(a, bb, "entropy without gradient: the log-probabilities' gradient")
    with check("verl form with a tensor-parallel group"):
        y = target.clamp(min=0)  # verl's labels are all tokens
        h = x.clone().unsqueeze(0).requires_grad_()  # verl's (1, N, H)
        local_w = w[start : start + size].clone().requires_grad_()
        ref_h, ref_w = x.clone().unsqueeze(0).requires_grad_(), w.clone().requires_grad_()
        ours = xent_verl.linear_cross_entropy(h, local_w, y.unsqueeze(0), 1.5, "none", dist.group.WORLD)
        theirs = xent_verl.linear_cross_entropy(ref_h, ref_w, y.unsqueeze(0), 1.5, "none")
        for a, bb in zip(ours, theirs):
            _close(a, bb, "verl form values")
        ups = (g_lp.reshape(-1), g_h.reshape(-1))
        gh, gw = torch.autograd.grad(ours, (h, local_w), ups)
        rh, rw = torch.autograd.grad(theirs, (ref_h, ref_w), ups)
        dist.all_reduce(gh)  # as verl's own TP test does: the ranks' parts sum to the gradient
        _close(gh, rh, "verl form hidden-state gradient, summed over ranks")
        _close(gw, rw[start : start + size], "verl form head gradient")


def _inplace(rank, world, sizes):
    """inplace=True over a split vocabulary (the vocab-parallel loss): each rank's gradient written over its
    logits, equal to inplace=False's, every dtype (fp16's in backward); DTensor logits refuse it."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    c = sum(sizes)
    start, size = sum(sizes[:rank]), sizes[rank]
    gen = torch.Generator().manual_seed(41)
    full = torch.randn(7, c, generator=gen) * 3
    target = torch.randint(0, c, (7,), generator=gen)
    target[2] = -100
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        for kw in (dict(), dict(label_smoothing=0.1, z_loss=1e-3, reduction="sum")):
            with check(f"vocab-parallel inplace {dtype} {kw}"):
                base = full[:, start : start + size].to(dtype).clone().requires_grad_()
                ref_base = base.detach().clone().requires_grad_()
                logits = base * 1
                loss = vocab_parallel_cross_entropy(logits, target, inplace=True, **kw)
                ref = vocab_parallel_cross_entropy(ref_base * 1, target, **kw)
                _close(loss.double(), ref.double(), "inplace loss", rtol=1e-6, atol=1e-6)
                (g,) = torch.autograd.grad(loss, base)
                (r,) = torch.autograd.grad(ref, ref_base)
                _close(g.double(), r.double(), "inplace grad", rtol=1e-6, atol=1e-6)
                _require(torch.equal(logits.detach(), g), "the logits hold the gradient")
    with check("DTensor logits: inplace is refused"):
        mesh = init_device_mesh("cpu", (world,))
        base = distribute_tensor(full.double(), mesh, [Shard(1)]).requires_grad_()
        _expect(
            NotImplementedError,
            "vocab_parallel_cross_entropy",
            lambda: xent.cross_entropy(base * 1, target, inplace=True),
        )


# scenario name (the pytest side's) -> the function every rank runs
SCENARIOS = {
    "dtensor_layouts": _dtensor_layouts,
    "distributed_options": _distributed_options,
    "logits": _logits,
    "linear": _linear,
    "errors": _errors,
    "tensor_parallel": _tensor_parallel,
    "dtensor": _dtensor,
    "fsdp": _fsdp,
    "hf": _hf,
    "ddp": _ddp,
    "compiled": _compiled,
    "rl": _rl,
    "inplace": _inplace,
}

# 2-D meshes, FSDP2's gradient reduction, the token count, torchtitan: tests/distributed/dist_mesh2d.py
from dist_mesh2d import SCENARIOS_2D  # noqa: E402 - after `check` and the helpers it imports from here

SCENARIOS.update(SCENARIOS_2D)
