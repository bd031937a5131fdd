"""one_hot and LabelEncoder: the path from non-integer labels to cross_entropy targets."""

from __future__ import annotations

import enum

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import xent


@pytest.mark.parametrize(
    "labels,num_classes",
    [
        (torch.tensor([0, 2, 1, 0]), 3),
        (torch.tensor([0, 2, 1, 0]), -1),
        (torch.tensor([[1], [2]]), 5),
        (torch.tensor(2), -1),
        (torch.tensor([], dtype=torch.long), 3),
    ],
)
def test_one_hot_matches_torch(labels, num_classes):
    ours, theirs = xent.one_hot(labels, num_classes), F.one_hot(labels, num_classes)
    assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)


@pytest.mark.parametrize(
    "labels,num_classes",
    [
        (torch.tensor([1.0]), -1),
        (torch.tensor([-1]), -1),
        (torch.tensor([5]), 3),
        (torch.tensor([], dtype=torch.long), -1),
    ],
)
def test_one_hot_errors_match_torch(labels, num_classes):
    with pytest.raises(RuntimeError):
        F.one_hot(labels, num_classes)
    with pytest.raises(RuntimeError):
        xent.one_hot(labels, num_classes)


def test_example_strings_to_targets():
    """The 'classes are not integers' example: A, C, B, A -> 0, 2, 1, 0 -> one-hot."""
    enc = xent.LabelEncoder().fit(["A", "C", "B", "A"])
    assert enc.classes_ == ["A", "B", "C"]
    idx = enc.transform(["A", "C", "B", "A"])
    assert torch.equal(idx, torch.tensor([0, 2, 1, 0]))
    assert torch.equal(enc.one_hot(["A", "C", "B", "A"]), torch.tensor([[1, 0, 0], [0, 0, 1], [0, 1, 0], [1, 0, 0]]))
    assert enc.inverse_transform(idx) == ["A", "C", "B", "A"]
    logits = torch.randn(4, 3)
    torch.testing.assert_close(xent.cross_entropy(logits, idx), F.cross_entropy(logits, idx))


def test_round_trip_of_many_label_kinds():
    class Color(enum.Enum):
        RED = 1
        BLUE = 2

    for labels in (
        ["dog", "cat", "bird", "cat"],
        [("a", 1), ("b", 2), ("a", 1)],
        [Color.RED, Color.BLUE],
        [3.5, 1.0, 3.5],
        np.array(["x", "y", "x"]),
        [None, "a", 1],
    ):
        enc = xent.LabelEncoder()
        idx = enc.fit_transform(labels)
        assert idx.dtype == torch.int64 and idx.shape == (len(labels),)
        assert int(idx.max()) == enc.num_classes - 1
        assert enc.inverse_transform(idx) == list(labels.tolist() if isinstance(labels, np.ndarray) else labels)


def test_sorted_when_orderable_first_seen_otherwise():
    assert xent.LabelEncoder().fit(["b", "c", "a"]).classes_ == ["a", "b", "c"]
    assert xent.LabelEncoder().fit([2, "x", 1]).classes_ == [2, "x", 1]


def test_nested_labels_keep_their_shape():
    enc = xent.LabelEncoder().fit(["x", "y", "z"])
    idx = enc.transform([["x", "z"], ["y", "y"]])
    assert torch.equal(idx, torch.tensor([[0, 2], [1, 1]]))
    assert enc.inverse_transform(idx) == [["x", "z"], ["y", "y"]]


def test_unseen_label_is_a_clear_error():
    enc = xent.LabelEncoder().fit(["A", "B"])
    with pytest.raises(ValueError, match="not seen in fit.*'D'"):
        enc.transform(["A", "D"])


def test_unseen_label_can_map_to_ignore_index():
    enc = xent.LabelEncoder(["A", "B"], unknown="ignore")
    idx = enc.transform(["A", "Z", "B"])
    assert torch.equal(idx, torch.tensor([0, -100, 1]))
    assert enc.inverse_transform(idx) == ["A", None, "B"]
    logits = torch.randn(3, 2)
    torch.testing.assert_close(xent.cross_entropy(logits, idx), F.cross_entropy(logits, idx))


def test_fixed_classes_keep_the_given_order():
    enc = xent.LabelEncoder(classes=["neg", "neu", "pos"])
    assert torch.equal(enc.transform(["pos", "neg"]), torch.tensor([2, 0]))
    with pytest.raises(ValueError, match="duplicate"):
        xent.LabelEncoder(classes=["a", "a"])


def test_misuse_errors():
    with pytest.raises(RuntimeError, match="fit"):
        xent.LabelEncoder().transform(["a"])
    with pytest.raises(TypeError, match="single str"):
        xent.LabelEncoder().fit("abc")
    with pytest.raises(TypeError, match="hashable"):
        xent.LabelEncoder().fit([{"a": 1}])
    with pytest.raises(ValueError, match="out of range"):
        xent.LabelEncoder().fit(["a"]).inverse_transform([3])
    with pytest.raises(ValueError, match="unknown"):
        xent.LabelEncoder(unknown="skip")


def test_nan_labels_are_one_class_that_round_trips():
    nan = float("nan")
    enc = xent.LabelEncoder().fit(["b", nan, "a", float("nan")])
    assert enc.num_classes == 3 and enc.classes_[:2] == ["a", "b"] and enc.classes_[2] != enc.classes_[2]
    codes = enc.transform([nan, "a", float("nan")])
    assert codes.tolist() == [2, 0, 2]
    back = enc.inverse_transform(codes)
    assert back[1] == "a" and back[0] != back[0] and back[2] != back[2]


@pytest.mark.parametrize("ignore_index", [0, 1])
def test_ignore_index_that_is_a_class_index_is_refused(ignore_index):
    with pytest.raises(ValueError, match="also the index of class"):
        xent.LabelEncoder(unknown="ignore", ignore_index=ignore_index).fit(["a", "b"])
    with pytest.raises(ValueError, match="also the index of class"):
        xent.LabelEncoder(["a", "b"], unknown="ignore", ignore_index=ignore_index)
    # unknown labels map to a negative ignore_index, never onto a class
    enc = xent.LabelEncoder(unknown="ignore").fit(["a", "b"])
    assert enc.transform(["z", "b"]).tolist() == [-100, 1]
