"""kiln IR text: the language of tests, dumps, fuzzer reproducers and bug reports.

    graph @main(%x: f32[N,3,32,32]) -> (%y) {
      %w = const f32[8,3,3,3] dense<"...base64 of the raw little-endian bytes...">
      %b = const f32[2] [0.5, -1.25]
      %y = conv(%x, %w, _) {group=1, pads=[1, 1, 1, 1]} : f32[N,8,32,32] loc("/conv1/Conv")
    }

Constants are printed exactly (small ones as literals, others as base64 bytes), so
``parse(print(g))`` is structurally equal to ``g``; ``_`` is an absent optional
operand; ``loc("...")`` keeps the node's original name. ``print_graph(g,
elide_constants=True)`` shortens big constants to ``dense<elided>`` for humans.
"""

from __future__ import annotations

import base64
import json
import math
import re
from typing import Any

import numpy as np

from ..runtime.errors import Error
from .graph import Graph, Value
from .types import TensorType, to_numpy_dtype

LITERAL_MAX = 16
_BARE = re.compile(r"[A-Za-z_$][A-Za-z0-9_.$]*|[0-9]+")


class ParseError(Error, ValueError):
    """Malformed IR text; the message names the line and column."""


# ================================================================== printer

def _name(n: str) -> str:
    return n if _BARE.fullmatch(n) else json.dumps(n)


def _float(x: float) -> str:
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return repr(float(x))


def _attr(v: Any) -> str:
    if isinstance(v, bool):
        return str(int(v))
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return _float(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_attr(x) for x in v) + "]"
    if isinstance(v, dict):  # graph.meta["specialized"] = {input: values}
        return "{" + ", ".join(f"{_name(k)}={_attr(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"attribute value {v!r} of type {type(v).__name__} cannot be printed")


def _short_float(x: np.generic) -> str:
    """Shortest spelling that reads back as the same value of x's own dtype (f32 1e-05, not 9.99e-06)."""
    s = str(x)
    try:
        if type(x)(float(s)).tobytes() == x.tobytes():
            return s if any(c in s for c in ".en") else s + ".0"
    except (ValueError, OverflowError):
        pass
    return _float(float(x))


def _const_data(a: np.ndarray, elide: bool) -> str:
    is_float = a.dtype.kind == "f" or "float" in a.dtype.name  # ml_dtypes' bfloat16, float8_*, ...
    exact_literal = not is_float or not np.isnan(a.astype(np.float64)).any()
    if a.size <= LITERAL_MAX and exact_literal:
        flat = a.reshape(-1)
        if a.dtype.kind == "b" or a.dtype.kind in "iu" or a.dtype.name in ("int2", "uint2", "int4", "uint4"):
            return "[" + ", ".join(str(int(x)) for x in flat) + "]"
        return "[" + ", ".join(_short_float(x) for x in flat) + "]"
    if elide:
        return "dense<elided>"
    raw = np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<"), copy=False).tobytes()
    return f'dense<"{base64.b64encode(raw).decode()}">'


def print_graph(g: Graph, *, elide_constants: bool = False) -> str:
    """The graph as IR text; exact unless ``elide_constants``."""
    ins = ", ".join(f"%{_name(v.name)}: {v.type}" for v in g.inputs)
    outs = ", ".join(f"%{_name(v.name)}" for v in g.outputs)
    meta = ""
    if g.meta:
        meta = " attributes {" + ", ".join(f"{_name(k)}={_attr(v)}" for k, v in sorted(g.meta.items())) + "}"
    lines = [f"graph @{_name(g.name)}({ins}) -> ({outs}){meta} {{"]
    for v in g.constants.values():
        lines.append(f"  %{_name(v.name)} = const {v.type} {_const_data(v.const, elide_constants)}")
    for n in g.nodes:
        outs_ = ", ".join(f"%{_name(o.name)}" for o in n.outputs)
        args = ", ".join("_" if v is None else f"%{_name(v.name)}" for v in n.inputs)
        attrs = ""
        if n.attrs:
            attrs = " {" + ", ".join(f"{k}={_attr(n.attrs[k])}" for k in sorted(n.attrs)) + "}"
        types = ", ".join(str(o.type) for o in n.outputs)
        block = f" block({json.dumps(n.block)})" if n.block else ""
        loc = f" loc({json.dumps(n.name)})" if n.name else ""
        lines.append(f"  {outs_} = {n.op}({args}){attrs} : {types}{block}{loc}")
    lines.append("}")
    return "\n".join(lines) + "\n"


# ================================================================== parser

_TOKEN = re.compile(r"""
    (?P<ws>[ \t\r\n]+|//[^\n]*)
  | (?P<str>"(?:[^"\\]|\\.)*")
  | (?P<dim>[A-Za-z_][A-Za-z0-9_]*(?:\*(?:[A-Za-z_][A-Za-z0-9_]*|\d+))+|\d+(?:\*(?:[A-Za-z_][A-Za-z0-9_]*|\d+))+)
  | (?P<num>-?(?:inf|nan)\b|-?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|-?\.\d+(?:[eE][-+]?\d+)?)
  | (?P<ident>[A-Za-z_$][A-Za-z0-9_.$]*)
  | (?P<punct>->|[%@(){}\[\],:=<>])
""", re.VERBOSE)


class _Lexer:
    def __init__(self, text: str):
        self.text = text
        self.toks: list[tuple[str, str, int]] = []
        pos = 0
        while pos < len(text):
            m = _TOKEN.match(text, pos)
            if not m:
                raise self._error(pos, f"unexpected character {text[pos]!r}")
            if m.lastgroup != "ws":
                self.toks.append((m.lastgroup, m.group(), pos))
            pos = m.end()
        self.toks.append(("eof", "", len(text)))
        self.i = 0

    def _error(self, pos: int, msg: str) -> ParseError:
        line = self.text.count("\n", 0, pos) + 1
        col = pos - (self.text.rfind("\n", 0, pos) + 1) + 1
        src = self.text.splitlines()[line - 1] if self.text else ""
        return ParseError(f"line {line}, column {col}: {msg}\n  {src}\n  {' ' * (col - 1)}^")

    def error(self, msg: str) -> ParseError:
        return self._error(self.toks[self.i][2], msg)

    def peek(self) -> tuple[str, str]:
        k, v, _ = self.toks[self.i]
        return k, v

    def next(self) -> tuple[str, str]:
        k, v, _ = self.toks[self.i]
        self.i += 1
        return k, v

    def accept(self, text: str) -> bool:
        if self.toks[self.i][1] == text and self.toks[self.i][0] != "str":
            self.i += 1
            return True
        return False

    def expect(self, text: str) -> None:
        if not self.accept(text):
            raise self.error(f"expected {text!r}, found {self.peek()[1]!r}")


def _name_tok(lx: _Lexer) -> str:
    k, v = lx.next()
    if k == "str":
        return json.loads(v)
    if k in ("ident", "num") and _BARE.fullmatch(v):
        return v
    lx.i -= 1
    raise lx.error(f"expected a name, found {v!r}")


def _value_ref(lx: _Lexer) -> str:
    lx.expect("%")
    return _name_tok(lx)


def _type(lx: _Lexer) -> TensorType:
    k, dtype = lx.next()
    if k != "ident":
        lx.i -= 1
        raise lx.error(f"expected a dtype, found {dtype!r}")
    lx.expect("[")
    dims: list[int | str] = []
    while not lx.accept("]"):
        if dims:
            lx.expect(",")
        k, v = lx.next()
        if k == "num" and v.isdigit():
            dims.append(int(v))
        elif k in ("ident", "dim"):
            dims.append(v)
        else:
            lx.i -= 1
            raise lx.error(f"expected a dim, found {v!r}")
    try:
        return TensorType(dtype, tuple(dims))
    except (KeyError, ValueError) as e:
        raise lx.error(str(e.args[0] if e.args else e)) from None


def _attr_value(lx: _Lexer) -> Any:
    k, v = lx.next()
    if k == "num":
        if re.fullmatch(r"-?\d+", v):
            return int(v)
        return float(v)
    if k == "str":
        return json.loads(v)
    if v == "[":
        items = []
        while not lx.accept("]"):
            if items:
                lx.expect(",")
            items.append(_attr_value(lx))
        return items
    if v == "{":
        lx.i -= 1
        return _attr_dict(lx)
    lx.i -= 1
    raise lx.error(f"expected an attribute value, found {v!r}")


def _attr_dict(lx: _Lexer) -> dict[str, Any]:
    out: dict[str, Any] = {}
    lx.expect("{")
    while not lx.accept("}"):
        if out:
            lx.expect(",")
        key = _name_tok(lx)
        lx.expect("=")
        out[key] = _attr_value(lx)
    return out


def _const(lx: _Lexer, t: TensorType, name: str, constants: dict[str, np.ndarray] | None) -> np.ndarray:
    dt = to_numpy_dtype(t.dtype)
    if not t.is_static:
        raise lx.error(f"constant %{name} must have a static shape, got {t}")
    shape = tuple(int(d) for d in t.shape)
    if lx.accept("dense"):
        lx.expect("<")
        k, v = lx.next()
        lx.expect(">")
        if k == "ident" and v == "elided":
            if constants is None or name not in constants:
                raise lx.error(f"constant %{name} is elided and no data was given for it")
            arr = np.asarray(constants[name])
        elif k == "str":
            raw = base64.b64decode(json.loads(v))
            if len(raw) != int(np.prod(shape, dtype=np.int64)) * dt.itemsize:
                raise lx.error(f"constant %{name}: {len(raw)} bytes do not fit {t}")
            arr = np.frombuffer(raw, dtype=dt.newbyteorder("<")).astype(dt).reshape(shape)
        else:
            raise lx.error("expected base64 data or 'elided' in dense<...>")
    else:
        vals = _attr_value(lx)
        if not isinstance(vals, list):
            raise lx.error(f"constant %{name}: expected a [list] of values")
        if len(vals) != int(np.prod(shape, dtype=np.int64)):
            raise lx.error(f"constant %{name}: {len(vals)} values do not fit {t}")
        src = np.array(vals, dtype=np.float64 if any(isinstance(x, float) for x in vals) else np.int64)
        arr = src.astype(dt).reshape(shape) if src.size else np.zeros(shape, dt)
    if arr.dtype != dt or arr.shape != shape:
        raise lx.error(f"constant %{name}: data is {arr.dtype}{list(arr.shape)}, type says {t}")
    return arr


def parse(text: str, *, constants: dict[str, np.ndarray] | None = None) -> Graph:
    """A Graph from IR text; ParseError names the line and column of the first problem.

    Types written in the text are kept as written (``ir.verify`` checks them
    against the type rules); ``constants`` supplies data for elided constants.
    """
    from .registry import OpTypeError, get_op

    lx = _Lexer(text)
    lx.expect("graph")
    lx.expect("@")
    g = Graph(_name_tok(lx))
    env: dict[str, Value] = {}

    def define(name: str, v: Value) -> None:
        env[name] = v

    lx.expect("(")
    while not lx.accept(")"):
        if g.inputs:
            lx.expect(",")
        nm = _value_ref(lx)
        lx.expect(":")
        if nm in env:
            raise lx.error(f"input %{nm} is defined twice")
        define(nm, g.add_input(nm, _type(lx)))
    lx.expect("->")
    lx.expect("(")
    out_names: list[str] = []
    while not lx.accept(")"):
        if out_names:
            lx.expect(",")
        out_names.append(_value_ref(lx))
    if lx.accept("attributes"):
        g.meta = _attr_dict(lx)
    lx.expect("{")
    while not lx.accept("}"):
        names = [_value_ref(lx)]
        while lx.accept(","):
            names.append(_value_ref(lx))
        for nm in names:
            if nm in env:
                raise lx.error(f"value %{nm} is defined twice")
        lx.expect("=")
        k, opname = lx.next()
        if k != "ident":
            lx.i -= 1
            raise lx.error(f"expected an op name, found {opname!r}")
        if opname == "const":
            if len(names) != 1:
                raise lx.error("a const defines one value")
            t = _type(lx)
            define(names[0], g.add_constant(_const(lx, t, names[0], constants), names[0]))
            continue
        try:
            get_op(opname)
        except KeyError:
            lx.i -= 1
            raise lx.error(f"unknown op {opname!r}") from None
        lx.expect("(")
        args: list[Value | None] = []
        while not lx.accept(")"):
            if args:
                lx.expect(",")
            if lx.accept("_"):
                args.append(None)
                continue
            ref = _value_ref(lx)
            if ref not in env:
                lx.i -= 1
                raise lx.error(f"use of undefined value %{ref}")
            args.append(env[ref])
        attrs = _attr_dict(lx) if lx.peek()[1] == "{" else {}
        lx.expect(":")
        types = [_type(lx)]
        while lx.accept(","):
            types.append(_type(lx))
        if len(types) != len(names):
            raise lx.error(f"{len(names)} results but {len(types)} types")
        block = _string_annotation(lx, "block")
        loc = _string_annotation(lx, "loc")
        try:
            node = g.add_node(opname, args, attrs, name=loc, out_types=types, out_names=names)
        except OpTypeError as e:
            raise lx.error(str(e)) from None
        node.block = block
        for nm, o in zip(names, node.outputs):
            define(nm, o)
    if lx.peek()[0] != "eof":
        raise lx.error(f"unexpected {lx.peek()[1]!r} after the graph")
    for nm in out_names:
        if nm not in env:
            raise ParseError(f"graph output %{nm} is never defined")
    g.outputs = [env[nm] for nm in out_names]
    return g


def _string_annotation(lx: _Lexer, keyword: str) -> str:
    """The string of an optional ``keyword("...")`` after a node's types, else ""."""
    if not lx.accept(keyword):
        return ""
    lx.expect("(")
    k, v = lx.next()
    if k != "str":
        raise lx.error(f"expected a string in {keyword}(...)")
    lx.expect(")")
    return json.loads(v)
