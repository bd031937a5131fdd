"""The backends as objects in a registry (kernels/backends.py) and their selection (kernels.backend_for):
the registry's answers and errors, the precedence of a per-call choice over XENT_BACKEND over the automatic
choice, what each backend says it supports and the fallback to torch for what it does not, and that the
hooks are really taken: a registered backend's fused linear pass by kernels.linear.linear_pass, its chunk
step by linear cross-entropy, its distillation row math (through the chunk driver) by the distillation pass.
"""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch

from xent import kernels
from xent.kernels import backends, driver, linear, portable
from xent.kernels import distill as distill_kernels
from xent.kernels.backends import TORCH, TRITON, Capabilities, Work
from xent.problems import DistillProblem, LinearProblem, Options, make_problem

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # backend_for only looks at the device type


class CountingBackend(backends.TorchBackend):
    """The torch backend, counting the steps it is handed (and optionally taking over the linear pass)."""

    def __init__(self, name: str, fused=None):
        self.name = name
        self.fused = fused  # the fused linear hook's answer; None: declare no fused pass at all
        work = TORCH.capabilities.work | ({Work.FUSED_LINEAR} if fused is not None else set())
        self.capabilities = Capabilities(frozenset(work))
        self.chunks, self.distill_steps, self.linear_calls = [], [], []

    def chunk(self, step):
        assert isinstance(step, backends.ChunkStep)
        self.chunks.append((step.r0, step.r1))
        super().chunk(step)

    def distill_rows(self, step):
        assert isinstance(step, backends.DistillStep)
        self.distill_steps.append(step.student.shape[0])
        return super().distill_rows(step)

    def linear_pass(self, problem, block, **kwargs):
        self.linear_calls.append((problem, block, kwargs))
        return self.fused() if callable(self.fused) else None


@pytest.fixture
def registered():
    """Registers backends for one test, and unregisters them whatever happens."""
    added = []

    def add(backend):
        added.append(backends.register(backend).name)
        return backend

    yield add
    for name in added:
        backends.unregister(name)
    assert backends.names()[:2] == ("torch", "triton")


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv("XENT_BACKEND", raising=False)
    return monkeypatch


# ----------------------------------------------------------------------------------------------------
# The registry


def test_registry_names_and_get(registered):
    assert backends.names()[:2] == ("torch", "triton")
    assert backends.get("torch") is TORCH and backends.get("triton") is TRITON
    assert isinstance(TRITON, backends.TorchBackend) and isinstance(TORCH, backends.Backend)
    with pytest.raises(ValueError, match="registered ones are torch, triton"):
        backends.get("cuda")
    with pytest.raises(ValueError, match="already registered"):
        backends.register(backends.TorchBackend())
    for bad in ("auto", "", "Fake"):
        fake = CountingBackend("x")
        fake.name = bad
        with pytest.raises(ValueError, match="lower-case name"):
            backends.register(fake)
    with pytest.raises(ValueError, match="cannot be unregistered"):
        backends.unregister("torch")
    fake = registered(CountingBackend("fake-registry"))
    assert backends.names()[-1] == "fake-registry" and backends.get("fake-registry") is fake
    assert kernels.check_backend_name("fake-registry") == "fake-registry"


def test_check_backend_name():
    assert kernels.check_backend_name(None) is None
    assert kernels.check_backend_name("auto") == "auto"
    assert kernels.check_backend_name(" AUTO ") == "auto"
    assert kernels.check_backend_name("Torch") == "torch"
    assert kernels.check_backend_name("triton") == "triton"
    with pytest.raises(ValueError, match="one of auto, torch, triton"):
        kernels.check_backend_name("cuda")
    with pytest.raises(TypeError):
        kernels.check_backend_name(1)


# ----------------------------------------------------------------------------------------------------
# Selection


def test_unknown_names_raise(no_env):
    with pytest.raises(ValueError, match="torch, triton"):
        kernels.backend_for(CPU, torch.float32, "cuda")
    no_env.setenv("XENT_BACKEND", "cuda")
    with pytest.raises(ValueError, match="XENT_BACKEND must be one of auto, torch, triton"):
        kernels.backend_for(CPU)
    # a per-call choice does not read the environment at all
    assert kernels.backend_for(CPU, torch.float32, "torch") is TORCH


@needs_triton
def test_explicit_unavailable_backend_raises(no_env):
    no_env.delenv("TRITON_INTERPRET", raising=False)  # CPU tensors without the interpreter: Triton cannot run
    with pytest.raises(RuntimeError, match=r"backend='triton' was asked for, but .*TRITON_INTERPRET=1"):
        kernels.backend_for(CPU, torch.float32, "triton")
    no_env.setenv("XENT_BACKEND", "triton")
    with pytest.raises(RuntimeError, match=r"XENT_BACKEND=triton, but .*TRITON_INTERPRET=1"):
        kernels.backend_for(CPU, torch.float32)
    # ... but the automatic choice never raises: CPU tensors take torch
    no_env.setenv("XENT_BACKEND", "auto")
    assert kernels.backend_for(CPU, torch.float32) is TORCH


def test_a_backend_outside_its_devices_is_unavailable(no_env, registered):
    gpu_only = CountingBackend("fake-gpu-only")
    gpu_only.capabilities = dataclasses.replace(gpu_only.capabilities, devices=frozenset({"cuda"}))
    registered(gpu_only)
    assert "cuda" in gpu_only.unavailable(CPU) and gpu_only.unavailable(CUDA) is None
    with pytest.raises(RuntimeError, match="runs on cuda tensors"):
        kernels.backend_for(CPU, torch.float32, "fake-gpu-only")
    assert kernels.backend_for(CUDA, torch.float32, "fake-gpu-only") is gpu_only


def test_float64_takes_torch(no_env, registered):
    no_env.delenv("TRITON_INTERPRET", raising=False)  # even where Triton could not run at all
    for choice in ("triton", "torch", None, "auto"):
        for dev in (CPU, CUDA):
            assert kernels.backend_for(dev, torch.float64, choice) is TORCH
    fp32_only = CountingBackend("fake-fp32-only")
    fp32_only.capabilities = dataclasses.replace(fp32_only.capabilities, dtypes=frozenset({torch.float32}))
    registered(fp32_only)
    assert kernels.backend_for(CPU, torch.float32, "fake-fp32-only") is fp32_only
    assert kernels.backend_for(CPU, torch.bfloat16, "fake-fp32-only") is TORCH
    assert kernels.backend_for(CPU, None, "fake-fp32-only") is fp32_only  # no dtype: nothing to check


@needs_triton
def test_choice_over_environment_over_auto(no_env):
    no_env.setenv("TRITON_INTERPRET", "1")  # so that Triton can run on CPU tensors here
    # auto: Triton for CUDA tensors, torch for CPU tensors (interpreter or not)
    assert kernels.backend_for(CPU) is TORCH and kernels.backend_for(CUDA) is TRITON
    assert kernels.backend_for(CPU, torch.float32, "auto") is TORCH
    # the environment over auto
    no_env.setenv("XENT_BACKEND", "triton")
    assert kernels.backend_for(CPU, torch.float32) is TRITON
    assert kernels.backend_for(CPU, torch.float32, "auto") is TORCH  # an explicit 'auto' overrides it
    # the choice over the environment, both ways
    assert kernels.backend_for(CPU, torch.float32, "torch") is TORCH
    assert kernels.backend_for(CUDA, torch.float32, "torch") is TORCH
    no_env.setenv("XENT_BACKEND", "torch")
    assert kernels.backend_for(CUDA) is TORCH
    assert kernels.backend_for(CPU, torch.float32, "triton") is TRITON
    assert kernels.backend_for(CPU, torch.bfloat16, "TRITON") is TRITON


@needs_triton
def test_scale_by_upstream_takes_the_choice(no_env, monkeypatch):
    no_env.setenv("TRITON_INTERPRET", "1")
    no_env.setenv("XENT_BACKEND", "torch")
    seen = []
    monkeypatch.setattr(backends.TritonBackend, "scale_", lambda self, g, u, per_row: seen.append(self.name))
    grad = torch.ones(3, 4)
    kernels.scale_by_upstream_(grad, torch.tensor(2.0))  # the environment's torch
    assert seen == [] and torch.equal(grad, torch.full((3, 4), 2.0))
    kernels.scale_by_upstream_(grad, torch.tensor(2.0), choice="triton")
    assert seen == ["triton"]


# ----------------------------------------------------------------------------------------------------
# What each backend serves


def _problem(logits, target, **options):
    return make_problem(logits, target, None, Options(**options), logits.dtype)


def test_supports():
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        assert TORCH.supports(Work.ROWS, dtype=dtype)
        assert TRITON.supports(Work.ROWS, dtype=dtype) == (dtype != torch.float64)
    assert TORCH.supports(Work.DISTILL_ROWS) and not TRITON.supports(Work.DISTILL_ROWS)
    assert not TORCH.supports(Work.FUSED_LINEAR) and not TRITON.supports(Work.FUSED_LINEAR)
    assert TRITON.supports(Work.ROWS, device=CUDA) and not TRITON.supports(Work.ROWS, device=torch.device("mps"))
    assert TORCH.supports(Work.ROWS, device=torch.device("mps"))
    assert TORCH.half_precision_workspace is False and TRITON.half_precision_workspace is True

    index = _problem(torch.randn(4, 5), torch.randint(0, 5, (4,)))
    kdim = _problem(torch.randn(4, 5, 3), torch.randint(0, 5, (4, 3)))
    probabilities = _problem(torch.randn(4, 5), torch.rand(4, 5))
    fp64 = _problem(torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 5, (4,)))
    half = _problem(torch.randn(4, 5).bfloat16(), torch.randint(0, 5, (4,)))
    assert TRITON.supports(Work.CROSS_ENTROPY, problem=index) and TRITON.supports(Work.CROSS_ENTROPY, problem=half)
    for p in (kdim, probabilities, fp64):
        assert not TRITON.supports(Work.CROSS_ENTROPY, problem=p)
    assert not TORCH.supports(Work.CROSS_ENTROPY, problem=index)  # torch's is the chunk driver's
    assert TORCH.cross_entropy_driver(index) is None


@needs_triton
def test_what_triton_does_not_serve_takes_torch(no_env, monkeypatch):
    no_env.setenv("TRITON_INTERPRET", "1")
    from xent.kernels import triton_rows

    index = _problem(torch.randn(4, 5), torch.randint(0, 5, (4,)), backend="triton")
    assert kernels.forward_for(index) is triton_rows.cross_entropy_forward
    # the per-call choice is read from the problem: torch here, whatever the environment says
    no_env.setenv("XENT_BACKEND", "triton")
    assert kernels.forward_for(dataclasses.replace(index, options=Options(backend="torch"))) is (
        portable.cross_entropy_forward
    )
    for p in (
        _problem(torch.randn(4, 5), torch.rand(4, 5), backend="triton"),
        _problem(torch.randn(4, 5, 3), torch.randint(0, 5, (4, 3)), backend="triton"),
        _problem(torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 5, (4,)), backend="triton"),
    ):
        assert kernels.forward_for(p) is portable.cross_entropy_forward
    # distillation asked of Triton: the torch backend's row math, run by TORCH itself
    callers = []
    original = backends.TorchBackend.distill_rows
    monkeypatch.setattr(
        backends.TorchBackend, "distill_rows", lambda self, step: callers.append(self) or original(self, step)
    )
    p = _distill_problem(backend="triton")
    distill_kernels.distill_pass(p, distill_kernels.valid_rows(p))
    assert callers and all(b is TORCH for b in callers)


# ----------------------------------------------------------------------------------------------------
# The hooks are taken


def _linear_problem(backend=None, rows=23, hidden=8, vocab=30, chunk_size=0, **options):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, hidden, generator=g)
    w = torch.randn(vocab, hidden, generator=g)
    b = torch.randn(vocab, generator=g)
    y = torch.randint(0, vocab, (rows,), generator=g)
    y[::5] = -100
    return LinearProblem(x, w, b, y, None, Options(backend=backend, **options), (rows,), x.dtype, chunk_size=chunk_size)


def _linear_run(p):
    targets = linear.index_targets(p)
    stats, gi, gw, gb = linear.linear_pass(p, targets.block(), targets, targets.scale(), (True, True, True))
    return linear.loss_rows(p, targets, stats), gi, gw, gb


def test_a_registered_fused_linear_pass_is_taken(no_env, registered):
    sentinel = (object(), None, None, None)
    fused = registered(CountingBackend("fake-fused", fused=lambda: sentinel))
    assert kernels.backend_for(CPU, torch.float32, "fake-fused") is fused
    assert fused.supports(Work.FUSED_LINEAR)
    p = _linear_problem(backend="fake-fused")
    targets = linear.index_targets(p)
    block, scale = targets.block(), targets.scale()
    assert linear.linear_pass(p, block, targets, scale, (True, False, False)) is sentinel
    (called_p, called_block, kwargs) = fused.linear_calls[-1]
    assert called_p is p and called_block is block and kwargs["targets"] is targets and kwargs["scale"] is scale
    assert kwargs["want"] == (True, False, False) and not fused.chunks  # no generic chunk ran
    # without the choice the generic path runs (and never asks the registered backend)
    calls = len(fused.linear_calls)
    linear.linear_pass(_linear_problem(), block, targets, scale, (True, False, False))
    assert len(fused.linear_calls) == calls


def test_a_declining_fused_pass_runs_the_generic_path_with_its_chunk_step(no_env, registered):
    declining = registered(CountingBackend("fake-declining", fused=lambda: None))
    p = _linear_problem(backend="fake-declining", chunk_size=5, softcap=3.0, label_smoothing=0.1)
    got = _linear_run(p)
    assert len(declining.linear_calls) == 1
    assert declining.chunks == [(0, 5), (5, 10), (10, 15), (15, 20), (20, 23)]
    expected = _linear_run(dataclasses.replace(p, options=dataclasses.replace(p.options, backend="torch")))
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


def _distill_problem(backend=None, teacher_kind="logits", divergence="kl", rows=19, vocab=24, budget=None):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(rows, 8, generator=g)
    w = torch.randn(vocab, 8, generator=g)
    y = torch.randint(0, vocab, (rows,), generator=g)
    y[::3] = -100
    tensors = dict(
        teacher_input=None,
        teacher_weight=None,
        teacher_bias=None,
        teacher_logits=None,
        teacher_indices=None,
        teacher_logprobs=None,
    )
    if teacher_kind == "logits":
        tensors["teacher_logits"] = torch.randn(rows, vocab, generator=g)
    elif teacher_kind == "head":
        tensors.update(
            teacher_input=torch.randn(rows, 6, generator=g), teacher_weight=torch.randn(vocab, 6, generator=g)
        )
    else:
        tensors["teacher_indices"] = torch.randint(0, vocab, (rows, 4), generator=g)
        tensors["teacher_logprobs"] = torch.randn(rows, 4, generator=g).log_softmax(-1)
    return DistillProblem(
        x,
        w,
        None,
        teacher_kind,
        **tensors,
        target=y,
        divergence=divergence,
        beta=0.5,
        temperature=2.0,
        ignore_index=-100,
        reduction="mean",
        output_shape=(rows,),
        output_dtype=x.dtype,
        memory_budget=budget,
        backend=backend,
    )


@pytest.mark.parametrize(
    "teacher_kind,divergence", [("logits", "kl"), ("head", "reverse_kl"), ("logits", "jsd"), ("topk", "kl")]
)
def test_distillation_runs_through_the_driver_and_the_backends_row_step(
    no_env, registered, monkeypatch, teacher_kind, divergence
):
    counting = registered(CountingBackend("fake-distill"))
    p = _distill_problem("fake-distill", teacher_kind, divergence)
    per_chunk = 4 * distill_kernels.workspaces(p) * p.linear_weight.shape[0] * 5  # 5 rows of fp32 per chunk
    p = dataclasses.replace(p, memory_budget=per_chunk)
    assert distill_kernels.rows_per_chunk(p) == 5
    steps = []
    original_drive = driver.drive
    monkeypatch.setattr(driver, "drive", lambda step, chunks: steps.append(step) or original_drive(step, chunks))

    valid = distill_kernels.valid_rows(p)
    scale = distill_kernels.reduction_scale(p, valid)
    got = distill_kernels.distill_pass(p, valid, scale, (True, True, False))
    assert counting.distill_steps == [5, 5, 5, 4]
    assert len(steps) == 1 and isinstance(steps[0].__self__, driver.DistillRowPass)
    assert steps[0].__self__.backend is counting
    expected = distill_kernels.distill_pass(dataclasses.replace(p, backend="torch"), valid, scale, (True, True, False))
    for a, b in zip(got, expected):
        assert (a is None and b is None) or torch.equal(a, b)
    assert got[0].abs().sum() > 0 and got[1].abs().sum() > 0
