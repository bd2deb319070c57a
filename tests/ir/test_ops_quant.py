"""quantize / dequantize (ONNX opset 21): references vs onnxruntime and vs the spec's formula."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from kiln.ir import OpTypeError, TensorType
from kiln.ir.registry import get_op

from .onnx_single import T, check, infer, run_kiln

COVERED = {"quantize", "dequantize", "qmatmul", "qconv", "dq_matmul"}

rng = np.random.default_rng(3)
NP = {"i4": ml_dtypes.int4, "u4": ml_dtypes.uint4, "i8": np.int8, "u8": np.uint8, "i16": np.int16, "u16": np.uint16}
RANGE = {"i4": (-8, 7), "u4": (0, 15), "i8": (-128, 127), "u8": (0, 255), "i16": (-32768, 32767), "u16": (0, 65535)}


def zp_of(dtype, shape=()):
    lo, hi = RANGE[dtype]
    return rng.integers(lo // 4, hi // 4 + 1, size=shape).astype(NP[dtype])


def scale_of(shape=(), dtype=np.float32):
    return rng.uniform(0.02, 0.2, size=shape).astype(dtype)


def spec_quantize(x, scale, zp, lo, hi):
    """The formula in the ONNX spec: saturate(round_half_to_even(x / scale) + zero_point)."""
    return np.clip(np.rint(x.astype(np.float32) / scale) + zp, lo, hi)


@pytest.mark.parametrize("dtype", ["u8", "i8", "u16", "i16", "u4", "i4"])
@pytest.mark.parametrize("with_zp", [True, False])
def test_quantize_per_tensor(dtype, with_zp):
    x = (rng.standard_normal((3, 4, 5)) * 4).astype(np.float32)
    zp = zp_of(dtype) if with_zp else None
    check("quantize", [x, scale_of(), zp], {"dtype": dtype})


@pytest.mark.parametrize("axis", [0, 1, -1])
@pytest.mark.parametrize("dtype", ["u8", "i8", "i4"])
def test_quantize_per_axis(axis, dtype):
    x = (rng.standard_normal((3, 4, 5)) * 4).astype(np.float32)
    n = x.shape[axis]
    check("quantize", [x, scale_of((n,)), zp_of(dtype, (n,))], {"axis": axis, "dtype": dtype})


@pytest.mark.parametrize("axis,block_size", [(0, 2), (1, 2), (-1, 3), (1, 4), (2, 5)])
@pytest.mark.parametrize("with_zp", [True, False])
def test_quantize_blocked(axis, block_size, with_zp):
    x = (rng.standard_normal((3, 4, 5)) * 4).astype(np.float32)
    sshape = list(x.shape)
    sshape[axis] = -(-sshape[axis] // block_size)
    zp = zp_of("i8", tuple(sshape)) if with_zp else None
    check("quantize", [x, scale_of(tuple(sshape)), zp], {"axis": axis, "block_size": block_size, "dtype": "i8"})


def test_quantize_f16():
    x = (rng.standard_normal((4, 6)) * 3).astype(np.float16)
    check("quantize", [x, scale_of(dtype=np.float16), zp_of("u8")], {"dtype": "u8"})


@pytest.mark.parametrize("dtype", ["u8", "i8", "i4", "u4", "i16"])
def test_quantize_ties_and_saturation_follow_the_spec(dtype):
    lo, hi = RANGE[dtype]
    halves = np.arange(-10.5, 10.5, 0.5, dtype=np.float32)  # every tie x.5 from -10.5 to 10
    x = np.concatenate([halves, np.array([1e9, -1e9, np.inf, -np.inf, hi + 0.5, lo - 0.5], np.float32)])
    scale = np.float32(0.25)
    zp = np.array(lo // 2 + hi // 2 + 1, NP[dtype]) if dtype[0] == "u" else np.array(1, NP[dtype])
    (y,), (t,) = run_kiln("quantize", [x * scale, np.array(scale), zp], {"dtype": dtype})
    assert t == TensorType(dtype, x.shape) == TensorType.of(y)
    want = spec_quantize(x * scale, scale, int(zp), lo, hi)
    np.testing.assert_array_equal(y.astype(np.int64), want.astype(np.int64))
    # round half to even: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, -0.5 -> 0, -1.5 -> -2
    i = {float(v): k for k, v in enumerate(x)}
    assert [int(y[i[v]]) - int(zp) for v in (0.5, 1.5, 2.5, -0.5, -1.5, -2.5)] == [0, 2, 2, 0, -2, -2]


def test_quantize_ties_vs_onnxruntime():
    # with a power-of-two scale x / scale is exact, so onnxruntime agrees on ties too
    x = np.arange(-6.5, 6.5, 0.5, dtype=np.float32) * np.float32(0.5)
    check("quantize", [x, np.array(0.5, np.float32), np.array(3, np.uint8)], {"dtype": "u8"})


@pytest.mark.parametrize("dtype", ["u8", "i8", "u16", "i16", "u4", "i4"])
@pytest.mark.parametrize("with_zp", [True, False])
def test_dequantize_per_tensor(dtype, with_zp):
    lo, hi = RANGE[dtype]
    x = rng.integers(lo, hi + 1, size=(3, 4)).astype(NP[dtype])
    check("dequantize", [x, scale_of(), zp_of(dtype) if with_zp else None])


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_dequantize_per_axis(axis):
    x = rng.integers(-128, 128, size=(3, 4, 2)).astype(np.int8)
    n = x.shape[axis]
    check("dequantize", [x, scale_of((n,)), zp_of("i8", (n,))], {"axis": axis})


@pytest.mark.parametrize("axis,block_size", [(0, 2), (1, 3), (-1, 2)])
@pytest.mark.parametrize("dtype", ["i8", "u4"])
def test_dequantize_blocked(axis, block_size, dtype):
    lo, hi = RANGE[dtype]
    x = rng.integers(lo, hi + 1, size=(3, 4, 5)).astype(NP[dtype])
    sshape = list(x.shape)
    sshape[axis] = -(-sshape[axis] // block_size)
    check("dequantize", [x, scale_of(tuple(sshape)), zp_of(dtype, tuple(sshape))],
          {"axis": axis, "block_size": block_size})


def test_dequantize_i32_and_f16():
    check("dequantize", [rng.integers(-10 ** 6, 10 ** 6, size=(5,)).astype(np.int32), scale_of()])
    check("dequantize", [rng.integers(0, 256, size=(2, 3)).astype(np.uint8), scale_of(dtype=np.float16),
                         np.array(128, np.uint8)])


def test_round_trip():
    x = rng.uniform(-1, 1, size=(4, 8)).astype(np.float32)
    s = np.array([0.01, 0.02, 0.005, 0.008], np.float32)
    zp = np.array([0, 3, -2, 1], np.int8)
    (q,), _ = run_kiln("quantize", [x, s, zp], {"axis": 0, "dtype": "i8"})
    (y,), _ = run_kiln("dequantize", [q, s, zp], {"axis": 0})
    inside = np.abs(x / s[:, None]) < 120
    assert (np.abs(y - x)[inside] <= (s[:, None] / 2 + 1e-7).repeat(8, 1)[inside]).all()


def test_symbolic_dims_flow():
    assert infer("quantize", ["f32[N,64]", "f32[]", "i8[]"], dtype="i8") == [T("i8[N,64]")]
    assert infer("quantize", ["f32[N,64]", "f32[64]"], axis=1) == [T("u8[N,64]")]
    assert infer("quantize", ["f32[N,64]", "f32[N,2]"], axis=1, block_size=32, dtype="i4") == [T("i4[N,64]")]
    assert infer("dequantize", ["i8[N,64]", "f16[64]", "i8[64]"], axis=-1) == [T("f16[N,64]")]


@pytest.mark.parametrize("op,types,attrs,match", [
    ("quantize", ["f32[4,3]", "f32[]", "i8[]"], {}, "zero point has dtype i8 but the output dtype attribute is u8"),
    ("quantize", ["f32[4,3]", "f16[]"], {}, "scale has dtype f16"),
    ("quantize", ["i32[4,3]", "i32[]"], {}, "dtype"),
    ("quantize", ["f32[4,3]", "f32[]"], {"dtype": "f32"}, "output dtype"),
    ("quantize", ["f32[4,3]", "f32[4]"], {"axis": 1}, "per-axis scale has 4 entries but axis 1"),
    ("quantize", ["f32[4,3]", "f32[3]", "u8[4]"], {"axis": 1}, "zero point"),
    ("quantize", ["f32[4,3]", "f32[2,2]"], {}, "scalar"),
    ("quantize", ["f32[4,6]", "f32[4,2]"], {"axis": 1, "block_size": 2}, "needs 3"),
    ("quantize", ["f32[4,6]", "f32[3,3]"], {"axis": 1, "block_size": 2}, "differs"),
    ("quantize", ["f32[4,6]", "f32[4]"], {"axis": 1, "block_size": 2}, "rank"),
    ("quantize", ["f32[4,3]", "f32[3]"], {"axis": 2}, "out of range"),
    ("dequantize", ["f32[4,3]", "f32[]"], {}, "dtype"),
    ("dequantize", ["i8[4,3]", "f64[]"], {}, "scale"),
    ("dequantize", ["i8[4,3]", "f32[]", "u8[]"], {}, "zero point has dtype u8"),
])
def test_type_errors(op, types, attrs, match):
    with pytest.raises(OpTypeError, match=match) as e:
        infer(op, types, **attrs)
    assert str(e.value).startswith(f"{op}:")


# ---------------------------------------------------------------- the fused integer ops (fuse-qlinear's output)


def _deq(q, scale, zp=None):
    """Dequantize in float64, independently of kiln: (q - zp) * scale."""
    return (q.astype(np.float64) - (0 if zp is None else zp.astype(np.float64))) * scale.astype(np.float64)


def test_qmatmul_is_the_float_matmul_of_the_dequantized_codes():
    qmatmul = get_op("qmatmul").reference
    a = rng.integers(-128, 128, (3, 16)).astype(np.int8)
    b = rng.integers(-127, 128, (16, 5)).astype(np.int8)
    sa, za, sb = scale_of(), zp_of("i8"), scale_of((5,))
    bias = rng.integers(-3000, 3000, 5).astype(np.int32)
    got = qmatmul(a, sa, za, b, sb, np.zeros(5, np.int8), bias)
    want = _deq(a, sa, za) @ _deq(b, sb) + bias * (np.float64(sa) * sb.astype(np.float64))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


def test_qconv_is_the_float_conv_of_the_dequantized_codes():
    import torch

    qconv = get_op("qconv").reference
    x = rng.integers(-128, 128, (1, 2, 6, 6)).astype(np.int8)
    w = rng.integers(-127, 128, (4, 2, 3, 3)).astype(np.int8)
    sx, zx, sw = scale_of(), zp_of("i8"), scale_of((4,))
    bias = rng.integers(-3000, 3000, 4).astype(np.int32)
    got = qconv(x, sx, zx, w, sw, None, bias, strides=[2, 2], pads=[1, 1, 1, 1], dilations=[], group=1)
    want = torch.nn.functional.conv2d(torch.from_numpy(_deq(x, sx, zx)),
                                      torch.from_numpy(_deq(w, sw[:, None, None, None])),
                                      torch.from_numpy(bias * (np.float64(sx) * sw.astype(np.float64))),
                                      stride=2, padding=1).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


@pytest.mark.parametrize("dtype,block", [("u4", 4), ("i4", 8), ("i8", 0)])
def test_dq_matmul_is_the_matmul_of_the_dequantized_weight(dtype, block):
    dq_matmul = get_op("dq_matmul").reference
    lo, hi = RANGE[dtype]
    w = rng.integers(lo, hi + 1, (16, 3)).astype(NP[dtype])
    a = rng.standard_normal((2, 16)).astype(np.float32)
    if block:
        scale, zp, axis = scale_of((16 // block, 3)), (zp_of(dtype, (16 // block, 3)) if dtype == "u4" else None), 0
        wf = _deq(w, np.repeat(scale, block, 0), None if zp is None else np.repeat(zp, block, 0))
    else:
        scale, zp, axis = scale_of((3,)), None, 1
        wf = _deq(w, scale)
    got = dq_matmul(a, w, scale, zp, axis=axis, block_size=block)
    np.testing.assert_allclose(got, a.astype(np.float64) @ wf, rtol=1e-5, atol=1e-5)
