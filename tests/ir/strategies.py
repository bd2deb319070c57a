"""Hypothesis strategies: random well-typed kiln graphs built through the mutation API."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from kiln.ir import Graph, TensorType, Value

FLOATS = ["f16", "bf16", "f32", "f64"]
INTS = ["i8", "i32", "i64", "u8"]
UNARY_FLOAT = ["exp", "tanh", "sigmoid", "neg", "abs", "relu", "floor", "sqrt", "erf", "silu", "identity"]
BINARY = ["add", "sub", "mul", "max", "min"]
COMPARE = ["less", "equal", "greater_equal"]

names = st.one_of(
    st.from_regex(r"[a-z][a-z0-9_]{0,6}", fullmatch=True),
    st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=8),
    st.sampled_from(["onnx::Conv_3", "/layer1/Relu_output_0", "a b", 'q"uote', "42", "inf", "x.y"]),
)
special_floats = st.sampled_from([0.0, -0.0, 1.0, -1.5, 1e-7, 3.4e38, float("inf"), float("-inf"), float("nan"), 1 / 3])


def _array(draw, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    size = int(np.prod(shape, dtype=np.int64))
    np_dtype = TensorType(dtype, ()).np_dtype
    if dtype == "bool":
        vals = draw(st.lists(st.booleans(), min_size=size, max_size=size))
    elif dtype in FLOATS:
        vals = draw(st.lists(st.one_of(special_floats, st.floats(-1e4, 1e4, width=16)), min_size=size, max_size=size))
    else:
        info = np.iinfo(np_dtype)
        vals = draw(st.lists(st.integers(int(info.min), int(info.max)), min_size=size, max_size=size))
    with np.errstate(over="ignore", invalid="ignore"):
        return np.array(vals, dtype=np.float64 if dtype in FLOATS else None).astype(np_dtype).reshape(shape)


@st.composite
def graphs(draw, max_nodes: int = 8) -> Graph:
    """A verified-by-construction graph: broadcast-compatible operands, symbolic dims, odd names."""
    g = Graph(draw(names), meta=draw(st.dictionaries(st.sampled_from(["opset", "producer"]),
                                                     st.one_of(st.integers(0, 30), st.text(max_size=5)), max_size=2)))
    base = draw(st.lists(st.sampled_from([1, 2, 3, "N", "S", "2*N"]), min_size=0, max_size=3))

    def sub_shape() -> tuple:
        k = draw(st.integers(0, len(base)))
        return tuple(1 if draw(st.booleans()) and draw(st.booleans()) else d for d in base[len(base) - k:])

    pool: list[Value] = []
    used = set()

    def fresh() -> str:
        n = draw(names.filter(lambda s: s not in used))
        used.add(n)
        return n

    for _ in range(draw(st.integers(1, 3))):
        pool.append(g.add_input(fresh(), TensorType(draw(st.sampled_from(FLOATS + INTS + ["bool"])), sub_shape())))
    for _ in range(draw(st.integers(0, 3))):
        shape = tuple(1 if isinstance(d, str) else d for d in sub_shape())
        if draw(st.booleans()):
            shape = (20,)  # large enough to print as base64
        dtype = draw(st.sampled_from(FLOATS + INTS + ["bool", "i4"]))
        pool.append(g.add_constant(_array(draw, dtype, shape) if dtype != "i4" else
                                   np.array(draw(st.lists(st.integers(-8, 7), min_size=int(np.prod(shape)),
                                                          max_size=int(np.prod(shape))))).astype(TensorType("i4", ()).np_dtype).reshape(shape),
                                   fresh()))
    for _ in range(draw(st.integers(0, max_nodes))):
        kind = draw(st.sampled_from(["unary", "binary", "compare", "cast", "clip", "where"]))
        floats = [v for v in pool if v.type.dtype in FLOATS]
        loc = draw(st.one_of(st.just(""), names))
        a = draw(st.sampled_from(pool))
        if kind == "unary" and floats:
            v = g.add_node(draw(st.sampled_from(UNARY_FLOAT)), [draw(st.sampled_from(floats))], name=loc,
                           out_names=[fresh()]).output
        elif kind in ("binary", "compare"):
            partners = [b for b in pool if b.type.dtype == a.type.dtype and b.type.dtype != "bool"]
            if not partners:
                continue
            b = draw(st.sampled_from(partners))
            try:
                v = g.add_node(draw(st.sampled_from(BINARY if kind == "binary" else COMPARE)), [a, b],
                               name=loc, out_names=[fresh()]).output
            except TypeError:
                continue
        elif kind == "cast":
            v = g.add_node("cast", [a], {"to": draw(st.sampled_from(FLOATS + INTS + ["bool"]))}, name=loc,
                           out_names=[fresh()]).output
        elif kind == "clip" and floats:
            v = g.add_node("clip", [draw(st.sampled_from(floats))],
                           {"min": draw(st.one_of(st.none(), special_floats)), "max": draw(st.one_of(st.none(), special_floats))},
                           name=loc, out_names=[fresh()]).output
        elif kind == "where":
            conds = [c for c in pool if c.type.dtype == "bool"]
            if not conds:
                continue
            try:
                v = g.add_node("where", [draw(st.sampled_from(conds)), a, a], name=loc, out_names=[fresh()]).output
            except TypeError:
                continue
        else:
            continue
        pool.append(v)
    g.set_outputs(draw(st.lists(st.sampled_from(pool), min_size=1, max_size=3)))
    return g
