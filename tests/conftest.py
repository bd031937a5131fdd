import os

import torch

# Without a GPU, Triton kernels run through Triton's interpreter on CPU tensors. It must be chosen before
# any kernel is defined (at import), hence here.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# CI runs a fixed, reproducible set of examples; XENT_HYPOTHESIS=explore draws fresh ones locally.
settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=150,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "explore",
    deadline=None,
    max_examples=2000,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("explore" if os.environ.get("XENT_HYPOTHESIS") == "explore" else "ci")

torch.set_num_threads(min(2, torch.get_num_threads()))

# The devices the differential tests run on: the CPU always, and the GPU where there is one (there, xent's
# CUDA path: the Triton kernel for class-index rows, the torch backend for the rest). A CPU-only machine
# runs exactly the CPU tests.
_FAILURE_LOG = os.environ.get("XENT_FAILURE_LOG")
if _FAILURE_LOG:  # a time-boxed run on a lent GPU: keep each failure even if the run is cut short

    def pytest_runtest_logreport(report):
        if report.failed:
            with open(_FAILURE_LOG, "a") as f:
                f.write(f"=== {report.nodeid} ({report.when})\n{report.longreprtext}\n")


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_collection_modifyitems(config, items):
    """Markers that follow from a test's parameters (the markers are registered in pyproject.toml).

    A case parametrized over xent's backend (`backend` / `backend_name`, a parameter or a fixture's) with
    the value "triton" runs Triton kernels: `triton`. A case on the "cuda" `device`: `cuda`. The other
    markers are set in the test files (decorators, a module's pytestmark).
    """
    for item in items:
        callspec = getattr(item, "callspec", None)
        params = callspec.params if callspec is not None else {}
        if any(params.get(name) == "triton" for name in ("backend", "backend_name")):
            item.add_marker(pytest.mark.triton)
        if params.get("device") == "cuda":
            item.add_marker(pytest.mark.cuda)


@pytest.fixture(scope="session", params=DEVICES)
def device(request) -> torch.device:
    """The device a differential test runs on ("cpu", and "cuda" when available).

    Tests draw their inputs on the CPU (so that seeds give the same values everywhere) and move them here;
    the torch reference they compare with runs on the same device. Session-scoped, so that Hypothesis
    tests may take it (their examples share one fixture value).
    """
    return torch.device(request.param)


if int(pytest.__version__.split(".")[0]) < 9:  # pytest 9 has a built-in `subtests` fixture; 8 does not

    @pytest.fixture
    def subtests():
        """pytest 8: each failed subtest is recorded, and the test fails at its end listing all of them (the
        distributed tests report one subtest per failed check)."""
        import contextlib

        failures = []

        class Subtests:
            @contextlib.contextmanager
            def test(self, msg=None, **kwargs):
                try:
                    yield
                except BaseException as failure:  # pytest.fail raises an OutcomeException, a BaseException
                    failures.append(f"[{msg}] {kwargs}: {failure}")

        yield Subtests()
        if failures:
            pytest.fail("\n\n".join(failures), pytrace=False)
