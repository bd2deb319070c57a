"""ONNX converters for ONNX's quantized operators (QLinear*, *Integer, DynamicQuantizeLinear).

All of them land on kiln's existing quantization ops, no new op:

* ``QLinearMatMul`` -> ``qmatmul`` (exact integer products) with the combined
  multiplier ``a_scale * b_scale / y_scale`` (computed in the scales' dtype, as ONNX's
  reference and onnxruntime do) as its only scale, then ``quantize`` with scale 1 and
  ``y_zero_point``: ``saturate(round((a - za)(b - zb) * m) + zy)``.
* ``QLinearConv`` -> ``qconv`` the same way (bias ``B`` is qconv's int32 bias); a conv
  of more than two spatial dims, which has no integer kernel, is computed on the
  centered codes in float64 (exact) instead.
* ``MatMulInteger`` / ``ConvInteger`` (int32 results): ``qmatmul`` / ``qconv`` with unit
  scales when their f32 result is provably exact (``K * 255 * 255 < 2^24``, i.e.
  ``K <= 258`` products per output), else an int32 ``matmul`` (exact, wrapping like
  ONNX's int32 accumulation) / a float64 ``conv`` of the centered codes (exact).
* ``DynamicQuantizeLinear`` -> reduce_min/reduce_max/where/div/clip/round/cast for the
  scale and zero point (ONNX's formula; an all-zero input, which the formula leaves
  undefined, gets scale 1 as in onnxruntime: ONNX's reference says 1/255 there, the
  codes and zero point are 0 either way), then ``quantize``.
"""

from __future__ import annotations

import numpy as np

from kiln.ir.graph import Value

from .lift import _check_only, _Ctx, _Refuse, _special, conv_window

EXACT_F32_PRODUCTS = (1 << 24) // (255 * 255)  # K up to which an 8-bit dot product is exact in f32


def _one(v: Value) -> bool:
    return v.type.is_static and int(np.prod(v.type.shape, dtype=np.int64)) == 1


def _f32(ctx: _Ctx, v: Value) -> Value:
    return v if v.type.dtype == "f32" else ctx.op("cast", [v], {"to": "f32"})


def _codes(ctx: _Ctx, v: Value, what: str) -> None:
    if v.type.dtype not in ("u8", "i8"):
        raise _Refuse(f"{what} has dtype {v.type.dtype}; kiln's integer kernels take 8-bit codes")


def _zero_of(ctx: _Ctx, codes: Value) -> Value:
    return ctx.const(np.zeros((), dtype=codes.type.np_dtype))


def _multiplier(ctx: _Ctx, sa: Value, sb: Value, sy: Value) -> Value:
    """``sa * sb / sy`` in the scales' dtype, as f32 (flattened to 1-D when per channel)."""
    m = ctx.op("div", [ctx.op("mul", [sa, sb]), sy])
    if not _one(m) and m.type.rank != 1:
        m = ctx.op("reshape", [m], {"shape": [-1]})
    return _f32(ctx, m)


def _match_zp(ctx: _Ctx, scale: Value, zp: Value | None, n: int) -> tuple[Value, Value | None]:
    """Scale and zero point of the same granularity (a per-tensor one expanded to ``[n]``)."""
    if zp is None:
        return scale, None
    if _one(scale) and _one(zp):
        return scale, zp
    if _one(scale):
        scale = ctx.op("expand", [ctx.op("reshape", [scale], {"shape": [1]})], {"shape": [n]})
    if _one(zp):
        zp = ctx.op("expand", [ctx.op("reshape", [zp], {"shape": [1]})], {"shape": [n]})
    return scale, zp


def _requantize(ctx: _Ctx, y: Value, zy: Value | None, dtype: str) -> Value:
    """saturate(round(y) + zy) in ``dtype`` (ONNX's final step of every QLinear op)."""
    one = ctx.const(np.ones((), np.float32))
    return ctx.op("quantize", [y, one, zy], {"axis": 0, "block_size": 0, "dtype": dtype}, out=0)


# ====================================================================== matmul

@_special("QLinearMatMul", needs=("qmatmul", "quantize", "mul", "div", "cast", "reshape", "expand"))
def _qlinear_matmul(ctx: _Ctx) -> list[Value | None]:
    a, sa, za, b, sb, zb, sy, zy = (ctx.x(i) for i in range(8))
    _codes(ctx, a, "input a")
    _codes(ctx, b, "input b")
    if not (_one(sa) and _one(za) and _one(sy) and _one(zy)):
        raise _Refuse("a per-row scale of a (or a non-scalar output scale) is not supported; kiln's "
                      "qmatmul quantizes a per tensor")
    if not _one(sb) and b.type.rank != 2:
        raise _Refuse(f"a per-column scale of b needs a 2-D b, got {b.type}")
    m, zb = _match_zp(ctx, _multiplier(ctx, sa, sb, sy), zb, b.type.shape[-1])
    y = ctx.op("qmatmul", [a, ctx.const(np.ones((), np.float32)), za, b, m, zb])
    return [_requantize(ctx, y, zy, zy.type.dtype)]


@_special("MatMulInteger", needs=("qmatmul", "matmul", "cast", "sub", "reshape", "expand"))
def _matmul_integer(ctx: _Ctx) -> list[Value | None]:
    a, b, za, zb = ctx.x(0), ctx.x(1), ctx.input(2), ctx.input(3)
    _codes(ctx, a, "input A")
    _codes(ctx, b, "input B")
    k = a.type.shape[-1]
    per_tensor_a = za is None or _one(za)
    per_col_b = zb is None or _one(zb) or (b.type.rank == 2 and zb.type.rank == 1)
    if isinstance(k, int) and k <= EXACT_F32_PRODUCTS and per_tensor_a and per_col_b and a.type.rank >= 2 \
            and b.type.rank >= 2:
        ones = ctx.const(np.ones((), np.float32) if zb is None or _one(zb) else np.ones(zb.type.shape, np.float32))
        y = ctx.op("qmatmul", [a, ctx.const(np.ones((), np.float32)), za if za is not None else _zero_of(ctx, a), b, ones, zb])
        return [ctx.op("cast", [y], {"to": "i32"}, out=0)]
    a32 = _centered_i32(ctx, a, za, row_axis=True)
    b32 = _centered_i32(ctx, b, zb, row_axis=False)
    return [ctx.op("matmul", [a32, b32], out=0)]


def _centered_i32(ctx: _Ctx, x: Value, zp: Value | None, *, row_axis: bool) -> Value:
    """``x - zp`` in int32; a 1-D per-row zero point of a 2-D A is made a column ([M, 1])."""
    x32 = ctx.op("cast", [x], {"to": "i32"})
    if zp is None:
        return x32
    z32 = ctx.op("cast", [zp], {"to": "i32"})
    if row_axis and x.type.rank == 2 and zp.type.rank == 1 and not _one(zp):
        z32 = ctx.op("reshape", [z32], {"shape": [-1, 1]})
    return ctx.op("sub", [x32, z32])


# ====================================================================== conv

def _conv_attrs(ctx: _Ctx, x: Value, w: Value) -> dict:
    attrs = conv_window(ctx, x, w)
    _check_only(ctx, ("auto_pad", "dilations", "group", "kernel_shape", "pads", "strides"))
    return attrs


def _products(w: Value) -> int | None:
    """Products summed per conv output: C/group * prod(kernel), when static."""
    dims = w.type.shape[1:]
    return int(np.prod(dims, dtype=np.int64)) if all(isinstance(d, int) for d in dims) else None


def _conv_f64(ctx: _Ctx, x: Value, zx: Value | None, w: Value, zw: Value | None, attrs: dict) -> Value:
    """conv(x - zx, w - zw) in float64: exact integer values (|sum| < 2^53)."""
    xf = ctx.op("cast", [x], {"to": "f64"})
    wf = ctx.op("cast", [w], {"to": "f64"})
    if zx is not None:
        xf = ctx.op("sub", [xf, ctx.op("cast", [zx], {"to": "f64"})])
    if zw is not None:
        z = ctx.op("cast", [zw], {"to": "f64"})
        if not _one(zw):
            z = ctx.op("reshape", [z], {"shape": [-1] + [1] * (w.type.rank - 1)})
        wf = ctx.op("sub", [wf, z])
    return ctx.op("conv", [xf, wf], attrs)


@_special("ConvInteger", needs=("qconv", "conv", "cast", "sub", "reshape", "expand"))
def _conv_integer(ctx: _Ctx) -> list[Value | None]:
    x, w, zx, zw = ctx.x(0), ctx.x(1), ctx.input(2), ctx.input(3)
    _codes(ctx, x, "input x")
    _codes(ctx, w, "input w")
    attrs = _conv_attrs(ctx, x, w)
    if zx is not None and not _one(zx):
        raise _Refuse(f"x_zero_point must be per tensor, got {zx.type}")
    k = _products(w)
    m = w.type.shape[0]
    if k is not None and k <= EXACT_F32_PRODUCTS and x.type.rank <= 4 and isinstance(m, int):
        scale, zw2 = _match_zp(ctx, ctx.const(np.ones((), np.float32)), zw, m)
        y = ctx.op("qconv", [x, ctx.const(np.ones((), np.float32)), zx if zx is not None else _zero_of(ctx, x), w, scale, zw2], attrs)
        return [ctx.op("cast", [y], {"to": "i32"}, out=0)]
    return [ctx.op("cast", [_conv_f64(ctx, x, zx, w, zw, attrs)], {"to": "i32"}, out=0)]


@_special("QLinearConv", needs=("qconv", "conv", "quantize", "mul", "div", "cast", "sub", "add", "reshape",
                                 "expand"))
def _qlinear_conv(ctx: _Ctx) -> list[Value | None]:
    x, sx, zx, w, sw, zw, sy, zy = (ctx.x(i) for i in range(8))
    bias = ctx.input(8)
    _codes(ctx, x, "input x")
    _codes(ctx, w, "input w")
    if not (_one(sx) and _one(zx) and _one(sy) and _one(zy)):
        raise _Refuse("x and y must be quantized per tensor")
    attrs = _conv_attrs(ctx, x, w)
    m_out = w.type.shape[0]
    mult = _multiplier(ctx, sx, sw, sy)
    if x.type.rank <= 4 and isinstance(m_out, int):
        mult, zw = _match_zp(ctx, mult, zw, m_out)
        y = ctx.op("qconv", [x, ctx.const(np.ones((), np.float32)), zx, w, mult, zw, bias], attrs)
        return [_requantize(ctx, y, zy, zy.type.dtype)]
    acc = _conv_f64(ctx, x, zx, w, zw, attrs)
    if bias is not None:
        b = ctx.op("reshape", [ctx.op("cast", [bias], {"to": "f64"})], {"shape": [-1] + [1] * (x.type.rank - 2)})
        acc = ctx.op("add", [acc, b])
    scale = ctx.op("cast", [mult], {"to": "f64"})
    if not _one(mult):
        scale = ctx.op("reshape", [scale], {"shape": [-1] + [1] * (x.type.rank - 2)})
    y = ctx.op("cast", [ctx.op("mul", [acc, scale])], {"to": "f32"})
    return [_requantize(ctx, y, zy, zy.type.dtype)]


# ====================================================================== DynamicQuantizeLinear

@_special("DynamicQuantizeLinear", needs=("reduce_min", "reduce_max", "min", "max", "sub", "div", "neg",
                                          "equal", "where", "clip", "round", "cast", "quantize"))
def _dynamic_quantize_linear(ctx: _Ctx) -> list[Value | None]:
    """scale = (max(x, 0) - min(x, 0)) / 255 (1 when that range is 0), zp = round(clip(-min/scale))."""
    x = ctx.x()
    if x.type.dtype != "f32":
        raise _Refuse(f"x must be float32, got {x.type}")
    zero, one = ctx.scalar(0, x), ctx.scalar(1, x)
    lo = ctx.op("min", [ctx.op("reduce_min", [x], {"axes": [], "keepdims": 0}), zero])
    hi = ctx.op("max", [ctx.op("reduce_max", [x], {"axes": [], "keepdims": 0}), zero])
    span = ctx.op("sub", [hi, lo])
    scale = ctx.op("div", [span, ctx.scalar(255, x)])
    scale = ctx.op("where", [ctx.op("equal", [span, zero]), one, scale], out=1)
    zp_f = ctx.op("clip", [ctx.op("neg", [ctx.op("div", [lo, scale])])], {"min": 0.0, "max": 255.0})
    zp = ctx.op("cast", [ctx.op("round", [zp_f])], {"to": "u8"}, out=2)
    y = ctx.op("quantize", [x, scale, zp], {"axis": 0, "block_size": 0, "dtype": "u8"}, out=0)
    return [y, scale, zp]
