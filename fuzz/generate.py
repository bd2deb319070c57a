"""Graph generator of the fuzzer: valid typed kiln graphs from the op registry (NNSmith style).

Every graph is built through :class:`Builder`, which owns a :class:`Graph`, a
``np.random.Generator`` (the only source of randomness, so a seed reproduces a
graph) and one *builder* per op (``OP_BUILDERS``) that picks operands and
attributes so that the op's type rule holds; the type rule itself is still the
judge (``Graph.op`` runs ``OpDef.infer``), and a builder whose choice it refuses
is rolled back and another op tried.

Numerical validity, as NNSmith does it but without a solver: the builder keeps
a cheap upper bound of every value's magnitude (``Builder.bound``) and

* gives domain ops safe operands: ``log``/``sqrt``/``pow`` read ``abs(x) + c``,
  ``div``/``mod``/``reciprocal`` divide by a constant or by ``abs(x) + c``
  (c >= 0.5);
* tames operands that would overflow: ``exp`` reads ``clip(x, -10, 10)``,
  products (``mul``, ``matmul``, ``conv``, ``pow``, ``reduce_prod``, ...) read
  ``tanh(x)`` or ``clip`` once the bound passes a limit;
* draws weights scaled by 1/sqrt(fan-in) and variances in [0.5, 2].

Measured on 500 seeds, fewer than 1 % of graphs give a NaN/Inf on
:func:`safe_inputs` (see the tests).

Pattern graphs (:func:`pattern_graph`) hold what the passes look for: a Pre-LN
residual stream, conv -> batch_norm -> relu and matmul -> batch_norm, a norm
feeding a linear, a QDQ linear, an attention chain and the decomposed forms
that ``canonicalize`` recognizes. The same pattern builders are spliced into
existing graphs by the ``insert-pattern`` mutator (:mod:`kiln.fuzz.mutate`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from kiln.ir.graph import Graph, Node, Value
from kiln.ir.ops.common import broadcast_shapes
from kiln.ir.ops.quant import RANGES
from kiln.ir.ops.tensor import INT64_MAX, _slice_range
from kiln.ir.registry import FusionKind, OpTypeError, all_ops, get_op
from kiln.ir.types import FLOAT_DTYPES, INT_DTYPES, TensorType
from kiln.ir.verify import verify

__all__ = ["OP_BUILDERS", "PATTERN_KINDS", "REACHED_OTHERWISE", "PATTERN_PASSES", "Builder", "GenFailed", "finalize_outputs",
           "generate_graph", "graph_features", "pattern_graph", "safe_inputs", "seed_graphs", "toposort"]

INPUT_RANGE = 2.0  # safe_inputs draws floats uniformly in [-INPUT_RANGE, INPUT_RANGE]
INT_INPUT_HI = 8  # ... and integers in [0, INT_INPUT_HI)
MAX_NUMEL = 512  # no value grows beyond this many elements (keeps the interpreter fast)
TAME = 1e4  # operands of products are squashed above this magnitude


class GenFailed(Exception):
    """A builder found no operand or attribute that fits here; the caller tries another op."""


def _is_float(v: Value) -> bool:
    return v.type.dtype in ("f32", "f64")


def _is_int(v: Value) -> bool:
    return v.type.dtype in ("i64", "i32")


def _is_num(v: Value) -> bool:
    return _is_float(v) or _is_int(v)


def _is_bool(v: Value) -> bool:
    return v.type.dtype == "bool"


def _numel(shape: Sequence[int]) -> int:
    return int(math.prod(shape))


# ====================================================================== the builder


class Builder:
    """A graph under construction: its values, their magnitude bounds and the random source.

    New nodes are appended at the end of the node list; :func:`toposort` restores
    the order after a mutator rewires an earlier node to read them.
    """

    def __init__(self, graph: Graph, rng: np.random.Generator):
        self.g = graph
        self.rng = rng
        self._bound: dict[int, float] = {}

    # ------------------------------------------------------------ random helpers
    def chance(self, p: float) -> bool:
        return bool(self.rng.random() < p)

    def choice(self, seq: Sequence):
        if not seq:
            raise GenFailed("nothing to choose from")
        return seq[int(self.rng.integers(len(seq)))]

    def randint(self, lo: int, hi: int) -> int:
        """An int in [lo, hi] (both ends included)."""
        return int(self.rng.integers(lo, hi + 1))

    # ------------------------------------------------------------ values
    def values(self, pred: Callable[[Value], bool] = lambda v: True) -> list[Value]:
        return [v for v in self.g.values() if pred(v)]

    def pick(self, pred: Callable[[Value], bool], fresh: float = 0.6) -> Value:
        """A value satisfying ``pred``, preferring non-constants and (with prob. ``fresh``) unused ones."""
        cands = [v for v in self.values(pred) if not v.is_const]
        if not cands:
            cands = self.values(pred)
        if not cands:
            raise GenFailed("no operand fits")
        unused = [v for v in cands if not v.uses]
        if unused and self.chance(fresh):
            cands = unused
        return self.choice(cands)

    def primary(self, x: Value | None, pred: Callable[[Value], bool],
                make: Callable[[], Value] | None = None) -> Value:
        """``x`` when given (GenFailed unless it fits), else a pool value, else ``make()``."""
        if x is not None:
            if not pred(x):
                raise GenFailed("the given operand does not fit")
            return x
        try:
            return self.pick(pred)
        except GenFailed:
            if make is None:
                raise
            return make()

    def input(self, type: TensorType, hint: str = "x") -> Value:
        return self.g.add_input(self.g.fresh_name(hint), type)

    def const(self, array: np.ndarray, hint: str = "c") -> Value:
        return self.g.add_constant(np.ascontiguousarray(array), self.g.fresh_name(hint))

    def rand_array(self, shape: Sequence[int], dtype: str, lo: float = -1.0, hi: float = 1.0) -> np.ndarray:
        npd = TensorType(dtype, ()).np_dtype
        if dtype == "bool":
            return self.rng.integers(0, 2, tuple(shape)).astype(npd)
        if dtype in INT_DTYPES:
            return self.rng.integers(int(lo), int(hi) + 1, tuple(shape)).astype(npd)
        return self.rng.uniform(lo, hi, tuple(shape)).astype(npd)

    def rand_const(self, shape: Sequence[int], dtype: str, lo: float = -1.0, hi: float = 1.0,
                   hint: str = "c") -> Value:
        return self.const(self.rand_array(shape, dtype, lo, hi), hint)

    def weight(self, shape: Sequence[int], dtype: str, fan_in: int, hint: str = "w") -> Value:
        """A constant weight with entries ~ N(0, 1/fan_in)."""
        w = self.rng.standard_normal(tuple(shape)) / math.sqrt(max(fan_in, 1))
        return self.const(w.astype(TensorType(dtype, ()).np_dtype), hint)

    def node(self, op: str, inputs: Sequence[Value | None], **attrs) -> Value:
        """Append a node (types from the type rule, OpTypeError when it refuses); its first output."""
        n = self.g.add_node(op, list(inputs), attrs)
        for o in n.outputs:
            if _numel(o.type.shape) > MAX_NUMEL:
                raise GenFailed(f"{op} output {o.type} is too large")
        return n.outputs[0]

    def rand_shape(self, rank: int | None = None, max_numel: int = 256) -> tuple[int, ...]:
        rank = self.randint(1, 4) if rank is None else rank
        shape: list[int] = []
        for _ in range(rank):
            room = max(1, max_numel // max(_numel(shape), 1))
            shape.append(self.randint(1, min(8, room)))
        return tuple(shape)

    # ------------------------------------------------------------ magnitude bounds
    def bound(self, v: Value) -> float:
        """An upper bound (rough, never small on purpose) of |v| on safe inputs."""
        if id(v) in self._bound:
            return self._bound[id(v)]
        if v.is_const:
            a = np.asarray(v.const)
            b = float(np.abs(a.astype(np.float64)).max()) if a.size and a.dtype.kind in "fiub" else 1.0
        elif v.producer is None:
            b = INPUT_RANGE if _is_float(v) else float(INT_INPUT_HI)
        else:
            b = _op_bound(v.producer, [self.bound(u) if u is not None else 0.0 for u in v.producer.inputs])
        b = float(min(b, 1e300)) if math.isfinite(b) else 1e300
        self._bound[id(v)] = b
        return b

    def tame(self, v: Value, limit: float = TAME) -> Value:
        """``v``, or ``tanh(v)`` / ``clip(v)`` when its bound exceeds ``limit`` (floats only)."""
        if not _is_float(v) or self.bound(v) <= limit:
            return v
        if limit < 2 or self.chance(0.5):
            return self.node("tanh", [v])
        return self.node("clip", [v], min=-limit, max=limit)

    def positive(self, v: Value) -> Value:
        """A value >= c > 0 derived from ``v``: ``abs(v) + c`` (floats), so log/sqrt/div are safe."""
        v = self.tame(v)
        c = self.const(np.array(self.rng.uniform(0.5, 1.0), dtype=v.type.np_dtype), "eps")
        return self.node("add", [self.node("abs", [v]), c])

    def partner(self, a: Value, dtype: str | None = None) -> Value:
        """A second operand that broadcasts with ``a``: a pool value, a new constant or a new input."""
        dtype = dtype or a.type.dtype

        def fits(v: Value) -> bool:
            if v.type.dtype != dtype or v is a:
                return False
            try:
                out = broadcast_shapes(a.type.shape, v.type.shape)
            except OpTypeError:
                return False
            return _numel(out) <= MAX_NUMEL and len(out) == a.type.rank
        r = self.rng.random()
        pool = [v for v in self.values(fits) if not v.is_const]
        if r < 0.4 and pool:
            return self.choice(pool)
        if r < 0.5 and dtype == a.type.dtype:
            return a
        k = self.randint(0, a.type.rank)
        shape = [1 if self.chance(0.3) else d for d in a.type.shape[a.type.rank - k:]]
        if r < 0.85 or dtype == "bool":
            lo, hi = (-3, 3) if dtype in INT_DTYPES else (-1.5, 1.5)
            return self.rand_const(shape, dtype, lo, hi)
        return self.input(TensorType(dtype, tuple(shape)))

    def bool_value(self) -> Value:
        """A bool value from the pool, or a new comparison of a float value."""
        pool = self.values(lambda v: _is_bool(v) and not v.is_const)
        if pool and self.chance(0.6):
            return self.choice(pool)
        a = self.pick(_is_num)
        return self.node(self.choice(COMPARES), [a, self.partner(a)])

    def image(self, x: Value | None, min_rank: int = 3) -> Value:
        """A float value of rank 3 or 4 (N, C, spatial...): ``x``, a pool value or a new input."""
        def make() -> Value:
            rank = self.randint(min_rank, 4)
            sp = [self.randint(3, 8) for _ in range(rank - 2)]
            return self.input(TensorType(self.choice(("f32", "f32", "f64")),
                                         (self.randint(1, 2), self.randint(1, 6), *sp)), "img")
        return self.primary(x, lambda v: _is_float(v) and min_rank <= v.type.rank <= 4, make)


# ====================================================================== magnitude rules


def _op_bound(node: Node, ib: list[float]) -> float:
    """A rough bound of ``node``'s outputs from its operands' bounds (``ib``), by the op's registry ``bound``."""
    a = ib[0] if ib else 1.0
    x = node.inputs[0] if node.inputs else None
    n_in = _numel(x.type.shape) if x is not None and x.type.is_static else 1
    rule = get_op(node.op).bound
    if callable(rule):
        return float(rule(node, ib, n_in))
    if rule in _BOUND_RULES:
        return _BOUND_RULES[rule](a, ib)
    return 1e3 * max(ib + [1.0])


_BOUND_RULES: dict[str, Callable[[float, list[float]], float]] = {
    "one": lambda a, ib: 1.0,
    "keep": lambda a, ib: a,
    "max": lambda a, ib: max(ib + [0.0]),
    "grow": lambda a, ib: a + 1.0,
    "sum": lambda a, ib: sum(ib),
    "prod": lambda a, ib: math.prod(ib),
    "double": lambda a, ib: a * 2.0,
}


# ====================================================================== op builders

Build = Callable[[Builder, "Value | None"], Value]
OP_BUILDERS: dict[str, Build] = {}


def ops_in_group(group: str, *, sources: bool = False) -> tuple[str, ...]:
    """The registry's ops of ``group`` (with ``sources``, also those marked ``group/source``), sorted."""
    want = {group, f"{group}/source"} if sources else {group}
    return tuple(sorted(n for n, d in all_ops().items() if d.group in want))


COMPARES = ops_in_group("compare")


def builder(*names: str) -> Callable[[Callable], Callable]:
    def deco(fn: Callable) -> Callable:
        for n in names:
            OP_BUILDERS[n] = (lambda b, x, n=n: fn(b, x, n)) if fn.__code__.co_argcount == 3 else fn
        return fn
    return deco


@builder("max", "min", "sum")
def _b_binary(b: Builder, x: Value | None, op: str) -> Value:
    a = b.primary(x, _is_float if op == "sum" else _is_num)
    if op == "mul":
        a = b.tame(a)
    ops = [a] + [b.partner(a) for _ in range(b.randint(1, 2) if op in ("max", "min", "sum") else 1)]
    if op == "mul":
        ops = [b.tame(v) for v in ops]
    return b.node(op, ops)


def _divisor(b: Builder, a: Value) -> Value:
    """A divisor for ``a`` that is never near 0: a constant with |c| >= 0.5, or abs(v) + c."""
    if _is_int(a):
        return b.rand_const([1] * b.randint(0, a.type.rank), a.type.dtype, 1, 4, "d")
    if b.chance(0.5):
        shape = [1 if b.chance(0.4) else d for d in a.type.shape[a.type.rank - b.randint(0, a.type.rank):]]
        mag = b.rng.uniform(0.5, 2.0, shape) * b.rng.choice([-1.0, 1.0], shape)
        return b.const(np.asarray(mag, a.type.np_dtype), "d")
    return b.positive(b.partner(a))


@builder("div", "mod")
def _b_div(b: Builder, x: Value | None, op: str) -> Value:
    a = b.primary(x, _is_num)
    d = _divisor(b, a)
    if op == "mod":
        return b.node("mod", [a, d], fmod=1 if _is_float(a) or b.chance(0.5) else 0)
    return b.node("div", [a, d])


@builder("pow")
def _b_pow(b: Builder, x: Value | None) -> Value:
    a = b.positive(b.tame(b.primary(x, _is_float), 8.0))
    if b.chance(0.7):
        e = np.array(b.choice((2.0, 0.5, 3.0, -1.0, 1.5, 0.0, 1.0)), a.type.np_dtype)
    else:
        e = b.rng.uniform(-2, 3, a.type.shape[-1:]).astype(a.type.np_dtype)
    return b.node("pow", [a, b.const(e, "e")])


@builder("and", "or", "not")
def _b_logic(b: Builder, x: Value | None, op: str) -> Value:
    a = b.primary(x, _is_bool, b.bool_value)
    if op == "not":
        return b.node("not", [a])
    other = b.bool_value()
    try:
        broadcast_shapes(a.type.shape, other.type.shape)
    except OpTypeError:
        other = b.partner(a)
    return b.node(op, [a, other])


@builder("where")
def _b_where(b: Builder, x: Value | None) -> Value:
    if x is not None and _is_bool(x):
        cond, a = x, b.pick(_is_num)
    else:
        a = b.primary(x, _is_num)
        cond = b.bool_value()
    return b.node("where", [cond, a, b.partner(a)])


def into_domain(b: Builder, a: Value, domain: tuple[float, float]) -> Value:
    """``a`` mapped into ``domain`` = (lo, hi): clipped when ``a``'s bound may leave it, else ``a``;
    a half-open domain reads ``abs(a) + lo`` (or ``hi - abs(a)``), a bounded one ``mid + half*tanh(a)``."""
    lo, hi = domain
    if lo <= -b.bound(a) and b.bound(a) <= hi:
        return a
    dt = a.type.np_dtype
    if math.isinf(hi) and math.isinf(lo):
        return a
    if math.isinf(hi) or math.isinf(lo):
        edge = lo if math.isinf(hi) else hi
        mag = b.node("abs", [b.tame(a)])
        off = b.const(np.array(edge + (0.5 if math.isinf(hi) else -0.5) * b.rng.random(), dt), "edge")
        return b.node("add", [mag, off]) if math.isinf(hi) else b.node("sub", [off, mag])
    if b.bound(a) <= 2 * max(abs(lo), abs(hi)) and b.chance(0.5):
        return b.node("clip", [a], min=float(lo), max=float(hi))
    half = b.const(np.array((hi - lo) / 2, dt), "half")
    mid = b.const(np.array((hi + lo) / 2, dt), "mid")
    return b.node("add", [b.node("mul", [b.node("tanh", [a]), half]), mid])


def _operand_pred(opdef) -> Callable[[Value], bool]:
    """Which pool values may be an elementwise op's operands: floats for float groups and domains,
    bools for logic, ints for bitwise ops, any number otherwise (the type rule is the judge)."""
    group = (opdef.group or "").split("/")[0]
    if group == "logic":
        return _is_bool
    if group == "bitwise":
        return _is_int
    if opdef.domain is not None:
        return _is_float
    return _is_num


def _b_generic_unary(b: Builder, x: Value | None, op: str) -> Value:
    """Any attribute-free unary elementwise op, its operand mapped into the op's registry ``domain``."""
    opdef = get_op(op)
    a = b.primary(x, _operand_pred(opdef))
    if opdef.domain is not None:
        a = into_domain(b, a, opdef.domain)
    return b.node(op, [a])


def _b_generic_binary(b: Builder, x: Value | None, op: str) -> Value:
    """Any attribute-free binary broadcasting op (a product's operands tamed first)."""
    opdef = get_op(op)
    pred = _operand_pred(opdef)
    a = b.primary(x, pred, b.bool_value if pred is _is_bool else None)
    if opdef.bound == "prod":
        a = b.tame(a)
    other = b.partner(a)
    if opdef.bound == "prod":
        other = b.tame(other)
    if opdef.domain is not None:
        a = into_domain(b, a, opdef.domain)
    return b.node(op, [a, other])


def generic_builder(op: str) -> Build | None:
    """The registry-driven builder for an elementwise op with no required attributes, else None."""
    opdef = get_op(op)
    if any(a.required for a in opdef.attrs.values()) or opdef.variadic_inputs:
        return None
    if opdef.fusion == FusionKind.ELEMENTWISE and len(opdef.inputs) == 1:
        return lambda b, x: _b_generic_unary(b, x, op)
    if opdef.fusion == FusionKind.BROADCAST and len(opdef.inputs) == 2 and opdef.min_inputs == 2:
        return lambda b, x: _b_generic_binary(b, x, op)
    return None


@builder("gelu")
def _b_gelu(b: Builder, x: Value | None) -> Value:
    return b.node("gelu", [b.primary(x, _is_float)], approximate=b.choice(("none", "tanh")))


@builder("leaky_relu")
def _b_leaky(b: Builder, x: Value | None) -> Value:
    return b.node("leaky_relu", [b.primary(x, _is_float)], alpha=b.choice((0.01, 0.2, 0.0, 1.0, -0.5)))


@builder("hard_sigmoid")
def _b_hsig(b: Builder, x: Value | None) -> Value:
    return b.node("hard_sigmoid", [b.primary(x, _is_float)], alpha=b.choice((0.2, 1.0 / 6, 0.0, 2.0)),
                  beta=b.choice((0.5, 0.0, 1.0)))


@builder("clip")
def _b_clip(b: Builder, x: Value | None) -> Value:
    a = b.primary(x, _is_num)
    lo = b.choice((None, -1.0, 0.0, -6.0, 0.5))
    hi = b.choice((None, 1.0, 6.0, 0.0, 2.0))
    if _is_int(a):
        lo, hi = (None if lo is None else float(round(lo))), (None if hi is None else float(round(hi)))
    return b.node("clip", [a], min=lo, max=hi)


@builder("cast")
def _b_cast(b: Builder, x: Value | None) -> Value:
    a = b.primary(x, lambda v: _is_num(v) or _is_bool(v))
    targets = {"f32": ("f64", "i64", "i32", "bool", "f16"), "f64": ("f32", "i64", "bool"),
               "i64": ("f32", "f64", "i32", "bool"), "i32": ("i64", "f32"), "bool": ("f32", "i64", "f64")}
    to = b.choice(targets[a.type.dtype])
    if to == "f16" and b.bound(a) > 6e4:
        to = "f64"
    if to in ("i64", "i32") and _is_float(a) and b.bound(a) > 2e9:
        a = b.tame(a, 1e6)
    y = b.node("cast", [a], to=to)
    if to == "f16":  # back to a dtype the rest of the generator works in
        y = b.node("cast", [y], to="f32")
    return y


# ---------------------------------------------------------------- nn


def _spatial(b: Builder, sizes: Sequence[int], kmax: int = 3, dil: bool = True,
             pad_below_kernel: bool = False) -> dict[str, list[int]]:
    """kernel, strides, pads, dilations for sliding windows that fit ``sizes``."""
    ks, st, pb, pe, dl = [], [], [], [], []
    for s in sizes:
        d = b.choice((1, 1, 2)) if dil else 1
        p0, p1 = b.choice((0, 0, 1)), b.choice((0, 0, 1))
        kmax_here = max(1, min(kmax, (s + p0 + p1 - 1) // d + 1))
        k = b.randint(1, kmax_here)
        if pad_below_kernel:
            p0, p1 = min(p0, k - 1), min(p1, k - 1)
        if d * (k - 1) + 1 > s + p0 + p1:
            d = 1
        ks.append(k)
        dl.append(d)
        pb.append(p0)
        pe.append(p1)
        st.append(b.choice((1, 1, 2)))
    return {"kernel": ks, "strides": st, "pads": pb + pe, "dilations": dl}


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@builder("conv")
def _b_conv(b: Builder, x: Value | None) -> Value:
    a = b.tame(b.image(x))
    c = a.type.shape[1]
    group = b.choice(_divisors(c)) if b.chance(0.5) else 1
    m = group * b.randint(1, max(1, 6 // group))
    sp = _spatial(b, a.type.shape[2:])
    fan = (c // group) * _numel(sp["kernel"])
    w = b.weight((m, c // group, *sp["kernel"]), a.type.dtype, fan)
    bias = b.rand_const([m], a.type.dtype, -0.5, 0.5, "b") if b.chance(0.5) else None
    attrs = {k: sp[k] for k in ("strides", "pads", "dilations") if b.chance(0.7)}
    return b.node("conv", [a, w, bias], group=group, **attrs)


@builder("conv_transpose")
def _b_convt(b: Builder, x: Value | None) -> Value:
    a = b.tame(b.image(x))
    c = a.type.shape[1]
    group = b.choice(_divisors(c)) if b.chance(0.4) else 1
    mg = b.randint(1, 3)
    nsp = a.type.rank - 2
    ks = [b.randint(1, 3) for _ in range(nsp)]
    strides = [b.choice((1, 1, 2)) for _ in range(nsp)]
    pads = [b.randint(0, k - 1) for k in ks] * 2 if b.chance(0.4) else []
    w = b.weight((c, mg, *ks), a.type.dtype, (c // group) * _numel(ks))
    bias = b.rand_const([mg * group], a.type.dtype, -0.5, 0.5, "b") if b.chance(0.4) else None
    opad = [b.randint(0, s - 1) for s in strides] if b.chance(0.3) else []
    return b.node("conv_transpose", [a, w, bias], group=group, strides=strides, pads=pads,
                  output_padding=opad)


@builder("max_pool", "avg_pool", "max_pool_with_indices")
def _b_pool(b: Builder, x: Value | None, op: str) -> Value:
    a = b.image(x)
    sp = _spatial(b, a.type.shape[2:], pad_below_kernel=True)
    attrs = {"kernel_shape": sp["kernel"], "strides": sp["strides"], "pads": sp["pads"],
             "ceil_mode": int(b.chance(0.3)), "dilations": sp["dilations"]}
    if op == "avg_pool":
        attrs["count_include_pad"] = int(b.chance(0.3))
    if op == "max_pool_with_indices":
        attrs["storage_order"] = int(b.chance(0.3))
    return b.node(op, [a], **attrs)


@builder("global_avg_pool", "global_max_pool", "instance_norm", "lrn")
def _b_image_misc(b: Builder, x: Value | None, op: str) -> Value:
    a = b.image(x)
    if op == "instance_norm":
        c = a.type.shape[1]
        return b.node(op, [a, b.rand_const([c], a.type.dtype, 0.5, 1.5, "gamma"),
                           b.rand_const([c], a.type.dtype, -0.5, 0.5, "beta")],
                      epsilon=b.choice((1e-5, 1e-3)))
    if op == "lrn":
        return b.node(op, [b.tame(a, 100.0)], size=b.randint(1, 5), alpha=b.choice((1e-4, 0.1)),
                      beta=b.choice((0.75, 0.5)), bias=b.choice((1.0, 2.0)))
    return b.node(op, [a])


@builder("batch_norm")
def _b_batch_norm(b: Builder, x: Value | None) -> Value:
    a = b.primary(x, lambda v: _is_float(v) and v.type.rank >= 2)
    c, dt = a.type.shape[1], a.type.dtype
    return b.node("batch_norm", [a, b.rand_const([c], dt, 0.5, 1.5, "gamma"), b.rand_const([c], dt, -0.5, 0.5, "beta"),
                                 b.rand_const([c], dt, -0.5, 0.5, "mean"), b.rand_const([c], dt, 0.5, 2.0, "var")],
                  epsilon=b.choice((1e-5, 1e-3, 0.1)))


@builder("layer_norm", "rms_norm", "crms_norm")
def _b_norm(b: Builder, x: Value | None, op: str) -> Value:
    a = b.primary(x, lambda v: _is_float(v) and v.type.rank >= 1)
    r = a.type.rank
    k = 1 if op == "crms_norm" or b.chance(0.6) else b.randint(1, r)
    axis = -k if b.chance(0.5) else r - k
    norm_shape = a.type.shape[r - k:]
    pshape = norm_shape if b.chance(0.7) else norm_shape[-1:]
    ins = [a, b.rand_const(pshape, a.type.dtype, 0.5, 1.5, "gamma")]
    if op == "layer_norm" and b.chance(0.6):
        ins.append(b.rand_const(pshape, a.type.dtype, -0.5, 0.5, "beta"))
    return b.node(op, ins, axis=axis, epsilon=b.choice((1e-5, 1e-6, 1e-3)))


@builder("softmax", "log_softmax")
def _b_softmax(b: Builder, x: Value | None, op: str) -> Value:
    a = b.primary(x, lambda v: _is_float(v) and v.type.rank >= 1)
    return b.node(op, [a], axis=b.randint(-a.type.rank, a.type.rank - 1))


@builder("matmul")
def _b_matmul(b: Builder, x: Value | None) -> Value:
    a = b.tame(b.primary(x, lambda v: _is_num(v) and v.type.rank >= 1))
    k, dt = a.type.shape[-1], a.type.dtype

    def fits(v: Value) -> bool:
        return v.type.dtype == dt and not v.is_const and ((v.type.rank >= 2 and v.type.shape[-2] == k)
                                                          or v.type.shape == (k,))
    pool = b.values(fits)
    if pool and b.chance(0.3):
        w = b.tame(b.choice(pool))
    else:
        n = b.randint(1, 8)
        shape: tuple[int, ...] = (k, n)
        if b.chance(0.15):
            shape = (k,)
        elif b.chance(0.15) and a.type.rank >= 3:
            shape = (a.type.shape[-3], k, n)
        if dt in INT_DTYPES:
            w = b.rand_const(shape, dt, -3, 3, "w")
        else:
            w = b.weight(shape, dt, k)
    return b.node("matmul", [a, w])


# ---------------------------------------------------------------- shape and data movement


def _factorize(n: int, b: Builder, max_rank: int = 4) -> list[int]:
    """A random shape with ``n`` elements."""
    primes, m, p = [], n, 2
    while m > 1:
        while m % p == 0:
            primes.append(p)
            m //= p
        p += 1
    b.rng.shuffle(primes)
    rank = b.randint(1, max_rank)
    dims = [1] * rank
    for q in primes:
        dims[b.randint(0, rank - 1)] *= q
    return dims


@builder("reshape")
def _b_reshape(b: Builder, x: Value | None) -> Value:
    a = b.primary(x, lambda v: v.type.rank >= 1)
    target = _factorize(_numel(a.type.shape), b)
    if b.chance(0.4):
        target[b.randint(0, len(target) - 1)] = -1
    elif b.chance(0.3):
        same = [i for i in range(min(len(target), a.type.rank)) if target[i] == a.type.shape[i]]
        if same:
            target[b.choice(same)] = 0
    return b.node("reshape", [a], shape=target)


@builder("flatten")
def _b_flatten(b: Builder, x: Value | None) -> Value:
    a = b.primary(x, lambda v: v.type.rank >= 1)
    return b.node("flatten", [a], axis=b.randint(-a.type.rank, a.type.rank))


@builder("transpose")
def _b_transpose(b: Builder, x: Value | None) -> Value:
    a = b.primary(x, lambda v: v.type.rank >= 2)
    perm = [] if b.chance(0.2) else [int(i) for i in b.rng.permutation(a.type.rank)]
    return b.node("transpose", [a], perm=perm)


@builder("squeeze")
def _b_squeeze(b: Builder, x: Value | None) -> Value:
    a = b.primary(x, lambda v: 1 in v.type.shape)
    ones = [i for i, d in enumerate(a.type.shape) if d == 1]
    axes = [] if b.chance(0.3) else [i - a.type.rank if b.chance(0.5) else i
                                     for i in ones if b.chance(0.7)] or [ones[0]]
    return b.node("squeeze", [a], axes=axes)


@builder("unsqueeze")
def _b_unsqueeze(b: Builder, x: Value | None) -> Value:
    a = b.primary(x, lambda v: v.type.rank <= 3)
    r = a.type.rank + b.randint(1, 2 if a.type.rank <= 2 else 1)
    axes = sorted({b.randint(-r, r - 1) % r for _ in range(r - a.type.rank)})
    while len(axes) < r - a.type.rank:
        axes = sorted(set(axes) | {b.randint(0, r - 1)})
    return b.node("unsqueeze", [a], axes=[ax - r if b.chance(0.3) else ax for ax in axes])


@builder("concat")
def _b_concat(b: Builder, x: Value | None) -> Value:
    a = b.primary(x, lambda v: v.type.rank >= 1)
    ax = b.randint(0, a.type.rank - 1)
    parts = [a]
    for _ in range(b.randint(1, 2)):
        shape = list(a.type.shape)
        if b.chance(0.5):
            parts.append(a)
            continue
        shape[ax] = b.randint(1, 4)
        same = [v for v in b.values(lambda v: v.type.dtype == a.type.dtype and v.type.rank == a.type.rank
                                    and all(i == ax or v.type.shape[i] == a.type.shape[i]
                                            for i in range(a.type.rank)))
                if not v.is_const and v is not a]
        if same and b.chance(0.5):
            parts.append(b.choice(same))
        elif a.type.dtype != "bool" and b.chance(0.7):
            parts.append(b.rand_const(shape, a.type.dtype, -1, 1))
        else:
            parts.append(b.input(TensorType(a.type.dtype, tuple(shape))))
    order = [int(i) for i in b.rng.permutation(len(parts))]
    return b.node("concat", [parts[i] for i in order], axis=ax - a.type.rank if b.chance(0.3) else ax)


@builder("split")
def _b_split(b: Builder, x: Value | None) -> Value:
    a = b.primary(x, lambda v: v.type.rank >= 1 and max(v.type.shape) >= 2)
    axes = [i for i, d in enumerate(a.type.shape) if d >= 2]
    if not axes:
        raise GenFailed("no axis to split")
    ax = b.choice(axes)
    d = a.type.shape[ax]
    cuts = sorted(int(c) for c in b.rng.choice(np.arange(1, d), size=b.randint(1, min(3, d - 1)), replace=False))
    sizes = [e - s for s, e in zip([0] + cuts, cuts + [d])]
    if b.chance(0.05):
        sizes.append(0)
    return b.node("split", [a], axis=ax - a.type.rank if b.chance(0.3) else ax, split=sizes)


@builder("slice")
def _b_slice(b: Builder, x: Value | None) -> Value:
    a = b.primary(x, lambda v: v.type.rank >= 1)
    r = a.type.rank
    axes = sorted({b.randint(0, r - 1) for _ in range(b.randint(1, r))})
    starts, ends, steps = [], [], []
    for ax in axes:
        d = a.type.shape[ax]
        for _ in range(10):
            step = b.choice((1, 1, 1, 2, -1))
            s = b.randint(-d, d)
            e = b.choice((b.randint(-d, d), INT64_MAX if step > 0 else -INT64_MAX))
            if _slice_range(d, s, e, step)[2] >= 1:
                break
        else:
            s, e, step = 0, d, 1
        starts.append(s)
        ends.append(e)
        steps.append(step)
    attrs: dict = {"starts": starts, "ends": ends}
    if axes != list(range(len(axes))) or b.chance(0.5):
        attrs["axes"] = [ax - r if b.chance(0.3) else ax for ax in axes]
    if any(s != 1 for s in steps) or b.chance(0.3):
        attrs["steps"] = steps
    return b.node("slice", [a], **attrs)


@builder("gather")
def _b_gather(b: Builder, x: Value | None) -> Value:
    a = b.primary(x, lambda v: v.type.rank >= 1)
    ax = b.randint(0, a.type.rank - 1)
    d = a.type.shape[ax]
    ishape = [b.randint(1, 4) for _ in range(b.choice((0, 1, 1, 2)))]
    idx = b.rng.integers(-d, d, ishape).astype(np.int64 if b.chance(0.8) else np.int32)
    return b.node("gather", [a, b.const(idx, "idx")], axis=ax - a.type.rank if b.chance(0.3) else ax)


@builder("gather_elements")
def _b_gather_elements(b: Builder, x: Value | None) -> Value:
    a = b.primary(x, lambda v: v.type.rank >= 1)
    ax = b.randint(0, a.type.rank - 1)
    shape = [b.randint(1, 4) if i == ax else b.randint(1, d) for i, d in enumerate(a.type.shape)]
    d = a.type.shape[ax]
    return b.node("gather_elements", [a, b.const(b.rng.integers(-d, d, shape).astype(np.int64), "idx")],
                  axis=ax)


@builder("expand")
def _b_expand(b: Builder, x: Value | None) -> Value:
    a = b.primary(x, lambda v: v.type.rank <= 3)
    shape = [b.randint(2, 4) if d == 1 and b.chance(0.6) else (1 if b.chance(0.2) else d) for d in a.type.shape]
    if b.chance(0.4):
        shape = [b.randint(1, 3)] + shape
    return b.node("expand", [a], shape=shape)


@builder("tile")
def _b_tile(b: Builder, x: Value | None) -> Value:
    a = b.primary(x, lambda v: v.type.rank >= 1 and _numel(v.type.shape) <= 64)
    return b.node("tile", [a], repeats=[b.choice((1, 1, 2, 3)) for _ in a.type.shape])


@builder("pad")
def _b_pad(b: Builder, x: Value | None) -> Value:
    a = b.primary(x, lambda v: v.type.rank >= 1)
    mode = b.choice(("constant", "constant", "reflect", "edge", "wrap"))
    r = a.type.rank
    pads = [0] * (2 * r)
    for i, d in enumerate(a.type.shape):
        if not b.chance(0.6):
            continue
        for j in (i, i + r):
            if mode == "constant":
                pads[j] = b.randint(-1 if d > 2 else 0, 2)
            elif mode == "reflect":
                pads[j] = b.randint(0, min(2, d - 1))
            else:
                pads[j] = b.randint(0, 2)
    return b.node("pad", [a], pads=pads, mode=mode, value=b.choice((0.0, 1.0, -2.5)))


@builder("shape")
def _b_shape(b: Builder, x: Value | None) -> Value:
    a = b.primary(x, lambda v: True)
    attrs = {"start": b.randint(-a.type.rank, a.type.rank)} if b.chance(0.4) else {}
    if b.chance(0.3):
        attrs["end"] = b.randint(-a.type.rank, a.type.rank)
    return b.node("shape", [a], **attrs)


@builder("trilu")
def _b_trilu(b: Builder, x: Value | None) -> Value:
    a = b.primary(x, lambda v: v.type.rank >= 2 and v.type.dtype != "bool")
    return b.node("trilu", [a], upper=int(b.chance(0.5)), k=b.randint(-2, 2))


@builder("range")
def _b_range(b: Builder, x: Value | None) -> Value:
    if x is not None:
        raise GenFailed("range takes no operand")
    dtype = b.choice(("f32", "i64", "f64", "i32"))
    start = float(b.randint(-4, 4))
    delta = b.choice((1.0, 2.0, -1.0, 0.5)) if dtype[0] == "f" else b.choice((1.0, 2.0, -1.0))
    n = b.randint(1, 8)
    return b.node("range", [], start=start, limit=start + delta * n, delta=delta, dtype=dtype)


@builder("argmax", "argmin")
def _b_arg(b: Builder, x: Value | None, op: str) -> Value:
    a = b.primary(x, lambda v: _is_num(v) and v.type.rank >= 1)
    return b.node(op, [a], axis=b.randint(-a.type.rank, a.type.rank - 1), keepdims=int(b.chance(0.5)),
                  select_last_index=int(b.chance(0.3)))


@builder("cumsum")
def _b_cumsum(b: Builder, x: Value | None) -> Value:
    a = b.tame(b.primary(x, lambda v: _is_num(v) and v.type.rank >= 1))
    return b.node("cumsum", [a], axis=b.randint(-a.type.rank, a.type.rank - 1), exclusive=int(b.chance(0.3)),
                  reverse=int(b.chance(0.3)))


REDUCES = ops_in_group("reduce", sources=True)


@builder(*REDUCES)
def _b_reduce(b: Builder, x: Value | None, op: str) -> Value:
    a = b.primary(x, _is_float if op == "reduce_l2" else _is_num)
    r = a.type.rank
    axes = [] if r == 0 or b.chance(0.2) else sorted({b.randint(0, r - 1) for _ in range(b.randint(1, r))})
    n = _numel([a.type.shape[i] for i in axes]) if axes else _numel(a.type.shape)
    if op == "reduce_prod" and _is_float(a) and n * math.log(max(b.bound(a), 1.0)) > 46.0:  # bound**n > 1e20
        a = b.node("tanh", [a])
    elif op in ("reduce_sum_square", "reduce_sum", "reduce_prod"):
        a = b.tame(a)
    return b.node(op, [a], axes=[ax - r if b.chance(0.3) else ax for ax in axes], keepdims=int(b.chance(0.6)))


# ---------------------------------------------------------------- quantization

QTYPES = ("u8", "i8", "u8", "i16", "u16")


def _qparams(b: Builder, t: TensorType, amp: float, qdtype: str) -> tuple[list[Value], dict]:
    """scale (and maybe zero point) operands and attrs for a per-tensor, per-axis or blocked (de)quantize
    of a ``t`` whose magnitude is about ``amp``."""
    lo, hi = RANGES[qdtype]
    amp = max(amp, 1e-3)
    r = t.rank
    kind = b.choice(("tensor", "tensor", "axis", "block")) if r >= 1 else "tensor"
    attrs: dict = {}
    if kind == "tensor":
        shape: list[int] = [] if b.chance(0.7) else [1]
    elif kind == "axis":
        ax = b.randint(0, r - 1)
        shape, attrs["axis"] = [t.shape[ax]], ax - r if b.chance(0.3) else ax
    else:
        ax = b.randint(0, r - 1)
        bs = b.randint(1, max(1, t.shape[ax]))
        shape = list(t.shape)
        shape[ax] = -(-t.shape[ax] // bs)
        attrs["axis"], attrs["block_size"] = ax, bs
    scale = b.rng.uniform(0.5, 1.5, shape) * 2 * amp / (hi - lo)
    ops: list[Value] = [b.const(np.asarray(scale, np.float32), "scale")]
    if b.chance(0.6):
        zp = b.rng.integers(lo, hi + 1, shape) if qdtype.startswith("i") else \
            b.rng.integers(lo, (lo + hi) // 2 + 1, shape) + (hi - lo) // 4
        ops.append(b.const(np.asarray(zp).astype(TensorType(qdtype, ()).np_dtype), "zp"))
    return ops, attrs


@builder("quantize")
def _b_quantize(b: Builder, x: Value | None) -> Value:
    a = b.tame(b.primary(x, lambda v: v.type.dtype == "f32"), 1e3)
    qd = b.choice(QTYPES)
    params, attrs = _qparams(b, a.type, b.bound(a), qd)
    q = b.node("quantize", [a, *params], dtype=qd, **attrs)
    if b.chance(0.8):  # a QDQ pair, as quantized models have it
        return b.node("dequantize", [q, *params], **attrs)
    return q


@builder("dequantize")
def _b_dequantize(b: Builder, x: Value | None) -> Value:
    q = b.primary(x, lambda v: v.type.dtype in RANGES and not v.is_const,
                  lambda: b.const(b.rng.integers(-100, 100, b.rand_shape(b.randint(1, 2))).astype(np.int8), "wq"))
    params, attrs = _qparams(b, q.type, 100.0, q.type.dtype)
    return b.node("dequantize", [q, *params], **attrs)


# ====================================================================== generation

# Ops drawn more often than the others (the ones the passes and codegen care about most).
WEIGHTS: dict[str, float] = {"add": 3, "mul": 2, "sub": 1.5, "matmul": 4, "conv": 3, "relu": 1.5, "gelu": 1.5,
                             "layer_norm": 2, "rms_norm": 1.5, "batch_norm": 2, "softmax": 2, "reshape": 2,
                             "transpose": 2, "quantize": 2, "concat": 1.5, "slice": 1.5, "where": 1.5}


def _op_table() -> tuple[list[str], np.ndarray]:
    names = sorted(OP_BUILDERS)
    w = np.array([WEIGHTS.get(n, 1.0) for n in names])
    return names, w / w.sum()


def _random_input_type(b: Builder) -> TensorType:
    r = b.rng.random()
    dtype = "f32" if r < 0.85 else "f64" if r < 0.93 else "i64" if r < 0.98 else "bool"
    return TensorType(dtype, b.rand_shape())


def _rollback(g: Graph, n_nodes: int, consts: set[str], n_inputs: int) -> None:
    """Undo a builder that failed halfway: drop the nodes, constants and inputs it added."""
    for node in reversed(g.nodes[n_nodes:]):
        for o in node.outputs:
            for user, i in list(o.uses):
                g.set_input(user, i, None)
        g.remove(node)
    for name in [k for k in g.constants if k not in consts]:
        g.remove_constant(g.constants[name])
    del g.inputs[n_inputs:]


def try_build(b: Builder, op: str, x: Value | None = None) -> Value | None:
    """Run op ``op``'s builder (on operand ``x`` when given); None, with the graph unchanged, when it fails."""
    g = b.g
    snap = (len(g.nodes), set(g.constants), len(g.inputs))
    try:
        return OP_BUILDERS[op](b, x)
    except (GenFailed, OpTypeError, ValueError, IndexError, ZeroDivisionError):
        _rollback(g, *snap)
        return None


def random_op(b: Builder) -> str:
    names, p = _op_table()
    return names[int(b.rng.choice(len(names), p=p))]


def finalize_outputs(g: Graph) -> Graph:
    """Keep the graph's outputs, add every unread node output, drop unread constants, dedupe; verify."""
    outs: list[Value] = []
    for v in list(g.outputs) + [o for n in g.nodes for o in n.outputs if not o.uses]:
        if not any(v is u for u in outs):
            outs.append(v)
    g.set_outputs(outs)
    for c in list(g.constants.values()):
        if not c.uses and not any(c is o for o in outs):
            g.remove_constant(c)
    verify(g)
    return g


def generate_graph(rng: np.random.Generator, max_nodes: int = 8) -> Graph:
    """A random valid graph of about 3..``max_nodes`` chosen ops (plus the guard ops they need).

    1-3 inputs of static small shapes (rank 1..4, dims 1..8; mostly f32), ops
    drawn from ``OP_BUILDERS`` (weighted by ``WEIGHTS``); every unread value
    becomes a graph output.
    """
    g = Graph("fuzz")
    b = Builder(g, rng)
    for _ in range(b.randint(1, 3)):
        b.input(_random_input_type(b))
    target = b.randint(min(3, max_nodes), max(max_nodes, 1))
    chosen = attempts = 0
    while chosen < target and attempts < 20 * target:
        attempts += 1
        if try_build(b, random_op(b)) is not None:
            chosen += 1
    if not g.nodes:
        try_build(b, "relu" if _is_float(g.inputs[0]) else "identity", g.inputs[0])
        if not g.nodes:
            b.node("identity", [g.inputs[0]])
    return finalize_outputs(g)


# ====================================================================== patterns


def _f(b: Builder, x: Value, min_rank: int = 2) -> Value:
    """``x`` as a float value of rank >= ``min_rank`` (cast / unsqueezed as needed)."""
    if not _is_float(x):
        x = b.node("cast", [x], to="f32")
    if x.type.rank < min_rank:
        x = b.node("unsqueeze", [x], axes=list(range(min_rank - x.type.rank)))
    return b.tame(x, 100.0)


def _linear(b: Builder, x: Value, n: int, bias: bool = True, hint: str = "w") -> Value:
    k = x.type.shape[-1]
    y = b.node("matmul", [x, b.weight((k, n), x.type.dtype, k, hint)])
    if bias:
        y = b.node("add", [y, b.rand_const([n], x.type.dtype, -0.5, 0.5, "bias")])
    return y


def _ln(b: Builder, x: Value, bias: bool = True) -> Value:
    d, dt = x.type.shape[-1], x.type.dtype
    ins = [x, b.rand_const([d], dt, 0.5, 1.5, "gamma")]
    if bias:
        ins.append(b.rand_const([d], dt, -0.5, 0.5, "beta"))
    return b.node("layer_norm", ins, axis=-1, epsilon=1e-5)


def pattern_pre_ln(b: Builder, x: Value) -> Value:
    """A Pre-LN residual stream: h = x·W_in (+ pos); h += linear(LN(h)); h += mlp(LN(h)); head(LN(h)).

    Every write into the stream is a constant-weight linear map, so ln-to-rmsnorm
    and ln-to-crmsnorm can prove the stream; each LN feeds a matmul (fold-ln-affine).
    """
    x = _f(b, x)
    d = b.choice((4, 8, 12, 16))
    h = _linear(b, x, d, bias=b.chance(0.5), hint="w_in")
    if x.type.rank >= 2 and b.chance(0.5):
        h = b.node("add", [h, b.rand_const(h.type.shape[-2:], h.type.dtype, -0.5, 0.5, "pos")])
    for layer in range(b.randint(1, 2)):
        y = _ln(b, h, bias=b.chance(0.7))
        if layer % 2 == 0:
            branch = _linear(b, y, d, hint="w_o")
        else:
            mid = b.node(b.choice(("gelu", "relu", "silu")), [_linear(b, y, 2 * d, hint="w_fc1")])
            branch = _linear(b, mid, d, hint="w_fc2")
        h = b.node("add", [h, branch])
    return _linear(b, _ln(b, h), b.randint(2, 6), bias=b.chance(0.5), hint="w_head")


def pattern_conv_bn(b: Builder, x: Value) -> Value:
    """conv -> batch_norm -> relu, pooled and flattened into matmul (+ bias) -> batch_norm (fold-conv-bn)."""
    x = _f(b, x, 3)
    if x.type.rank > 4:
        x = b.node("reshape", [x], shape=[1, 1, -1])
    c = x.type.shape[1]
    m = b.randint(2, 6)
    ks = [min(b.randint(1, 3), s) for s in x.type.shape[2:]]
    group = b.choice([g for g in _divisors(c) if m % g == 0]) if b.chance(0.3) else 1
    w = b.weight((m, c // group, *ks), x.type.dtype, (c // group) * _numel(ks))
    y = b.node("conv", [x, w, b.rand_const([m], x.type.dtype, -0.5, 0.5, "b") if b.chance(0.5) else None],
               group=group, pads=[k // 2 for k in ks] * 2)
    y = _bn(b, y)
    y = b.node("relu", [y])
    y = b.node("flatten", [b.node("global_avg_pool", [y])], axis=1)
    return _bn(b, _linear(b, y, b.randint(2, 6), bias=b.chance(0.5)))


def _bn(b: Builder, x: Value) -> Value:
    c, dt = x.type.shape[1], x.type.dtype
    return b.node("batch_norm", [x, b.rand_const([c], dt, 0.5, 1.5, "gamma"), b.rand_const([c], dt, -0.5, 0.5, "beta"),
                                 b.rand_const([c], dt, -0.5, 0.5, "mean"), b.rand_const([c], dt, 0.5, 2.0, "var")])


def pattern_norm_linear(b: Builder, x: Value) -> Value:
    """layer_norm / rms_norm with constant γ (β) feeding a linear (fold-ln-affine)."""
    x = _f(b, x)
    if b.chance(0.6):
        y = _ln(b, x, bias=b.chance(0.7))
    else:
        d = x.type.shape[-1]
        y = b.node("rms_norm", [x, b.rand_const([d], x.type.dtype, 0.5, 1.5, "gamma")], axis=-1, epsilon=1e-6)
    return _linear(b, y, b.randint(2, 8), bias=b.chance(0.6))


def pattern_qdq(b: Builder, x: Value) -> Value:
    """quantize -> dequantize -> matmul with a dequantized i8 weight, + bias -> relu -> requantize -> dequantize."""
    x = _f(b, x)
    if x.type.dtype != "f32":
        x = b.node("cast", [x], to="f32")
    k, n = x.type.shape[-1], b.randint(2, 8)
    s = b.const(np.array(b.bound(x) / 127.0, np.float32), "x_scale")
    zp = b.const(np.array(b.randint(100, 150), np.uint8), "x_zp")
    xq = b.node("dequantize", [b.node("quantize", [x, s, zp], dtype="u8"), s, zp])
    wq = b.const(b.rng.integers(-127, 128, (k, n)).astype(np.int8), "w_q")
    ws = b.const((b.rng.uniform(0.5, 1.5, n) / (127.0 * math.sqrt(k))).astype(np.float32), "w_scale")
    y = b.node("matmul", [xq, b.node("dequantize", [wq, ws], axis=1)])
    y = b.node("relu", [b.node("add", [y, b.rand_const([n], "f32", -0.5, 0.5, "bias")])])
    ys = b.const(np.array(b.bound(y) / 255.0, np.float32), "y_scale")
    return b.node("dequantize", [b.node("quantize", [y, ys], dtype="u8"), ys])


def pattern_attention(b: Builder, x: Value) -> Value:
    """q·kᵀ·scale -> softmax -> ·v, with q, k, v linear projections of ``x`` [.., S, d]."""
    x = _f(b, x)
    dh = b.choice((2, 4, 8))
    q, k, v = (_linear(b, x, dh, bias=False, hint=h) for h in ("wq", "wk", "wv"))
    perm = list(range(x.type.rank))
    perm[-1], perm[-2] = perm[-2], perm[-1]
    s = b.node("matmul", [q, b.node("transpose", [k], perm=perm)])
    sc = np.array(1.0 / math.sqrt(dh), x.type.np_dtype)
    s = b.node("mul", [s, b.const(sc, "scale")]) if b.chance(0.6) else b.node("div", [s, b.const(1 / sc, "scale")])
    return b.node("matmul", [b.node("softmax", [s], axis=-1), v])


def pattern_decomposed(b: Builder, x: Value) -> Value:
    """The exporter spellings canonicalize recognizes: a decomposed layer norm, then gelu(erf) or x·sigmoid(x)."""
    x = _f(b, x, 1)
    r, dt, d = x.type.rank, x.type.np_dtype, x.type.shape[-1]
    ax = [r - 1]
    dev = b.node("sub", [x, b.node("reduce_mean", [x], axes=ax, keepdims=1)])
    sq = b.node("mul", [dev, dev]) if b.chance(0.5) else b.node("pow", [dev, b.const(np.array(2.0, dt), "two")])
    var = b.node("reduce_mean", [sq], axes=ax, keepdims=1)
    std = b.node("sqrt", [b.node("add", [var, b.const(np.array(1e-5, dt), "eps")])])
    y = b.node("div", [dev, std])
    y = b.node("mul", [y, b.rand_const([d], x.type.dtype, 0.5, 1.5, "gamma")])
    y = b.node("add", [y, b.rand_const([d], x.type.dtype, -0.5, 0.5, "beta")])
    if b.chance(0.5):
        e = b.node("erf", [b.node("div", [y, b.const(np.array(math.sqrt(2.0), dt), "sqrt2")])])
        one = b.node("add", [e, b.const(np.array(1.0, dt), "one")])
        return b.node("mul", [b.node("mul", [y, b.const(np.array(0.5, dt), "half")]), one])
    return b.node("mul", [y, b.node("sigmoid", [y])])


PATTERNS: dict[str, Callable[[Builder, Value], Value]] = {
    "pre-ln": pattern_pre_ln, "conv-bn": pattern_conv_bn, "norm-linear": pattern_norm_linear,
    "qdq": pattern_qdq, "attention": pattern_attention, "decomposed": pattern_decomposed,
}
PATTERN_KINDS: tuple[str, ...] = tuple(PATTERNS)
# The pass that each pattern kind is there for (tests and the campaign's seed pipelines).
PATTERN_PASSES: dict[str, str] = {
    "pre-ln": "ln-to-rmsnorm", "conv-bn": "fold-conv-bn", "norm-linear": "fold-ln-affine",
    "qdq": "fuse-blocks", "attention": "fuse-blocks", "decomposed": "canonicalize",
}


def _pattern_input(b: Builder, kind: str) -> Value:
    dt = "f64" if b.chance(0.15) and kind != "qdq" else "f32"
    if kind == "conv-bn":
        rank = b.choice((3, 4, 4))
        shape = (b.randint(1, 2), b.randint(1, 4), *[b.randint(3, 6) for _ in range(rank - 2)])
    else:
        lead = [b.randint(1, 2)] if b.chance(0.4) else []
        shape = (*lead, b.randint(2, 6), b.randint(2, 16))
    return b.input(TensorType(dt, shape), "x")


def pattern_graph(kind: str, rng: np.random.Generator) -> Graph:
    """A small graph (d <= 16) holding pattern ``kind`` (one of PATTERN_KINDS) on a fresh input."""
    if kind not in PATTERNS:
        raise ValueError(f"unknown pattern kind {kind!r}; kinds: {', '.join(PATTERN_KINDS)}")
    g = Graph(kind.replace("-", "_"))
    b = Builder(g, rng)
    out = PATTERNS[kind](b, _pattern_input(b, kind))
    g.set_outputs([out])
    return finalize_outputs(g)


def seed_graphs(rng: np.random.Generator, n_generated: int = 4) -> list[tuple[str, Graph]]:
    """One graph of each pattern kind, then ``n_generated`` random ones: (label, graph) pairs."""
    seeds = [(f"pattern:{k}", pattern_graph(k, rng)) for k in PATTERN_KINDS]
    seeds += [(f"generated:{i}", generate_graph(rng)) for i in range(n_generated)]
    return seeds


# ====================================================================== inputs and features


def _index_limit(v: Value) -> int:
    """Exclusive upper bound for an integer input, smaller where it indexes a gather."""
    hi = INT_INPUT_HI
    for n, i in v.uses:
        if n.op in ("gather", "gather_elements") and i == 1:
            x = n.inputs[0].type
            d = x.shape[n.attrs.get("axis", 0) % x.rank]
            hi = min(hi, d if isinstance(d, int) else 1)
    return max(hi, 1)


def safe_inputs(graph: Graph, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Feeds for every graph input: floats uniform in ±INPUT_RANGE, ints in [0, 8) (valid indices), bools."""
    feeds: dict[str, np.ndarray] = {}
    for v in graph.inputs:
        shape = tuple(d if isinstance(d, int) else 2 for d in v.type.shape)
        npd = v.type.np_dtype
        if v.type.dtype == "bool":
            feeds[v.name] = rng.integers(0, 2, shape).astype(npd)
        elif v.type.dtype in RANGES:
            lo, hi = RANGES[v.type.dtype]
            feeds[v.name] = rng.integers(lo, hi + 1, shape).astype(npd)
        elif v.type.dtype in INT_DTYPES:
            feeds[v.name] = rng.integers(0, _index_limit(v), shape).astype(npd)
        else:
            feeds[v.name] = rng.uniform(-INPUT_RANGE, INPUT_RANGE, shape).astype(npd)
    return feeds


def _bucket_int(x: int) -> str:
    return "<0" if x < 0 else "0" if x == 0 else "1" if x == 1 else ">1"


def _bucket_float(x: float) -> str:
    if x != x:
        return "nan"
    if x == 0:
        return "0"
    a = abs(x)
    mag = "tiny" if a < 1e-6 else "<1" if a < 1 else "1" if a == 1 else ">1"
    return ("-" if x < 0 else "") + mag


def _attr_features(node: Node) -> set[str]:
    """Boundary buckets of a node's attributes (``attr:conv.group=>1``, ``attr:softmax.axis=<0``)."""
    out: set[str] = set()
    op = node.op
    for k, v in node.attrs.items():
        key = f"attr:{op}.{k}="
        if isinstance(v, bool) or isinstance(v, int):
            out.add(key + _bucket_int(int(v)))
        elif isinstance(v, float):
            out.add(key + _bucket_float(v))
        elif isinstance(v, str):
            out.add(key + v)
        elif isinstance(v, list):
            if not v:
                out.add(key + "[]")
            else:
                out.add(f"{key}len{len(v)}")
                out.update(key + _bucket_int(int(e)) for e in v if isinstance(e, int))
        elif v is None:
            out.add(key + "none")
    if op == "conv" and node.inputs[0].type.rank >= 2:
        c, g = node.inputs[0].type.shape[1], node.attrs.get("group", 1)
        out.add(f"attr:conv.group={'1' if g == 1 else 'depthwise' if g == c else '>1'}")
    return out


def graph_features(graph: Graph) -> set[str]:
    """Structural coverage of a graph: ops with dtypes, op->op edges, attribute buckets, ranks, broadcasts."""
    feats: set[str] = set()
    for n in graph.nodes:
        ins = [v for v in n.inputs if v is not None]
        dt = ins[0].type.dtype if ins else n.outputs[0].type.dtype
        feats.add(f"op:{n.op}:{dt}")
        if n.outputs and n.outputs[0].type.dtype != dt:
            feats.add(f"op:{n.op}:{dt}->{n.outputs[0].type.dtype}")
        if ins:
            feats.add(f"rank:{n.op}:{ins[0].type.rank}")
        if len({v.type.shape for v in ins}) > 1 and n.op in OP_BUILDERS and len(ins) > 1:
            feats.add(f"bcast:{n.op}")
        if any(v.is_const for v in ins):
            feats.add(f"const-operand:{n.op}")
        if any(v.producer is None and not v.is_const for v in ins):
            feats.add(f"input-operand:{n.op}")
        for v in ins:
            p = v.producer
            if p is not None:
                feats.add(f"edge:{p.op}->{n.op}")
        if len(n.outputs[0].uses) > 1 if n.outputs else False:
            feats.add(f"fanout:{n.op}")
        feats.update(_attr_features(n))
    for v in graph.outputs:
        feats.add(f"output:{v.producer.op if v.producer else ('const' if v.is_const else 'input')}")
    size = len(graph.nodes)
    feats.add(f"nodes:{'<4' if size < 4 else '<8' if size < 8 else '<16' if size < 16 else '>=16'}")
    return feats


# ====================================================================== order


def toposort(g: Graph) -> None:
    """Reorder ``g.nodes`` topologically, keeping the current order wherever it is already valid."""
    index = {id(n): i for i, n in enumerate(g.nodes)}
    deps: dict[int, set[int]] = {}
    users: dict[int, list[Node]] = {}
    for n in g.nodes:
        ds = {id(v.producer) for v in n.inputs if v is not None and v.producer is not None}
        deps[id(n)] = ds
        for d in ds:
            users.setdefault(d, []).append(n)
    import heapq

    ready = [(index[id(n)], n) for n in g.nodes if not deps[id(n)]]
    heapq.heapify(ready)
    order: list[Node] = []
    while ready:
        _, n = heapq.heappop(ready)
        order.append(n)
        for u in users.get(id(n), []):
            deps[id(u)].discard(id(n))
            if not deps[id(u)]:
                heapq.heappush(ready, (index[id(u)], u))
    if len(order) != len(g.nodes):
        raise ValueError("the graph has a cycle")
    g.nodes[:] = order


FLOATS = FLOAT_DTYPES  # re-exported for the mutators


# Builders of the newer op families live beside this module; they register into OP_BUILDERS.
from . import (  # noqa: E402,F401
    build_dtypes,
    build_image,
    build_index,
    build_math,
    build_nn_extra,
    build_recurrent,
    build_signal,
    build_transformer,
)

# Ops the generator never builds directly, and how fuzz cases reach them instead.
REACHED_OTHERWISE: dict[str, str] = {
    "qmatmul": "made by fuse-qlinear from the qdq pattern (pattern_qdq)",
    "qconv": "made by fuse-qlinear from the qdq pattern (pattern_qdq)",
    "dq_matmul": "made by fuse-qlinear from weight-only dequantize -> matmul",
}


def _install_generic_builders() -> None:
    """Every registered op without a builder of its own gets the registry-driven one, where it has one."""
    for name in all_ops():
        if name not in OP_BUILDERS:
            fn = generic_builder(name)
            if fn is not None:
                OP_BUILDERS[name] = fn


_install_generic_builders()
