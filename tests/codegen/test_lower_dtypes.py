"""Compiled ``bitcast`` vs the interpreter; casts TVM 0.27 gets wrong are refused, naming the dtype."""

from __future__ import annotations

import numpy as np
import pytest

import kiln.codegen.lowering  # noqa: F401  (registers the lowerings)
from kiln.codegen.kernel import CodegenError, lower_node, run_kernel
from kiln.ir.text import parse

from .util import TARGET, check_graph_kernels


@pytest.mark.parametrize("src,dst,x", [
    ("f32", "i32", np.array([[1.0, -0.0, np.inf], [np.nan, 3.4e38, -1e-45]], np.float32)),
    ("i32", "f32", np.array([[0x3F800000, -1, 7], [0, 0x7F800000, -0x40000000]], np.int32)),
    ("f64", "i64", np.array([[1.5, -2.0, 1e300], [0.0, -0.0, 5e-324]], np.float64)),
    ("u16", "i16", np.array([[0, 65535, 32768], [1, 2, 40000]], np.uint16)),
    ("u8", "f8e4m3fn", np.array([[0x38, 0x7F, 0xFF], [0x00, 0x80, 0x01]], np.uint8)),
    ("bool", "u8", np.array([[True, False, True], [False, False, True]])),
    ("u8", "bool", np.array([[0, 1, 2], [255, 0, 128]], np.uint8)),
])
def test_bitcast_kernel_matches_interpreter(src, dst, x):
    text = f"""graph @g(%x: {src}[2,3]) -> (%y) {{
      %y = bitcast(%x) {{to="{dst}"}} : {dst}[2,3]
    }}"""
    if dst.startswith("f8"):  # compare the bytes: assert_close has no float8 rule
        g = parse(text)
        k = lower_node(g.nodes[0], TARGET, name="k0")
        (got,) = run_kernel(k, {"x": x}, TARGET)
        assert got.dtype.name == "float8_e4m3fn" and got.view(np.uint8).tolist() == x.tolist()
        return
    check_graph_kernels(text, {"x": x})


@pytest.mark.parametrize("src,dst,name", [  # float8 casts compile (kiln's own codec, test_lower_elementwise)
    ("f32", "i2", "int2"), ("u4", "f32", "uint4"), ("f4e2m1", "f32", "float4_e2m1fn"),
])
def test_narrow_casts_are_refused_naming_the_dtype(src, dst, name):
    g = parse(f"""graph @g(%x: {src}[4]) -> (%y) {{
      %y = cast(%x) {{to="{dst}"}} : {dst}[4]
    }}""")
    with pytest.raises(CodegenError, match=name):
        lower_node(g.nodes[0], TARGET)


def test_subbyte_bitcast_is_refused():
    g = parse("""graph @g(%x: i4[4]) -> (%y) {
      %y = bitcast(%x) {to="u4"} : u4[4]
    }""")
    with pytest.raises(CodegenError, match="int4"):
        lower_node(g.nodes[0], TARGET)


def test_cast_with_saturate_still_compiles_for_wide_types():
    check_graph_kernels("""graph @g(%x: f32[5]) -> (%y) {
      %y = cast(%x) {saturate=0, to="f16"} : f16[5]
    }""", {"x": np.array([1.0, -2.5, 7e4, np.nan, 1e-8], np.float32)})
