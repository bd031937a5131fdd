import os

import torch

# Without a GPU, Triton kernels run through Triton's interpreter on CPU tensors. It must be chosen before
# any kernel is defined (at import), hence here.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# CI runs a fixed, reproducible set of examples; XENT_HYPOTHESIS=explore draws fresh ones locally.
settings.register_profile("ci", derandomize=True, deadline=None, max_examples=150, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("explore", deadline=None, max_examples=2000, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile("explore" if os.environ.get("XENT_HYPOTHESIS") == "explore" else "ci")

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def small_chunks(monkeypatch):
    """Force many tiny chunks so the chunk loop (and its row/column bookkeeping) is exercised."""
    from xent.kernels import portable

    def set_budget(elements: int) -> None:
        monkeypatch.setattr(portable, "CHUNK_ELEMENTS", elements)

    return set_budget
