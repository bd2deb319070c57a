"""TVM lowerings of kiln's ops: one TE compute per op, attached to its registry entry.

A lowering is ``fn(ctx, *inputs, **attrs) -> te.Tensor | tuple[te.Tensor, ...]``:
``inputs`` are TE placeholders with the operands' static shapes and dtypes
(``None`` for an absent optional operand), ``attrs`` the node's complete
attributes.  Through ``ctx`` it reads constant operands at compile time
(``ctx.const(i)``), swaps a constant operand for a compile-time transformed one
(``ctx.replace_const(i, array)``: packed weights) and names the schedule its
kernel gets (``ctx.kind``, ``ctx.block``, ``ctx.schedule_kwargs``; kinds as in
:func:`kiln.codegen.schedules.schedule_for`).

The modules below mirror ``ir/ops``; importing this package registers them all
(:func:`kiln.ir.registry.set_lowering`), so ``get_op(name).lower_tvm`` is the
lowering of op ``name``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tvm import te
from tvm.target import Target

from kiln.ir.graph import Node
from kiln.ir.registry import set_lowering

__all__ = ["LowerCtx", "lowers", "tvm_dtype"]


def tvm_dtype(dtype: str) -> str:
    """TVM's name of a kiln dtype (``f32`` -> ``float32``, ``bool`` -> ``bool``)."""
    from kiln.ir.types import to_numpy_dtype

    np_dt = to_numpy_dtype(dtype)
    return "bool" if np_dt == np.bool_ else str(np_dt)


def shape_of(t: te.Tensor) -> tuple[int, ...]:
    """A TE tensor's (static) shape as ints."""
    return tuple(int(d) for d in t.shape)


@dataclass
class LowerCtx:
    """What a lowering sees besides its TE inputs, and what it tells the kernel builder."""

    node: Node
    target: Target
    consts: dict[int, np.ndarray] = field(default_factory=dict)
    kind: str = "injective"
    block: str | None = None
    schedule_kwargs: dict[str, Any] = field(default_factory=dict)
    replaced: dict[int, tuple[np.ndarray, te.Tensor] | tuple[None, None]] = field(default_factory=dict)

    def const(self, i: int) -> np.ndarray | None:
        """Operand ``i``'s value when it is a compile-time constant, else None."""
        return self.consts.get(i)

    def replace_const(self, i: int, array: np.ndarray, name: str = "w_packed") -> te.Tensor:
        """Feed ``array`` (computed at compile time from constant operand ``i``) in its place."""
        if i not in self.consts:
            raise ValueError(f"{self.node.op}: operand {i} is not a constant")
        array = np.require(array, requirements="C")
        ph = te.placeholder(array.shape, str(array.dtype), name=name)
        self.replaced[i] = (array, ph)
        return ph

    def drop_const(self, i: int) -> None:
        """Constant operand ``i`` is not read (the lowering folded it at compile time): pass nothing for it."""
        if i not in self.consts:
            raise ValueError(f"{self.node.op}: operand {i} is not a constant")
        self.replaced[i] = (None, None)


def lowers(*names: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register the decorated function as the TVM lowering of ops ``names``."""
    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        for name in names:
            set_lowering(name, fn)
        return fn
    return deco


def _load() -> None:
    from . import (  # noqa: F401
        dtypes,
        elementwise,
        image,
        index,
        math,
        nn,
        nn_extra,
        quant,
        recurrent,
        reduce,
        signal,
        tensor,
        transformer,
    )


_load()
