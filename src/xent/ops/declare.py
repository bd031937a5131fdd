"""One declaration per custom-op family: its schema, fake, backward op and traced autograd.

A family's arguments are written once, as a frozen dataclass whose annotated fields are the op's
arguments in schema order. A field that is itself a dataclass (``problems.Options``) is spread into its
own fields, so an option added to ``Options`` reaches every op that carries it without another list.
From that declaration, ``OpFamily`` makes:

* ``xent::<name>``: the schema follows from the field types; ``impl(args)`` and ``fake(args)`` get the
  arguments back as the dataclass and return the outputs in the order of ``outputs``;
* ``xent::<name>_backward`` (with ``backward_impl``): the family's arguments, then the fields of
  ``backward_args`` (upstream gradients, saved outputs) and a ``want_<field>`` flag per differentiable
  field; it returns one gradient per differentiable field (an empty tensor where not wanted), and its
  fake follows from those fields' shapes and dtypes;
* autograd for the traced route (with ``backward``), registered through ``torch.library``: ``save``
  names the tensors backward needs, ``backward(args, grads, want)`` returns gradients by field name.

Autograd code therefore reads every argument and output by name; nothing picks them by position.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

# Python annotation -> schema type. int is SymInt, as torch infers it for custom ops (sizes may be symbolic).
_SCHEMA = {
    Tensor: "Tensor",
    int: "SymInt",
    float: "float",
    bool: "bool",
    str: "str",
    torch.dtype: "ScalarType",
}


def _schema_type(tp) -> str:
    """The schema spelling of a field annotation: T, T | None, tuple[str, ...]."""
    args = typing.get_args(tp)
    if type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return _schema_type(inner) + "?"
    if typing.get_origin(tp) is tuple and args[1:] == (Ellipsis,):
        return _schema_type(args[0]) + "[]"
    if tp not in _SCHEMA:
        raise TypeError(f"no custom-op schema type for the annotation {tp!r}")
    return _SCHEMA[tp]


@dataclass(frozen=True)
class _Field:
    name: str
    schema: str


@functools.cache
def _annotations(cls: type) -> tuple[tuple[str, object], ...]:
    """(name, resolved annotation) of cls's fields, in order (resolved once per class: calls rebuild often)."""
    hints = typing.get_type_hints(cls)
    return tuple((f.name, hints[f.name]) for f in dataclasses.fields(cls))


def _fields(cls: type) -> list[_Field]:
    """cls's fields flattened (nested dataclasses spread), in declaration order."""
    out = []
    for name, tp in _annotations(cls):
        out += _fields(tp) if dataclasses.is_dataclass(tp) else [_Field(name, _schema_type(tp))]
    return out


def _build(cls: type, values: dict):
    """An instance of cls from the flat values by name (nested dataclasses rebuilt; lists back to tuples)."""
    kwargs = {}
    for name, tp in _annotations(cls):
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, values)
        else:
            v = values[name]
            kwargs[name] = tuple(v) if isinstance(v, list) else v
    return cls(**kwargs)


def as_flat_dict(obj) -> dict:
    """A declared dataclass's values by flat field name (nested dataclasses spread)."""
    out = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            out.update(as_flat_dict(v))
        else:
            out[f.name] = v
    return out


def _flatten(obj) -> list:
    return list(as_flat_dict(obj).values())


def with_values(obj, **values):
    """obj with the given flat fields replaced (nested dataclasses rebuilt)."""
    return _build(type(obj), {**as_flat_dict(obj), **values})


def without_tensors(args):
    """args with every tensor field set to None: what autograd keeps outside save_for_backward."""
    return with_values(args, **{k: None for k, v in as_flat_dict(args).items() if isinstance(v, Tensor)})


class OpFamily:
    """A custom op declared once (see the module docstring).

    Args:
        name: the op's name in the ``xent`` namespace.
        args: the frozen dataclass of the op's arguments.
        outputs: the names of the op's tensor outputs, in order.
        impl, fake: ``(args) -> tuple of outputs``: the computation, and its shapes and dtypes only.
        differentiable: the tensor fields of ``args`` that get gradients.
        backward_args: the dataclass of the backward op's extra arguments.
        backward_impl: ``(args, extra, want) -> {field: gradient or None}``, ``want`` by field name.
        save: ``(args, outputs) -> {name: tensor or None}``: what the traced backward needs, by name. An
            argument's name puts the tensor back into the ``args`` that backward sees (autograd keeps
            no other tensor of them); every saved tensor is also in ``ctx.saved``.
        backward: ``(ctx) -> {field: gradient}``, ctx a ``BackwardContext``.
        mutates: the argument names the op writes to.
        differentiable_outputs: the outputs that carry gradients (default: the first); the others are
            marked non-differentiable.
    """

    def __init__(
        self,
        name: str,
        args: type,
        outputs: tuple[str, ...],
        impl: Callable,
        fake: Callable,
        *,
        differentiable: tuple[str, ...] = (),
        backward_args: type | None = None,
        backward_impl: Callable | None = None,
        save: Callable | None = None,
        backward: Callable | None = None,
        mutates: tuple[str, ...] = (),
        differentiable_outputs: tuple[str, ...] | None = None,
    ):
        self.name, self.args_type, self.outputs = name, args, outputs
        self.differentiable = differentiable
        self.differentiable_outputs = differentiable_outputs if differentiable_outputs is not None else outputs[:1]
        self.fields = _fields(args)
        names = [f.name for f in self.fields]
        if len(set(names)) != len(names):
            raise TypeError(f"xent::{name}: argument names repeat across nested dataclasses: {names}")
        self.op = self._define(
            name,
            self.fields,
            outputs,
            lambda flat: impl(self.args_from(flat)),
            lambda flat: fake(self.args_from(flat)),
            mutates,
        )
        self.backward_op = None  # (args, extra, want) -> gradients by field name, when declared
        self.backward_overload = None  # torch.ops.xent.<name>_backward.default
        if backward_impl is not None:
            self._declare_backward(backward_args, backward_impl)
        if backward is not None:
            self._register_autograd(save, backward)

    # -- arguments ------------------------------------------------------------------------------------

    def args_from(self, flat) -> object:
        """The arguments as the dataclass; trailing optional ones left out (see _define) are None."""
        flat = tuple(flat) + (None,) * (len(self.fields) - len(flat))
        return _build(self.args_type, dict(zip((f.name for f in self.fields), flat)))

    def arguments(self, args) -> tuple:
        """The op's positional arguments for `args` (what torch.ops.xent.<name> takes; opcheck uses it)."""
        return tuple(_flatten(args))

    def backward_arguments(self, args, extra, want: dict) -> tuple:
        """The backward op's positional arguments."""
        flat = _flatten(args) + (_flatten(extra) if extra is not None else [])
        return (*flat, *(bool(want[d]) for d in self.differentiable))

    def __call__(self, args) -> dict[str, Tensor]:
        """The op on `args` (autograd included where declared): its outputs by name."""
        out = self.op(*_flatten(args))
        return dict(zip(self.outputs, out if isinstance(out, (tuple, list)) else (out,)))

    # -- definition -----------------------------------------------------------------------------------

    @staticmethod
    def _define(name, fields, outputs, impl, fake, mutates=()):
        # The trailing optional arguments default to None: functionalization (a mutating op under compile)
        # passes the arguments by name and leaves the None ones out. (Only trailing ones may have defaults.)
        trailing = len(fields)
        while trailing and fields[trailing - 1].schema.endswith("?"):
            trailing -= 1
        params = ", ".join(
            f"{f.schema}{'(a!)' if f.name in mutates else ''} {f.name}".replace("?(a!)", "(a!)?")
            + ("=None" if k >= trailing else "")
            for k, f in enumerate(fields)
        )
        returns = (
            "()" if not outputs else "Tensor" if len(outputs) == 1 else f"({', '.join(['Tensor'] * len(outputs))})"
        )
        schema = f"({params}) -> {returns}"

        def shaped(out):  # the schema's return: nothing, one tensor, or a tuple
            if not outputs:
                return None
            if isinstance(out, Tensor):
                return out
            return out[0] if len(outputs) == 1 else tuple(out)

        def run(*flat):
            return shaped(impl(flat))

        def run_fake(*flat):
            return shaped(fake(flat))

        op = torch.library.custom_op(f"xent::{name}", run, mutates_args=tuple(mutates), schema=schema)
        op.register_fake(run_fake)
        return getattr(torch.ops.xent, name).default

    def _declare_backward(self, backward_args: type | None, backward_impl: Callable) -> None:
        extra = _fields(backward_args) if backward_args is not None else []
        wants = [_Field(f"want_{d}", "bool") for d in self.differentiable]
        fields = self.fields + extra
        n_args, n_extra = len(self.fields), len(extra)

        def split(flat):
            args = self.args_from(flat[:n_args])
            more = (
                _build(backward_args, dict(zip((f.name for f in extra), flat[n_args : n_args + n_extra])))
                if backward_args is not None
                else None
            )
            want = dict(zip(self.differentiable, flat[n_args + n_extra :]))
            return args, more, want

        def impl(flat):
            args, more, want = split(flat)
            grads = backward_impl(args, more, want)  # an unwanted gradient is an empty tensor, as the fake's
            return tuple(self._grad_or_empty(args, d, grads.get(d) if want[d] else None) for d in self.differentiable)

        def fake(flat):
            args, _, want = split(flat)
            values = as_flat_dict(args)
            return tuple(
                values[d].new_empty(values[d].shape) if want[d] and values[d] is not None else self._empty(args)
                for d in self.differentiable
            )

        outputs = tuple(f"grad_{d}" for d in self.differentiable)
        op = self._define(f"{self.name}_backward", fields + wants, outputs, impl, fake)
        self.backward_overload = op

        def call(args, more, want: dict) -> dict[str, Tensor | None]:
            out = op(*self.backward_arguments(args, more, want))
            out = out if isinstance(out, (tuple, list)) else (out,)
            return {d: g if want[d] else None for d, g in zip(self.differentiable, out)}

        self.backward_op = call

    def _empty(self, args) -> Tensor:
        values = as_flat_dict(args)
        return next(values[f.name] for f in self.fields if f.schema == "Tensor").new_empty(0)

    def _grad_or_empty(self, args, name: str, grad: Tensor | None) -> Tensor:
        return grad if grad is not None else self._empty(args)

    # -- autograd -------------------------------------------------------------------------------------

    def _register_autograd(self, save: Callable | None, backward: Callable) -> None:
        positions = {f.name: k for k, f in enumerate(self.fields)}
        arg_names = set(positions)

        def setup_context(ctx, inputs, output) -> None:
            args = self.args_from(inputs)
            out = output if isinstance(output, (tuple, list)) else (output,)
            outs = dict(zip(self.outputs, out))
            kept = save(args, outs) if save is not None else {}
            ctx.saved_names = tuple(kept)
            ctx.save_for_backward(*kept.values())
            ctx.args = without_tensors(args)
            frozen = [outs[n] for n in self.outputs if n not in self.differentiable_outputs]
            if frozen:
                ctx.mark_non_differentiable(*frozen)

        def run_backward(ctx, *grads):
            kept = dict(zip(ctx.saved_names, ctx.saved_tensors))
            args = with_values(ctx.args, **{k: v for k, v in kept.items() if k in arg_names})
            want = {d: ctx.needs_input_grad[positions[d]] for d in self.differentiable}
            bctx = BackwardContext(args, dict(zip(self.outputs, grads)), want, kept, self)
            by_name = backward(bctx)
            return tuple(by_name.get(f.name) if f.name in self.differentiable else None for f in self.fields)

        torch.library.register_autograd(f"xent::{self.name}", run_backward, setup_context=setup_context)


@dataclass
class BackwardContext:
    """What a declared family's traced backward sees, all by name: the arguments (tensors as saved), the
    gradients of its outputs, which differentiable fields want a gradient, what `save` kept, and the
    family (for its backward op: ``ctx.backward_op(extra)``)."""

    args: object
    grads: dict
    want: dict
    saved: dict
    family: OpFamily

    def grad_or_zeros(self, output: str, num_rows: int, dtype: torch.dtype, device) -> Tensor:
        """The gradient of `output`, or zeros of (num_rows,) where autograd passes None (an unused output)."""
        g = self.grads[output]
        return g if g is not None else torch.zeros(num_rows, dtype=dtype, device=device)

    def backward_op(self, extra=None, want: dict | None = None) -> dict:
        return self.family.backward_op(self.args, extra, want if want is not None else self.want)


@dataclass(frozen=True)
class Upstream:
    """The backward op's extra argument of a family whose backward needs only the loss's gradient."""

    upstream: Tensor
