"""Bad input: xent raises the exception type torch raises, with a message naming the problem.

Each case runs torch and xent on the same arguments; where two things are wrong at once, the case also
pins torch's order (which error wins).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import xent

x = torch.randn(3, 4)
y = torch.tensor([0, 1, 3])
x3 = torch.randn(2, 4, 5)
probs = torch.rand(3, 4)
xi = torch.zeros(3, 4, dtype=torch.long)

# (id, function name, args, kwargs, fragment of xent's message)
CASES = [
    ("target too large", "cross_entropy", (x, torch.tensor([0, 1, 4])), {}, "Target 4 is out of bounds"),
    ("negative target", "cross_entropy", (x, torch.tensor([0, -1, 2])), {}, "Target -1 is out of bounds"),
    ("K-dim target too large", "cross_entropy", (x3, torch.full((2, 5), 7)), {}, "Target 7"),
    ("first bad target is named", "cross_entropy", (x, torch.tensor([0, 8, 9])), {}, "Target 8"),
    (
        "smoothing path, bad target",
        "cross_entropy",
        (x, torch.tensor([0, 1, 9])),
        dict(label_smoothing=0.5),
        "Target 9",
    ),
    ("target int32", "cross_entropy", (x, y.int()), {}, "Long or Byte, but got Int"),
    ("target float, wrong shape", "cross_entropy", (x, y.float()), {}, "but got Float"),
    ("target bool", "cross_entropy", (x, y.bool()), {}, "but got Bool"),
    ("batch mismatch", "cross_entropy", (x, y[:2]), {}, "batch_size (3) to match target batch_size (2)"),
    ("batch before dtype", "cross_entropy", (x, y[:2].int()), {}, "batch_size"),
    ("0-d target for 2-d input", "cross_entropy", (x, torch.tensor(1)), {}, "batch_size"),
    ("2-d target for 2-d input", "cross_entropy", (x, torch.zeros(3, 2, dtype=torch.long)), {}, "multi-target"),
    (
        "K-dim target shape",
        "cross_entropy",
        (x3, torch.zeros(2, 6, dtype=torch.long)),
        {},
        "Expected target size [2, 5], got [2, 6]",
    ),
    ("K-dim target rank", "cross_entropy", (x3, torch.zeros(2, dtype=torch.long)), {}, "Expected target size"),
    ("K-dim batch", "cross_entropy", (x3, torch.zeros(3, 5, dtype=torch.long)), {}, "batch_size (2)"),
    ("unbatched: 2 targets", "cross_entropy", (torch.randn(4), torch.tensor([2, 1])), {}, "must have size 1"),
    (
        "unbatched: dtype before size",
        "cross_entropy",
        (torch.randn(4), torch.tensor([2, 1], dtype=torch.int32)),
        {},
        "Int",
    ),
    ("weight shape", "cross_entropy", (x, y), dict(weight=torch.ones(3)), "all 4 classes"),
    ("weight 2-d", "cross_entropy", (x, y), dict(weight=torch.ones(1, 4)), "shape: [1, 4]"),
    (
        "weight shape before bad target",
        "cross_entropy",
        (x, torch.tensor([0, 1, 9])),
        dict(weight=torch.ones(3)),
        "weight",
    ),
    (
        "weight dtype",
        "cross_entropy",
        (x, y),
        dict(weight=torch.ones(4, dtype=torch.float64)),
        "expected scalar type Float but found Double",
    ),
    (
        "weight dtype before bad target",
        "cross_entropy",
        (x, torch.tensor([0, 1, 9])),
        dict(weight=torch.ones(4).double()),
        "Double",
    ),
    ("weight shape before dtype", "cross_entropy", (x, y), dict(weight=torch.ones(3).double()), "classes"),
    ("target dtype before weight", "cross_entropy", (x, y.int()), dict(weight=torch.ones(3)), "Int"),
    (
        "bf16 input, fp32 weight",
        "cross_entropy",
        (x.bfloat16(), y),
        dict(weight=torch.ones(4)),
        "BFloat16 but found Float",
    ),
    ("label_smoothing > 1", "cross_entropy", (x, y), dict(label_smoothing=1.5), "between 0.0 and 1.0. Got: 1.5"),
    (
        "label_smoothing checked first (index)",
        "cross_entropy",
        (x.long(), y[:2]),
        dict(label_smoothing=2.0),
        "label_smoothing",
    ),
    ("label_smoothing inf", "cross_entropy", (x, y), dict(label_smoothing=float("inf")), "Got: inf"),
    ("invalid reduction", "cross_entropy", (x, y), dict(reduction="avg"), "avg is not a valid value for reduction"),
    ("reduction checked before tensors", "cross_entropy", (x, [1]), dict(reduction="x"), "x is not a valid value"),
    ("reduction None", "cross_entropy", (x, y), dict(reduction=None), "None is not a valid value"),
    ("float ignore_index", "cross_entropy", (x, y), dict(ignore_index=1.0), "ignore_index"),
    ("bool ignore_index", "cross_entropy", (x, y), dict(ignore_index=True), "ignore_index"),
    ("str label_smoothing", "cross_entropy", (x, y), dict(label_smoothing="a"), "label_smoothing"),
    ("input not a tensor", "cross_entropy", ([1.0, 2.0], y), {}, "input"),
    ("target not a tensor", "cross_entropy", (x, [0, 1, 2]), {}, "target"),
    ("weight not a tensor", "cross_entropy", (x, y), dict(weight=[1, 2, 3, 4]), "weight"),
    ("integer input", "cross_entropy", (x.long(), y), {}, "floating point"),
    ("int32 input", "cross_entropy", (x.int(), y), {}, "floating point"),
    ("bool input", "cross_entropy", (x.bool(), y), {}, "floating point"),
    ("integer input before target checks", "cross_entropy", (x.long(), y.int()), {}, "floating point"),
    ("0-d input, index target", "cross_entropy", (torch.tensor(1.0), torch.tensor([0])), {}, "0-d"),
    ("probabilities: integer target", "cross_entropy", (x, xi), {}, "Expected floating point type for target"),
    (
        "probabilities: ignore_index >= 0",
        "cross_entropy",
        (x, probs),
        dict(ignore_index=1),
        "ignore_index is not supported",
    ),
    ("probabilities: ignore_index 0", "cross_entropy", (x, probs), dict(ignore_index=0), "ignore_index"),
    ("probabilities: weight shape", "cross_entropy", (x, probs), dict(weight=torch.ones(3)), "weight tensor"),
    ("probabilities: label_smoothing", "cross_entropy", (x, probs), dict(label_smoothing=2.0), "Got: 2"),
    ("probabilities: dtype before ignore_index", "cross_entropy", (x, xi), dict(ignore_index=3), "floating point"),
    (
        "probabilities: ignore_index before smoothing",
        "cross_entropy",
        (x, probs),
        dict(ignore_index=3, label_smoothing=1.5),
        "ignore_index",
    ),
    (
        "probabilities: weight before smoothing",
        "cross_entropy",
        (x, probs),
        dict(weight=torch.ones(3), label_smoothing=1.5),
        "weight",
    ),
    ("probabilities: integer input", "cross_entropy", (x.long(), probs), {}, "floating point"),
    (
        "probabilities: weight before input dtype",
        "cross_entropy",
        (x.long(), probs),
        dict(weight=torch.ones(3)),
        "weight",
    ),
    ("probabilities: 0-d", "cross_entropy", (torch.tensor(1.0), torch.tensor(0.5)), {}, "0-d"),
    ("nll: bad target", "nll_loss", (x, torch.tensor([0, 1, 4])), {}, "Target 4"),
    ("nll: target dtype", "nll_loss", (x, y.int()), {}, "Int"),
    ("nll: batch", "nll_loss", (x, y[:2]), {}, "batch_size"),
    ("nll: 0-d input", "nll_loss", (torch.tensor(1.0), torch.tensor(0)), {}, "1 or more dimensions"),
    ("nll: 2-d target", "nll_loss", (x, probs), {}, "multi-target"),
    ("nll: weight shape", "nll_loss", (x, y), dict(weight=torch.ones(3)), "classes"),
    ("nll: weight dtype", "nll_loss", (x, y), dict(weight=torch.ones(4).double()), "Double"),
    ("nll: integer input", "nll_loss", (x.long(), torch.tensor([0, 1, 9])), {}, "floating point"),
    ("nll: batch before input dtype", "nll_loss", (x.long(), y[:2]), {}, "batch_size"),
    ("nll: weight before input dtype", "nll_loss", (x.long(), y), dict(weight=torch.ones(3)), "weight"),
    ("nll: K-dim target shape", "nll_loss", (x3, torch.zeros(2, 6, dtype=torch.long)), {}, "[2, 5]"),
    ("nll: unbatched size", "nll_loss", (torch.randn(4), torch.zeros(2, dtype=torch.long)), {}, "size 1"),
    ("nll: invalid reduction", "nll_loss", (x, y), dict(reduction="x"), "x is not a valid value"),
    ("nll: label_smoothing is not an argument", "nll_loss", (x, y), dict(label_smoothing=0.1), "label_smoothing"),
    ("nll: float ignore_index", "nll_loss", (x, y), dict(ignore_index=1.5), "ignore_index"),
]


_TORCH_VERSION = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_same_exception_type_as_torch(case):
    label, name, args, kwargs, fragment = case
    if label == "unbatched: dtype before size" and _TORCH_VERSION < (2, 13):
        # xent follows torch 2.13, which checks the target's dtype first; 2.11 (a GPU image's) its size
        pytest.skip(f"torch {torch.__version__} checks an unbatched target's size before its dtype")
    with pytest.raises(Exception) as theirs:
        getattr(F, name)(*args, **kwargs)
    with pytest.raises(Exception) as ours:
        getattr(xent, name)(*args, **kwargs)
    assert type(ours.value) is type(theirs.value), (ours.value, theirs.value)
    assert fragment in str(ours.value), (str(ours.value), str(theirs.value))


def test_legacy_size_average_and_reduce_warn_like_torch():
    for size_average, reduce, expected in [(False, None, "sum"), (None, False, "none"), (True, True, "mean")]:
        with warnings.catch_warnings(record=True) as ours:
            warnings.simplefilter("always")
            a = xent.cross_entropy(x, y, size_average=size_average, reduce=reduce, reduction="sum")
        with warnings.catch_warnings(record=True) as theirs:
            warnings.simplefilter("always")
            b = F.cross_entropy(x, y, size_average=size_average, reduce=reduce, reduction="sum")
        torch.testing.assert_close(a, b)
        assert [str(w.message) for w in ours] == [str(w.message) for w in theirs]
        assert f"reduction='{expected}'" in str(ours[0].message)
        assert ours[0].category is UserWarning


def test_elementwise_mean_is_mean_with_a_warning():
    with pytest.warns(UserWarning, match="elementwise_mean"):
        a = xent.cross_entropy(x, y, reduction="elementwise_mean")
    torch.testing.assert_close(a, F.cross_entropy(x, y))


@pytest.mark.parametrize("ignore_index", [np.int64(1), torch.tensor(1)])
def test_integer_like_ignore_index_is_accepted(ignore_index):
    torch.testing.assert_close(
        xent.cross_entropy(x, y, ignore_index=ignore_index), F.cross_entropy(x, y, ignore_index=ignore_index)
    )


@pytest.mark.parametrize("eps", [-0.5, float("nan"), 1e-20, 1, torch.tensor(0.1)])
def test_label_smoothing_values_torch_accepts(eps):
    torch.testing.assert_close(
        xent.cross_entropy(x, y, label_smoothing=eps), F.cross_entropy(x, y, label_smoothing=eps)
    )


def test_target_on_another_device_is_an_error():
    with pytest.raises(RuntimeError, match="same device"):
        xent.cross_entropy(x, y.to("meta"))
