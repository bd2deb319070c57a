"""Fuzz builders for the ops of family 'dtypes'."""

from __future__ import annotations

from kiln.ir.graph import Value

from .generate import Builder, builder

_SAME_WIDTH = {"f32": ("i32", "u32"), "f64": ("i64", "u64"), "i32": ("f32",), "i64": ("f64",),
               "f16": ("i16", "u16"), "i16": ("f16",)}


@builder("bitcast")
def _b_bitcast(b: Builder, x: Value | None) -> Value:
    """A bitcast to a same-width type and back, so the rest of the graph keeps its (finite) values."""
    a = b.primary(x, lambda v: v.type.dtype in ("f32", "f64", "i32", "i64"))
    there = b.node("bitcast", [a], to=b.choice(_SAME_WIDTH[a.type.dtype]))
    return b.node("bitcast", [there], to=a.type.dtype)
