"""TVM lowerings of the ops in ir/ops/elementwise.py."""

from __future__ import annotations

from tvm import te, topi

from . import LowerCtx, lowers


@lowers("add")
def add(ctx: LowerCtx, a: te.Tensor, b: te.Tensor) -> te.Tensor:
    return topi.add(a, b)


@lowers("sub")
def sub(ctx: LowerCtx, a: te.Tensor, b: te.Tensor) -> te.Tensor:
    return topi.subtract(a, b)


@lowers("mul")
def mul(ctx: LowerCtx, a: te.Tensor, b: te.Tensor) -> te.Tensor:
    return topi.multiply(a, b)


@lowers("relu")
def relu(ctx: LowerCtx, x: te.Tensor) -> te.Tensor:
    return topi.nn.relu(x)
