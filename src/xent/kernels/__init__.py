"""Compute backends. Each takes a validated Problem and only computes.

`portable` (plain torch ops, any device) is the reference backend and the only one so far.
"""

from __future__ import annotations

from typing import Callable

from .._validate import Problem
from . import portable

Forward = Callable[..., tuple]


def forward_for(problem: Problem) -> Forward:
    """The cross-entropy forward that serves this problem: (problem, need_grad) -> (loss, grad or None)."""
    return portable.cross_entropy_forward
