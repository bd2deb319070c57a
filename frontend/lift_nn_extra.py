"""ONNX converters for the ops of family 'nn_extra' that the generic registry lifting cannot express.

* GroupNormalization: version 21 maps to ``group_norm``; versions 18-20 took scale and bias per
  group, which are repeated per channel here.
* LpPool: ``auto_pad`` resolved to pads (as for the other pools); LpPool-1's float ``p`` must be
  an integer.
* LpNormalization, MeanVarianceNormalization and GlobalLpPool are written with existing ops
  (exact, and as fast: reductions with elementwise epilogues that ``fuse-blocks`` joins).
* Einsum: contracted pairwise, left to right, into transpose/reshape/matmul (kiln's packed and
  batched matmul kernels) with ``reduce_sum`` for labels summed inside one operand; an equation
  that needs a diagonal (a label repeated in one operand), symbolic dims, or broadcasting over a
  contracted label stays one general ``einsum`` node.
* NonMaxSuppression is refused: its output has a data-dependent number of rows, and kiln's values
  have static shapes (a padded upper-bound buffer would change the output's meaning and shape for
  every consumer). With all inputs constant the lifter folds it with ``onnx.reference``.
"""

from __future__ import annotations

import math

import numpy as np

from kiln.ir.graph import Value
from kiln.ir.ops.nn_extra import einsum_dims, parse_einsum
from kiln.ir.registry import OpTypeError

from .lift import _check_only, _Ctx, _Refuse, _special, pool_window


def _result(ctx: _Ctx, v: Value) -> Value:
    """``v`` as the node's output 0 (an identity only where a graph output would alias another value)."""
    if ctx.outs[0] in ctx.lifter.graph_outputs and v.name != ctx.outs[0]:
        return ctx.op("identity", [v], out=0)
    return v


# ------------------------------------------------------------------ normalization

@_special("GroupNormalization", needs=("group_norm", "reshape", "expand"), since=21)
def _group_norm(ctx: _Ctx) -> list[Value | None]:
    x, scale, bias = ctx.x(0), ctx.x(1), ctx.x(2)
    _check_only(ctx, ("num_groups", "epsilon", "stash_type"))  # kiln computes in float64 anyway
    groups = int(ctx.attr("num_groups"))
    c = x.type.shape[1] if x.type.rank >= 2 else None
    if ctx.opset < 21:
        if not isinstance(c, int) or groups < 1 or c % groups:
            raise _Refuse(f"GroupNormalization-18 needs a static channel count divisible by num_groups "
                          f"({groups}) to repeat its per-group scale and bias, got {x.type}")
        scale, bias = (_per_channel(ctx, p, groups, c // groups) for p in (scale, bias))
    attrs = {"num_groups": groups, "epsilon": float(ctx.attr("epsilon", 1e-5))}
    return [ctx.op("group_norm", [x, scale, bias], attrs, out=0)]


def _per_channel(ctx: _Ctx, p: Value, groups: int, size: int) -> Value:
    """A per-group parameter (G) repeated ``size`` times each: (G * size)."""
    if p.type.rank != 1 or p.type.shape[0] != groups:
        raise _Refuse(f"GroupNormalization-18's scale/bias must have num_groups={groups} entries, got {p.type}")
    if p.is_const:
        return ctx.const(np.repeat(p.const, size))
    col = ctx.op("reshape", [p], {"shape": [groups, 1]})
    return ctx.op("reshape", [ctx.op("expand", [col], {"shape": [groups, size]})], {"shape": [groups * size]})


@_special("LpNormalization", needs=("reduce_l2", "reduce_sum", "abs", "div", "where", "equal"))
def _lp_normalization(ctx: _Ctx) -> list[Value | None]:
    """x / ||x||_p along ``axis`` (p = 1 or 2); a zero norm gives 0, as ONNX Runtime does."""
    x = ctx.x()
    p, axis = int(ctx.attr("p", 2)), int(ctx.attr("axis", -1))
    if p not in (1, 2):
        raise _Refuse(f"p={p}; LpNormalization defines only p = 1 and p = 2")
    if p == 2:
        norm = ctx.op("reduce_l2", [x], {"axes": [axis], "keepdims": 1})
    else:
        norm = ctx.op("reduce_sum", [ctx.op("abs", [x])], {"axes": [axis], "keepdims": 1})
    safe = ctx.op("where", [ctx.op("equal", [norm, ctx.scalar(0, norm)]), ctx.scalar(1, norm), norm])
    return [ctx.op("div", [x, safe], out=0)]


@_special("MeanVarianceNormalization", needs=("reduce_mean", "sub", "mul", "sqrt", "add", "div"))
def _mvn(ctx: _Ctx) -> list[Value | None]:
    """(x - mean) / (sqrt(var) + 1e-9) over ``axes`` (ONNX's function body; the variance is taken
    of the centred values, which equals its E[x^2] - E[x]^2 and cannot go negative)."""
    x = ctx.x()
    axes = [int(a) for a in ctx.attr("axes", [0, 2, 3])]
    d = ctx.op("sub", [x, ctx.op("reduce_mean", [x], {"axes": axes, "keepdims": 1})])
    var = ctx.op("reduce_mean", [ctx.op("mul", [d, d])], {"axes": axes, "keepdims": 1})
    std = ctx.op("add", [ctx.op("sqrt", [var]), ctx.scalar(1e-9, x)])
    return [ctx.op("div", [d, std], out=0)]


def _int_p(ctx: _Ctx) -> int:
    p = ctx.attr("p", 2)
    if float(p) != int(p) or int(p) < 1:
        raise _Refuse(f"p={p}; kiln's Lp pooling takes an integer p >= 1")
    return int(p)


# ------------------------------------------------------------------ pooling

@_special("LpPool", needs=("lp_pool",), since=18)
def _lp_pool(ctx: _Ctx) -> list[Value | None]:
    x = ctx.x()
    attrs = {**pool_window(ctx, x), "p": _int_p(ctx)}
    return [ctx.op("lp_pool", [x], attrs, out=0)]


@_special("GlobalLpPool", needs=("reduce_l2", "reduce_sum", "abs", "pow"))
def _global_lp_pool(ctx: _Ctx) -> list[Value | None]:
    """(sum over all spatial dims of |x|^p)^(1/p): reduce_l2 for p = 2, reduce_sum of abs for 1."""
    x = ctx.x()
    p = _int_p(ctx)
    if x.type.rank < 3:
        raise _Refuse(f"GlobalLpPool needs an input of rank >= 3 (N, C, spatial...), got {x.type}")
    red = {"axes": list(range(2, x.type.rank)), "keepdims": 1}
    if p == 2:
        return [ctx.op("reduce_l2", [x], red, out=0)]
    ax = ctx.op("abs", [x])
    if p == 1:
        return [ctx.op("reduce_sum", [ax], red, out=0)]
    s = ctx.op("reduce_sum", [ctx.op("pow", [ax, ctx.scalar(p, x)])], red)
    return [ctx.op("pow", [s, ctx.scalar(1.0 / p, x)], out=0)]


# ------------------------------------------------------------------ detection

@_special("NonMaxSuppression")
def _nms(ctx: _Ctx) -> list[Value | None]:
    raise _Refuse("NonMaxSuppression selects a data-dependent number of boxes and kiln's values have "
                  "static shapes; it is lifted only when all of its inputs are constant (then folded)")


# ------------------------------------------------------------------ einsum

@_special("Einsum", needs=("einsum", "transpose", "reshape", "matmul", "reduce_sum", "identity"))
def _einsum(ctx: _Ctx) -> list[Value | None]:
    xs = [ctx.x(i) for i in range(len(ctx.inputs))]
    eq = str(ctx.attr("equation"))
    try:
        terms, out = parse_einsum(eq, [x.type.rank for x in xs])
        dims = einsum_dims(terms, [x.type.shape for x in xs])
    except OpTypeError as e:
        raise _Refuse(str(e)) from None
    if _needs_general(terms, xs, dims):
        return [ctx.op("einsum", xs, {"equation": eq}, out=0)]
    return [_result(ctx, _contract_all(ctx, xs, terms, out))]


def _needs_general(terms: list[list[str]], xs: list[Value], dims: dict) -> bool:
    """A diagonal, a symbolic dim, or a size-1 dim broadcast against a larger one."""
    for term, x in zip(terms, xs):
        if len(set(term)) != len(term) or not x.type.is_static:
            return True
        if any(d != dims[c] for c, d in zip(term, x.type.shape)):
            return True
    return False


def _contract_all(ctx: _Ctx, xs: list[Value], terms: list[list[str]], out: list[str]) -> Value:
    """Fold the operands left to right with one matmul per pair."""
    ops = [_sum_private(ctx, x, t, terms, out, k) for k, (x, t) in enumerate(zip(xs, terms))]
    cur, cur_t = ops[0]
    for k in range(1, len(ops)):
        later = set(out).union(*(terms[j] for j in range(k + 1, len(terms))))
        cur, cur_t = _pair(ctx, cur, cur_t, *ops[k], later)
    gone = [i for i, c in enumerate(cur_t) if c not in out]
    if gone:
        cur = ctx.op("reduce_sum", [cur], {"axes": gone, "keepdims": 0})
        cur_t = [c for c in cur_t if c in out]
    perm = [cur_t.index(c) for c in out]
    if perm != list(range(len(perm))):
        cur = ctx.op("transpose", [cur], {"perm": perm})
    return cur


def _sum_private(ctx: _Ctx, x: Value, term: list[str], terms: list[list[str]], out: list[str],
                 k: int) -> tuple[Value, list[str]]:
    """Sum out the labels that only operand ``k`` has and the output lacks."""
    others = set(out).union(*(t for j, t in enumerate(terms) if j != k))
    axes = [i for i, c in enumerate(term) if c not in others]
    if not axes:
        return x, list(term)
    return (ctx.op("reduce_sum", [x], {"axes": axes, "keepdims": 0}),
            [c for c in term if c in others])


def _pair(ctx: _Ctx, a: Value, ta: list[str], b: Value, tb: list[str], later: set[str]
          ) -> tuple[Value, list[str]]:
    """a, b -> one value with labels batch + a's kept + b's kept, by one (batched) matmul."""
    batch = [c for c in ta if c in tb and c in later]
    contract = [c for c in ta if c in tb and c not in later]
    ka = [c for c in ta if c not in tb]
    kb = [c for c in tb if c not in ta]
    size = dict(zip(ta, a.type.shape)) | dict(zip(tb, b.type.shape))
    m, k, n = (math.prod(size[c] for c in cs) for cs in (ka, contract, kb))
    bdims = [size[c] for c in batch]
    am = _arrange(ctx, a, ta, batch + ka + contract, [*bdims, m, k])
    bm = _arrange(ctx, b, tb, batch + contract + kb, [*bdims, k, n])
    y = ctx.op("matmul", [am, bm])
    labels = batch + ka + kb
    shape = [size[c] for c in labels]
    if list(y.type.shape) != shape:
        y = ctx.op("reshape", [y], {"shape": shape})
    return y, labels


def _arrange(ctx: _Ctx, x: Value, term: list[str], order: list[str], shape: list[int]) -> Value:
    perm = [term.index(c) for c in order]
    if perm != list(range(len(perm))):
        x = ctx.op("transpose", [x], {"perm": perm})
    if list(x.type.shape) != shape:
        x = ctx.op("reshape", [x], {"shape": shape})
    return x
