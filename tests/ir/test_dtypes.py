"""kiln's dtypes: the ONNX element-type table, bit widths, and exact text round trips of the narrow types."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest

from kiln import ir
from kiln.frontend.dtypes import KILN_TO_ONNX, ONNX_TO_KILN, kiln_dtype
from kiln.ir.types import BITS, DTYPES, NARROW_FLOAT_DTYPES, TensorType, from_numpy_dtype, is_float

NEW = ["i2", "u2", "f8e4m3fn", "f8e4m3fnuz", "f8e5m2", "f8e5m2fnuz", "f8e8m0", "f4e2m1", "f6e2m3", "f6e3m2"]


def test_every_kiln_dtype_has_an_onnx_type_with_the_same_numpy_dtype():
    assert set(KILN_TO_ONNX) == set(DTYPES)
    for elem, name in ONNX_TO_KILN.items():
        assert onnx.helper.tensor_dtype_to_np_dtype(elem) == DTYPES[name], name


@pytest.mark.parametrize("name", NEW)
def test_new_dtypes_round_trip_through_numpy_and_onnx(name):
    assert from_numpy_dtype(DTYPES[name]) == name
    assert kiln_dtype(KILN_TO_ONNX[name]) == name


def test_bit_widths_match_onnx_and_numpy():
    assert set(BITS) == set(DTYPES)
    widths = {"i2": 2, "u2": 2, "i4": 4, "u4": 4, "f4e2m1": 4, "f6e2m3": 6, "f6e3m2": 6, "f8e8m0": 8}
    for name, bits in BITS.items():
        assert bits == widths.get(name, DTYPES[name].itemsize * 8), name


def test_is_float_covers_the_narrow_floats_only_among_new_types():
    assert all(is_float(d) for d in NARROW_FLOAT_DTYPES | {"f16", "bf16", "f32", "f64"})
    assert not any(is_float(d) for d in ("i2", "u2", "i4", "bool", "i64"))


def test_onnx_types_kiln_lacks_are_named():
    with pytest.raises(ValueError, match="STRING"):
        kiln_dtype(onnx.TensorProto.STRING)


def _round_trip(arr: np.ndarray) -> np.ndarray:
    g = ir.Graph("m")
    c = g.add_constant(arr, "c")
    g.set_outputs([c])
    text = ir.print_graph(g)
    back = ir.parse(text)
    assert ir.print_graph(back) == text
    return back.constants["c"].const


@pytest.mark.parametrize("name", NEW)
@pytest.mark.parametrize("size", [4, 40])  # a literal, and base64 bytes
def test_text_round_trip_is_bit_exact(name, size):
    dt = DTYPES[name]
    bits = (np.arange(size) * 37 % (1 << BITS[name])).astype(np.uint8)
    arr = bits.view(dt)
    back = _round_trip(arr)
    assert back.dtype == dt and back.shape == arr.shape
    assert back.view(np.uint8).tolist() == arr.view(np.uint8).tolist()


def test_negative_nan_of_float8_keeps_its_sign_bit_in_text():
    arr = np.array([0x7F, 0xFF, 0x00, 0x80], np.uint8).view(ml_dtypes.float8_e4m3fn)  # nan, -nan, 0, -0
    assert _round_trip(arr).view(np.uint8).tolist() == [0x7F, 0xFF, 0x00, 0x80]


def test_int2_constants_print_as_integers():
    g = ir.Graph("m")
    g.set_outputs([g.add_constant(np.array([-2, 1, 0], ml_dtypes.int2), "c")])
    assert "%c = const i2[3] [-2, 1, 0]" in ir.print_graph(g)


def test_tensor_types_accept_the_new_dtypes():
    assert str(TensorType("f8e4m3fn", ("N", 3))) == "f8e4m3fn[N,3]"
    assert ir.parse("graph @g(%x: u2[2]) -> (%x) {\n}").inputs[0].type == TensorType("u2", (2,))
