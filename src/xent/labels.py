"""Targets from labels that are not integers: the "map the classes to integers" step of a classification pipeline.

`LabelEncoder` maps any hashable labels (strings, enums, tuples, ...) to the contiguous class indices
cross_entropy expects, and back; `one_hot` turns indices into one-hot rows (e.g. to build probability
targets).

    >>> enc = xent.LabelEncoder().fit(["cat", "dog", "bird", "dog"])
    >>> enc.classes_
    ['bird', 'cat', 'dog']
    >>> enc.transform(["dog", "cat"])
    tensor([2, 1])
    >>> enc.inverse_transform(torch.tensor([0, 2]))
    ['bird', 'dog']
"""

from __future__ import annotations

import numbers
from collections.abc import Hashable, Iterable
from typing import Any

import torch
from torch import Tensor

from .checks import as_index


def one_hot(input: Tensor, num_classes: int = -1) -> Tensor:
    """One-hot encode int64 class indices: shape (*input.shape, num_classes), dtype int64.

    Same contract as torch.nn.functional.one_hot (argument names included): ``num_classes=-1`` infers
    ``input.max() + 1``; negative or too-large classes raise RuntimeError. On meta tensors, as torch, the
    values are not checked (there are none) and ``num_classes`` must be given.
    """
    if not isinstance(input, Tensor):
        raise TypeError(f"one_hot(): argument 'input' must be Tensor, not {type(input).__name__}")
    if input.dtype != torch.int64:
        raise RuntimeError("one_hot is only applicable to index tensor of type LongTensor.")
    num_classes = as_index(num_classes, "num_classes", "one_hot")
    if num_classes < -1:
        raise RuntimeError(f"num_classes should be -1 (infer) or non-negative, got {num_classes}")
    if input.device.type == "meta":
        if num_classes == -1:
            raise RuntimeError("Tensor.item() cannot be called on meta tensors")
    elif input.numel() == 0:
        if num_classes == -1:
            raise RuntimeError("Can not infer total number of classes from empty tensor.")
    else:
        lo, hi = int(input.min()), int(input.max())
        if lo < 0:
            raise RuntimeError(f"Class values must be non-negative. Got {lo}.")
        if num_classes == -1:
            num_classes = hi + 1
        elif hi >= num_classes:
            raise RuntimeError(
                f"Class values must be smaller than num_classes. Got {hi} for num_classes={num_classes}."
            )
    out = torch.zeros(*input.shape, num_classes, dtype=torch.int64, device=input.device)
    return out.scatter_(-1, input.unsqueeze(-1), 1)


_NAN = object()  # the one key of every NaN label (NaN != NaN, and NaN objects hash apart)


def _key(label: Any) -> Any:
    """The dictionary key of a label: itself, except that all NaNs are one label."""
    if isinstance(label, float | numbers.Real) and not isinstance(label, bool | int):
        try:
            if label != label:
                return _NAN
        except (TypeError, ValueError):
            pass
    return label


class LabelEncoder:
    """Maps hashable labels to class indices 0..C-1 and back.

    Args:
        classes: fix the classes (and their order) up front instead of learning them with `fit`.
        unknown: what `transform` does with a label it has not seen: ``'error'`` (ValueError, the default)
            or ``'ignore'`` (map it to ``ignore_index`` so cross_entropy skips that sample).
        ignore_index: the index used for unknown labels with ``unknown='ignore'``. Default: -100.

    `fit` sorts the classes when they are mutually orderable (as scikit-learn does) and keeps their order
    of first appearance otherwise. Lists (and arrays/tensors) are containers; tuples and strings are labels.
    """

    def __init__(
        self, classes: Iterable[Hashable] | None = None, *, unknown: str = "error", ignore_index: int = -100
    ) -> None:
        if unknown not in ("error", "ignore"):
            raise ValueError(f"unknown must be 'error' or 'ignore', got {unknown!r}")
        self.unknown = unknown
        self.ignore_index = as_index(ignore_index, "ignore_index", "LabelEncoder")
        self.classes_: list | None = None
        self._index: dict = {}
        if classes is not None:
            self._set_classes(list(_flatten(classes)[0]), check_unique=True)

    # -- learning the classes ------------------------------------------------------------------------
    def fit(self, labels: Any) -> LabelEncoder:
        flat, _ = _flatten(labels)
        for label in flat:
            _check_hashable(label)
        seen: dict = {}
        for label in flat:
            seen.setdefault(_key(label), label)  # in order of first appearance
        distinct = list(seen.values())
        nans = [label for label in distinct if _key(label) is _NAN]
        distinct = [label for label in distinct if _key(label) is not _NAN]
        try:
            distinct = sorted(distinct)
        except TypeError:
            pass  # labels of mixed, unorderable types keep their order of first appearance
        self._set_classes(distinct + nans, check_unique=False)  # NaN, unorderable, is one class, last
        return self

    def _set_classes(self, classes: list, check_unique: bool) -> None:
        for label in classes:
            _check_hashable(label)
        index = {_key(label): i for i, label in enumerate(classes)}
        if check_unique and len(index) != len(classes):
            raise ValueError("classes contains duplicate labels")
        if self.unknown == "ignore" and 0 <= self.ignore_index < len(classes):
            raise ValueError(
                f"ignore_index={self.ignore_index} is also the index of class {classes[self.ignore_index]!r}: "
                f"unknown labels would be merged into it; use a negative ignore_index (the default -100)"
            )
        self.classes_, self._index = classes, index

    @property
    def num_classes(self) -> int:
        return len(self._fitted())

    # -- mapping -------------------------------------------------------------------------------------
    def transform(self, labels: Any) -> Tensor:
        """Class indices (int64) of `labels`, in the shape of the (possibly nested) input."""
        self._fitted()
        flat, shape = _flatten(labels)
        indices = []
        unseen = []
        for label in flat:
            _check_hashable(label)
            i = self._index.get(_key(label))
            if i is None:
                if self.unknown == "error":
                    unseen.append(label)
                    continue
                i = self.ignore_index
            indices.append(i)
        if unseen:
            raise ValueError(
                f"labels not seen in fit: {sorted(set(map(repr, unseen)))}; known classes: {self.classes_!r}"
            )
        return torch.tensor(indices, dtype=torch.int64).reshape(shape)

    def fit_transform(self, labels: Any) -> Tensor:
        return self.fit(labels).transform(labels)

    def inverse_transform(self, indices: Any) -> list:
        """Labels of class indices (a tensor or nested lists of ints), as nested lists.

        With ``unknown='ignore'``, ``ignore_index`` maps back to None.
        """
        classes = self._fitted()
        flat, shape = _flatten(indices)
        out = []
        for i in flat:
            i = as_index(i, "indices", "inverse_transform")
            if self.unknown == "ignore" and i == self.ignore_index:
                out.append(None)
            elif 0 <= i < len(classes):
                out.append(classes[i])
            else:
                raise ValueError(f"class index {i} is out of range for {len(classes)} classes")
        return _unflatten(out, shape)

    def one_hot(self, labels: Any) -> Tensor:
        """One-hot rows of `labels`, (*shape, num_classes): e.g. to build probability targets."""
        return one_hot(self.transform(labels), self.num_classes)

    def _fitted(self) -> list:
        if self.classes_ is None:
            raise RuntimeError("this LabelEncoder has no classes yet: call fit() or pass classes=")
        return self.classes_

    def __repr__(self) -> str:
        n = "unfitted" if self.classes_ is None else f"{len(self.classes_)} classes"
        return f"LabelEncoder({n}, unknown={self.unknown!r})"


def _check_hashable(label: Any) -> None:
    try:
        hash(label)
    except TypeError:
        raise TypeError(f"labels must be hashable, got {type(label).__name__}: {label!r}") from None


def _flatten(labels: Any) -> tuple[list, tuple]:
    """Flatten nested lists / arrays / tensors of labels, returning the items and the nesting shape."""
    if isinstance(labels, Tensor):
        return labels.reshape(-1).tolist(), tuple(labels.shape)
    if hasattr(labels, "tolist") and not isinstance(labels, (str, bytes)):  # numpy arrays, pandas series
        labels = labels.tolist()
        if not isinstance(labels, list):  # a 0-d array
            return [labels], ()
    if isinstance(labels, (str, bytes, tuple)) or not isinstance(labels, Iterable):
        raise TypeError(
            f"expected a list (or array/tensor) of labels, got a single {type(labels).__name__}; wrap it in a list"
        )
    labels = list(labels)
    if labels and all(isinstance(x, list) for x in labels):
        parts = [_flatten(x) for x in labels]
        inner = {shape for _, shape in parts}
        if len(inner) != 1:
            raise ValueError("nested label lists must be rectangular")
        return [item for flat, _ in parts for item in flat], (len(labels),) + inner.pop()
    return labels, (len(labels),)


def _unflatten(items: list, shape: tuple) -> Any:
    if not shape:
        return items[0]
    if len(shape) == 1:
        return items
    step = len(items) // shape[0] if shape[0] else 0
    return [_unflatten(items[i * step : (i + 1) * step], shape[1:]) for i in range(shape[0])]
