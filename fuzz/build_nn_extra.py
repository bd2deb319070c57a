"""Fuzz builders for the ops of family 'nn_extra' (ops the generic builders do not cover).

Each builder keeps its node numerically tame: Lp pooling and determinants read operands squashed
to small magnitudes, max_unpool gets indices that a max pool could have produced (one cell of
each input's window, so no two collide), einsum uses equations whose products stay small.
"""

from __future__ import annotations

import numpy as np

from kiln.ir.graph import Value
from kiln.ir.types import TensorType

from .generate import Builder, GenFailed, _divisors, _is_float, _spatial, builder


@builder("group_norm")
def _b_group_norm(b: Builder, x: Value | None) -> Value:
    a = b.image(x)
    c, dt = a.type.shape[1], a.type.dtype
    groups = b.choice(_divisors(c))
    return b.node("group_norm", [a, b.rand_const([c], dt, 0.5, 1.5, "gamma"), b.rand_const([c], dt, -0.5, 0.5, "beta")],
                  num_groups=groups, epsilon=b.choice((1e-5, 1e-3)))


@builder("lp_pool")
def _b_lp_pool(b: Builder, x: Value | None) -> Value:
    a = b.tame(b.image(x), 10.0)
    sp = _spatial(b, a.type.shape[2:])
    return b.node("lp_pool", [a], kernel_shape=sp["kernel"], strides=sp["strides"], pads=sp["pads"],
                  dilations=sp["dilations"], ceil_mode=int(b.chance(0.3)), p=b.choice((1, 2, 2, 3)))


@builder("max_unpool")
def _b_max_unpool(b: Builder, x: Value | None) -> Value:
    """Unpool with kernel = stride = k: each input lands on one cell of its own k-window."""
    a = b.image(x)
    k = b.choice((2, 2, 3))
    n, c, *sp = a.type.shape
    out_sp = [s * k for s in sp]
    if int(np.prod([n, c, *out_sp])) > 512:
        raise GenFailed("max_unpool output too large")
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in sp], indexing="ij"), -1)  # (*sp, nsp)
    cell = grid * k + b.rng.integers(0, k, grid.shape)
    flat_sp = np.ravel_multi_index(tuple(np.moveaxis(cell, -1, 0)), out_sp)
    plane = int(np.prod(out_sp))
    idx = (np.arange(n * c).reshape(n, c, *[1] * len(sp)) * plane + flat_sp).astype(np.int64)
    return b.node("max_unpool", [a, b.const(idx, "idx")], kernel_shape=[k] * len(sp), strides=[k] * len(sp))


@builder("einsum")
def _b_einsum(b: Builder, x: Value | None) -> Value:
    def make() -> Value:
        return b.input(TensorType(b.choice(("f32", "f64")), b.rand_shape(b.randint(2, 3), 64)), "x")
    a = b.tame(b.primary(x, lambda v: _is_float(v) and 2 <= v.type.rank <= 3, make), 10.0)
    shape, dt = a.type.shape, a.type.dtype
    forms = ["ij->ji", "ij->i", "ij->j"] if a.type.rank == 2 else ["bij->bji", "bij->b", "bij->jb"]
    if shape[-1] == shape[-2]:
        forms.append("...ii->...i")
    eq = b.choice(forms + ["contract"] * 2)
    if eq != "contract":
        return b.node("einsum", [a], equation=eq)
    w = b.weight((shape[-1], b.randint(1, 6)), dt, shape[-1])
    return b.node("einsum", [a, w], equation=b.choice(("...ij,jk->...ik", "...ij,jk->...ki")))


@builder("det")
def _b_det(b: Builder, x: Value | None) -> Value:
    def square(v: Value) -> bool:
        return _is_float(v) and v.type.rank >= 2 and v.type.shape[-1] == v.type.shape[-2] \
            and isinstance(v.type.shape[-1], int) and v.type.shape[-1] <= 5

    def make() -> Value:
        m = b.randint(1, 4)
        lead = (b.randint(1, 3),) if b.chance(0.6) else ()
        return b.input(TensorType(b.choice(("f32", "f64")), (*lead, m, m)), "mat")
    return b.node("det", [b.tame(b.primary(x, square, make), 2.0)])
