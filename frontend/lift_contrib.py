"""ONNX converters for the com.microsoft ops that ONNX Runtime's quantization tool emits (QOperator format).

``quantize_static(..., quant_format=QuantFormat.QOperator)`` (onnxruntime 1.31) writes the
standard QLinearConv / QLinearMatMul (frontend/lift_quant.py) and these contrib ops; each is
lifted onto kiln's existing ops, following the CPU kernels of onnxruntime (the reference):

* ``QGemm`` -> ``qmatmul`` with scale ``alpha * a_scale * b_scale / y_scale`` (f32, onnxruntime's
  order) and the int32 bias, then ``quantize`` with scale 1 and ``y_zero_point``: exact, as
  QLinearMatMul. A bias kiln's qmatmul cannot take ([M, 1], [M, N]) goes through an int32 matmul
  (also exact). Without ``y_scale`` the float result is the output.
* ``QLinearGlobalAveragePool`` -> ``sum(x) - N * x_zp`` on the codes (exact in f32 below 2^24),
  times ``x_scale / (y_scale * N)`` in f32, rounded: onnxruntime's integer formula, exact.
* ``QLinearAveragePool`` -> dequantize, ``avg_pool``, ``round(y / y_scale + y_zp)`` (the zero
  point added before rounding, as onnxruntime's pool kernel does), saturated.
* ``QLinearAdd`` / ``QLinearMul`` / ``QLinearSigmoid`` / ``QLinearLeakyRelu`` / ``QLinearWhere``
  -> the QDQ form: dequantize, the float op, quantize. onnxruntime computes these in fixed point
  (add) or through a 256-entry table of its own float functions, so a code can differ by one
  where the exact value lies within float rounding of a rounding boundary.
* ``QLinearConcat`` -> the codes of inputs quantized like the output, the others requantized
  (dequantize -> quantize), then ``concat``: exact.
* ``QLinearSoftmax`` -> dequantize, ``softmax`` (opset < 13: over the flattened trailing dims), times
  ``floor(1 / y_scale)`` (onnxruntime multiplies by that integer rather than dividing by the scale),
  quantized with scale 1: within one code.
* ``MatMulIntegerToFloat`` / ``DynamicQuantizeMatMul`` (what onnxruntime's optimizer fuses
  ``quantize_dynamic``'s output into) -> ``qmatmul`` with scale ``a_scale * b_scale`` (+ bias);
  the dynamic one quantizes ``A`` first as ``DynamicQuantizeLinear`` does. Float outputs, within
  float rounding of onnxruntime (which adds the bias in another order).
* ``QuantizeLinear`` / ``DequantizeLinear`` of the com.microsoft domain -> the standard converters.

Zero points absent mean 0 of the codes' type. Scales and zero points of activations must be
per tensor (onnxruntime requires it too); per-column weight scales are taken where the kernel is.
On the tests' random codes (tests/frontend/test_lift_contrib.py) every op, the "within one code"
ones included, gave onnxruntime's codes exactly. Not lifted (listed as unsupported):
``DynamicQuantizeLSTM`` (onnxruntime requantizes x and h at every step; kiln has no quantized
LSTM), ``QAttention`` / ``QEmbedLayerNormalization`` (quantized forms of contrib float ops kiln
does not lift either) and the NHWC ``QLinearConv`` of onnxruntime's layout optimizer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from onnx import helper

from kiln.ir.graph import Value
from kiln.ir.registry import OpTypeError

from .lift import _SPECIAL, _Ctx, _Refuse, _special

MS = "com.microsoft::"
Converter = Callable[[_Ctx], list[Value | None]]
CODES = ("u8", "i8")
EXACT_F32_SUM = (1 << 24) // 255  # codes summed exactly in f32 up to this count


# ====================================================================== helpers

def _contrib(op_type: str, needs: Sequence[str]) -> Callable[[Converter], Converter]:
    """Register a converter for ``com.microsoft::op_type``; a kiln type rule's objection becomes a refusal
    (the lifter does that for standard ops only)."""
    def deco(fn: Converter) -> Converter:
        def convert(ctx: _Ctx) -> list[Value | None]:
            try:
                return fn(ctx)
            except OpTypeError as e:
                raise _Refuse(f"kiln's type rule refuses it: {e}") from None
        _special(MS + op_type, needs=needs)(convert)
        return fn
    return deco


def _one(v: Value) -> bool:
    """A per-tensor parameter: one element."""
    return v.type.is_static and int(np.prod(v.type.shape, dtype=np.int64)) == 1


def _known(ctx: _Ctx, names: Sequence[str]) -> None:
    """Refuse an attribute this converter does not implement (contrib ops have no schema defaults here)."""
    extra = sorted(set(ctx.attrs) - set(names))
    if extra:
        raise _Refuse(f"attribute(s) {', '.join(extra)} of {ctx.node.op_type} are not supported")


def _codes(v: Value, what: str) -> None:
    if v.type.dtype not in CODES:
        raise _Refuse(f"{what} has dtype {v.type.dtype}; kiln lifts these ops for 8-bit codes (u8, i8) only")


def _per_tensor(ctx: _Ctx, *pairs: tuple[Value | None, str]) -> None:
    for v, what in pairs:
        if v is not None and not _one(v):
            raise _Refuse(f"{what} must be per tensor (one element), got {v.type}")
        if v is not None and what.endswith("scale") and v.type.dtype != "f32":
            raise _Refuse(f"{what} must be float32, got {v.type}")


def _scalar(v: Value, ctx: _Ctx) -> Value:
    """A one-element parameter as a rank-0 value."""
    return v if v.type.rank == 0 else ctx.op("reshape", [v], {"shape": []})


def _zero(ctx: _Ctx, dtype: str) -> Value:
    return ctx.const(np.zeros((), dtype=np.dtype({"u8": np.uint8, "i8": np.int8}[dtype])))


def _dq(ctx: _Ctx, x: Value, scale: Value, zp: Value | None) -> Value:
    """dequantize(x) per tensor: ``(x - zp) * scale`` in f32."""
    return ctx.op("dequantize", [x, _scalar(scale, ctx), None if zp is None else _scalar(zp, ctx)],
                  {"axis": 1, "block_size": 0})


def _q(ctx: _Ctx, y: Value, scale: Value, zp: Value | None, dtype: str, out: int | None = 0) -> Value:
    """quantize(y) per tensor to ``dtype`` (zero point absent: 0)."""
    zp = _zero(ctx, dtype) if zp is None else _scalar(zp, ctx)
    return ctx.op("quantize", [y, _scalar(scale, ctx), zp], {"axis": 0, "block_size": 0, "dtype": dtype},
                  out=out)


def _requantize_unit(ctx: _Ctx, y: Value, zp: Value | None, dtype: str) -> Value:
    """``saturate(round(y) + zp)``: the last step of onnxruntime's integer kernels."""
    return _q(ctx, y, ctx.const(np.ones((), np.float32)), zp, dtype)


def _delegate(ctx: _Ctx, op_type: str, inputs: Sequence[Value | None], attrs: dict | None = None,
              *, opset: int | None = None, n_out: int = 1, own_outputs: bool = False) -> list[Value | None]:
    """Run the converter of the standard ONNX op ``op_type`` on ``inputs``; its outputs get fresh names
    (``own_outputs``: the node's own output names, when it computes them)."""
    spec = _SPECIAL.get(op_type)
    if spec is None:
        raise _Refuse(f"kiln has no converter for {op_type}, which {ctx.node.op_type} is lifted through")
    names = [v.name if v is not None else "" for v in inputs]
    base = next((o for o in ctx.outs if o), op_type)
    outs = list(ctx.outs) if own_outputs else [ctx.lifter.fresh(f"{base}_{op_type.lower()}_{k}")
                                               for k in range(n_out)]
    node = helper.make_node(op_type, names, outs, name=ctx.node.name, **(attrs or {}))
    sub = _Ctx(ctx.lifter, node, "", list(inputs), outs)
    if opset is not None:
        sub.opset = opset
    return spec.fn(sub)


def _opt_zp(ctx: _Ctx, i: int, codes: Value, what: str) -> Value | None:
    zp = ctx.input(i)
    if zp is not None and zp.type.dtype != codes.type.dtype:
        raise _Refuse(f"{what} has dtype {zp.type.dtype}, the codes {codes.type.dtype}")
    return zp


# ====================================================================== QGemm

def _flat(ctx: _Ctx, v: Value) -> Value:
    """A per-tensor or per-column parameter as rank 0 or 1."""
    if _one(v):
        return _scalar(v, ctx)
    return v if v.type.rank == 1 else ctx.op("reshape", [v], {"shape": [-1]})


def _spread(ctx: _Ctx, v: Value, n: int) -> Value:
    """A one-element parameter as ``[n]``."""
    return ctx.op("expand", [ctx.op("reshape", [v], {"shape": [1]})], {"shape": [n]})


def _match(ctx: _Ctx, scale: Value, zp: Value | None, n: object) -> tuple[Value, Value | None]:
    """A flat scale and zero point of one granularity (qmatmul's rule): a per-tensor one spread to ``[n]``."""
    scale, zp = _flat(ctx, scale), None if zp is None else _flat(ctx, zp)
    if zp is None or scale.type.rank == zp.type.rank:
        return scale, zp
    if not isinstance(n, int):
        raise _Refuse(f"a per-column parameter needs a static column count, got {n}", dynamic=True)
    return (scale, _spread(ctx, zp, n)) if scale.type.rank else (_spread(ctx, scale, n), zp)


def _bias_n(ctx: _Ctx, c: Value | None, n: object) -> tuple[Value | None, bool]:
    """The int32 bias as qmatmul's ``[N]`` (True), or False when it varies along M."""
    if c is None:
        return None, True
    if c.type.dtype != "i32":
        raise _Refuse(f"bias C must be int32, got {c.type}")
    if _one(c) and isinstance(n, int):
        return _spread(ctx, c, n), True
    shape = c.type.shape
    if (len(shape) == 1 or (len(shape) == 2 and shape[0] == 1)) and shape[-1] == n:
        return (c if len(shape) == 1 else ctx.op("reshape", [c], {"shape": [-1]})), True
    return c, False


def _qgemm_scale(ctx: _Ctx, alpha: float, sa: Value, sb: Value, sy: Value | None) -> Value:
    """``alpha * a_scale * b_scale[i] / y_scale`` in f32, left to right as onnxruntime computes it."""
    m = ctx.op("mul", [ctx.op("mul", [ctx.const(np.array(alpha, np.float32)), _scalar(sa, ctx)]), _flat(ctx, sb)])
    return m if sy is None else ctx.op("div", [m, _scalar(sy, ctx)])


def _int32_matmul(ctx: _Ctx, a: Value, za: Value | None, b: Value, zb: Value | None) -> Value:
    """``(a - za) @ (b - zb)`` in int32 (exact); ``zb`` per tensor or per column."""
    def centered(x: Value, z: Value | None) -> Value:
        x32 = ctx.op("cast", [x], {"to": "i32"})
        return x32 if z is None else ctx.op("sub", [x32, ctx.op("cast", [_flat(ctx, z)], {"to": "i32"})])
    return ctx.op("matmul", [centered(a, za), centered(b, zb)])


@_contrib("QGemm", needs=("qmatmul", "matmul", "quantize", "transpose", "mul", "div", "cast", "sub",
                               "add", "reshape", "expand"))
def _qgemm(ctx: _Ctx) -> list[Value | None]:
    a, sa, za, b, sb = (ctx.x(i) for i in range(5))
    zb, c, sy, zy = ctx.input(5), ctx.input(6), ctx.input(7), ctx.input(8)
    _known(ctx, ("alpha", "transA", "transB"))
    _codes(a, "input A")
    _codes(b, "input B")
    if a.type.rank != 2 or b.type.rank != 2:
        raise _Refuse(f"A and B must be 2-D, got {a.type} and {b.type}")
    _per_tensor(ctx, (sa, "a_scale"), (za, "a_zero_point"), (sy, "y_scale"), (zy, "y_zero_point"))
    za = _zero(ctx, a.type.dtype) if za is None else za
    if sy is not None and zy is None:
        raise _Refuse("y_scale without y_zero_point (onnxruntime would return unrounded floats)")
    if ctx.attrs.get("transA", 0):
        a = ctx.op("transpose", [a], {"perm": [1, 0]})
    if ctx.attrs.get("transB", 0):
        b = ctx.op("transpose", [b], {"perm": [1, 0]})
    n = b.type.shape[1]
    for v, what in ((sb, "b_scale"), (zb, "b_zero_point")):
        if v is not None and not _one(v) and tuple(v.type.shape) != (n,):
            raise _Refuse(f"{what} must be per tensor or one per column [{n}], got {v.type}")
    if sb.type.dtype != "f32":
        raise _Refuse(f"b_scale must be float32, got {sb.type}")
    scale = _qgemm_scale(ctx, float(ctx.attrs.get("alpha", 1.0)), sa, sb, sy)
    bias, as_vector = _bias_n(ctx, c, n)
    if as_vector and isinstance(n, int):
        scale_n, zb_n = _match(ctx, scale, zb, n)
        y = ctx.op("qmatmul", [a, ctx.const(np.ones((), np.float32)), _scalar(za, ctx), b, scale_n, zb_n, bias],
                   out=0 if sy is None else None)
    else:
        acc = _int32_matmul(ctx, a, za, b, zb)
        if bias is not None:
            acc = ctx.op("add", [acc, bias])
        y = ctx.op("mul", [ctx.op("cast", [acc], {"to": "f32"}), scale], out=0 if sy is None else None)
    if sy is None:
        return [y]
    return [_requantize_unit(ctx, y, zy, zy.type.dtype)]


# ====================================================================== elementwise (QDQ form)

def _binary(kop: str) -> Callable[[_Ctx], list[Value | None]]:
    def convert(ctx: _Ctx) -> list[Value | None]:
        a, sa, b, sb, sc = ctx.x(0), ctx.x(1), ctx.x(3), ctx.x(4), ctx.x(6)
        _known(ctx, ())
        _codes(a, "input A")
        if b.type.dtype != a.type.dtype:
            raise _Refuse(f"A and B differ in dtype ({a.type.dtype}, {b.type.dtype})")
        za, zb, zc = _opt_zp(ctx, 2, a, "A_zero_point"), _opt_zp(ctx, 5, b, "B_zero_point"), _opt_zp(ctx, 7, a, "C_zero_point")
        _per_tensor(ctx, (sa, "A_scale"), (za, "A_zero_point"), (sb, "B_scale"), (zb, "B_zero_point"),
                    (sc, "C_scale"), (zc, "C_zero_point"))
        y = ctx.op(kop, [_dq(ctx, a, sa, za), _dq(ctx, b, sb, zb)])
        return [_q(ctx, y, sc, zc, a.type.dtype)]
    return convert


_contrib("QLinearAdd", needs=("dequantize", "quantize", "add", "reshape"))(_binary("add"))
_contrib("QLinearMul", needs=("dequantize", "quantize", "mul", "reshape"))(_binary("mul"))


def _unary(kop: str, attrs: Callable[[_Ctx], dict]) -> Callable[[_Ctx], list[Value | None]]:
    def convert(ctx: _Ctx) -> list[Value | None]:
        x, sx, sy = ctx.x(0), ctx.x(1), ctx.x(3)
        _codes(x, "input X")
        zx, zy = _opt_zp(ctx, 2, x, "X_zero_point"), _opt_zp(ctx, 4, x, "Y_zero_point")
        _per_tensor(ctx, (sx, "X_scale"), (zx, "X_zero_point"), (sy, "Y_scale"), (zy, "Y_zero_point"))
        y = ctx.op(kop, [_dq(ctx, x, sx, zx)], attrs(ctx))
        return [_q(ctx, y, sy, zy, x.type.dtype)]
    return convert


def _no_attrs(ctx: _Ctx) -> dict:
    _known(ctx, ())
    return {}


def _leaky_attrs(ctx: _Ctx) -> dict:
    _known(ctx, ("alpha",))
    return {"alpha": float(ctx.attrs.get("alpha", 0.01))}


_contrib("QLinearSigmoid", needs=("dequantize", "quantize", "sigmoid", "reshape"))(_unary("sigmoid", _no_attrs))
_contrib("QLinearLeakyRelu", needs=("dequantize", "quantize", "leaky_relu", "reshape"))(
    _unary("leaky_relu", _leaky_attrs))


@_contrib("QLinearWhere", needs=("dequantize", "quantize", "where", "reshape"))
def _qlinear_where(ctx: _Ctx) -> list[Value | None]:
    cond, x, sx, y, sy, sz = ctx.x(0), ctx.x(1), ctx.x(2), ctx.x(4), ctx.x(5), ctx.x(7)
    _known(ctx, ())
    _codes(x, "input X")
    if y.type.dtype != x.type.dtype:
        raise _Refuse(f"X and Y differ in dtype ({x.type.dtype}, {y.type.dtype})")
    if cond.type.dtype != "bool":
        raise _Refuse(f"condition must be bool, got {cond.type}")
    zx, zy, zz = _opt_zp(ctx, 3, x, "x_zero_point"), _opt_zp(ctx, 6, y, "y_zero_point"), _opt_zp(ctx, 8, x, "z_zero_point")
    _per_tensor(ctx, (sx, "x_scale"), (zx, "x_zero_point"), (sy, "y_scale"), (zy, "y_zero_point"),
                (sz, "z_scale"), (zz, "z_zero_point"))
    w = ctx.op("where", [cond, _dq(ctx, x, sx, zx), _dq(ctx, y, sy, zy)])
    return [_q(ctx, w, sz, zz, x.type.dtype)]


# ====================================================================== concat

def _same_params(s1: Value, z1: Value | None, s2: Value, z2: Value | None) -> bool:
    """Constant per-tensor parameters that are equal (so the codes pass through unchanged)."""
    if s1.const is None or s2.const is None:
        return s1 is s2 and z1 is z2
    zs = [np.zeros(1) if z is None else z.const for z in (z1, z2)]
    if any(z is None for z in zs):
        return False
    return bool(np.array_equal(s1.const.reshape(-1), s2.const.reshape(-1))
                and np.array_equal(zs[0].reshape(-1).astype(np.int64), zs[1].reshape(-1).astype(np.int64)))


@_contrib("QLinearConcat", needs=("dequantize", "quantize", "concat", "reshape"))
def _qlinear_concat(ctx: _Ctx) -> list[Value | None]:
    sy, zy = ctx.x(0), ctx.input(1)
    _known(ctx, ("axis",))
    if "axis" not in ctx.attrs:
        raise _Refuse("attribute axis is required")
    if (len(ctx.inputs) - 2) % 3 or len(ctx.inputs) < 5:
        raise _Refuse(f"inputs must be Y_scale, Y_zero_point and (X, X_scale, X_zero_point) triples, got "
                      f"{len(ctx.inputs)}")
    x0 = ctx.x(2)
    _codes(x0, "input 0")
    dtype = x0.type.dtype
    if zy is not None and zy.type.dtype != dtype:
        raise _Refuse(f"Y_zero_point has dtype {zy.type.dtype}, the inputs {dtype}")
    _per_tensor(ctx, (sy, "Y_scale"), (zy, "Y_zero_point"))
    parts = []
    for k in range(2, len(ctx.inputs), 3):
        x, sx, zx = ctx.x(k), ctx.x(k + 1), ctx.input(k + 2)
        if x.type.dtype != dtype:
            raise _Refuse(f"input {(k - 2) // 3} has dtype {x.type.dtype}, input 0 {dtype}")
        _per_tensor(ctx, (sx, f"scale of input {(k - 2) // 3}"), (zx, f"zero point of input {(k - 2) // 3}"))
        if _same_params(sx, zx, sy, zy):
            parts.append(x)
        else:
            parts.append(_q(ctx, _dq(ctx, x, sx, zx), sy, zy, dtype, out=None))
    return [ctx.op("concat", parts, {"axis": int(ctx.attrs["axis"])}, out=0)]


# ====================================================================== pooling

def _spatial_axes(rank: int, channels_last: bool) -> list[int]:
    return list(range(1, rank - 1)) if channels_last else list(range(2, rank))


@_contrib("QLinearGlobalAveragePool", needs=("cast", "reduce_sum", "sub", "mul", "div", "quantize",
                                                  "reshape"))
def _qlinear_global_avg_pool(ctx: _Ctx) -> list[Value | None]:
    """``saturate(round((sum(x) - N * x_zp) * (x_scale / (y_scale * N))) + y_zp)``, onnxruntime's formula."""
    x, sx, zx, sy, zy = ctx.x(0), ctx.x(1), ctx.input(2), ctx.x(3), ctx.input(4)
    _known(ctx, ("channels_last",))
    _codes(x, "input X")
    _per_tensor(ctx, (sx, "x_scale"), (zx, "x_zero_point"), (sy, "y_scale"), (zy, "y_zero_point"))
    if x.type.rank < 3:
        raise _Refuse(f"input must have rank >= 3, got {x.type}")
    axes = _spatial_axes(x.type.rank, bool(ctx.attrs.get("channels_last", 0)))
    dims = [x.type.shape[i] for i in axes]
    if not all(isinstance(d, int) for d in dims):
        raise _Refuse(f"the spatial dims must be static, got {x.type}", dynamic=True)
    size = int(np.prod(dims, dtype=np.int64))
    acc_dt = "f32" if size <= EXACT_F32_SUM else "f64"
    acc = ctx.op("reduce_sum", [ctx.op("cast", [x], {"to": acc_dt})], {"axes": axes, "keepdims": 1})
    if zx is not None:
        zsum = ctx.op("mul", [ctx.op("cast", [_scalar(zx, ctx)], {"to": acc_dt}),
                              ctx.const(np.array(size, np.float32 if acc_dt == "f32" else np.float64))])
        acc = ctx.op("sub", [acc, zsum])
    if acc_dt != "f32":
        acc = ctx.op("cast", [acc], {"to": "f32"})
    scale = ctx.op("div", [_scalar(sx, ctx), ctx.op("mul", [_scalar(sy, ctx), ctx.const(np.array(size, np.float32))])])
    return [_requantize_unit(ctx, ctx.op("mul", [acc, scale]), zy, x.type.dtype)]


POOL_ATTRS = ("auto_pad", "ceil_mode", "count_include_pad", "kernel_shape", "pads", "strides")


@_contrib("QLinearAveragePool", needs=("dequantize", "avg_pool", "transpose", "div", "add", "cast",
                                            "quantize", "reshape"))
def _qlinear_avg_pool(ctx: _Ctx) -> list[Value | None]:
    """dequantize, avg_pool, then ``saturate(round(y / y_scale + y_zp))`` (onnxruntime adds the zero point
    before rounding)."""
    x, sx, zx, sy, zy = ctx.x(0), ctx.x(1), ctx.input(2), ctx.x(3), ctx.input(4)
    _known(ctx, POOL_ATTRS + ("channels_last",))
    _codes(x, "input X")
    _per_tensor(ctx, (sx, "x_scale"), (zx, "x_zero_point"), (sy, "y_scale"), (zy, "y_zero_point"))
    r = x.type.rank
    channels_last = bool(ctx.attrs.get("channels_last", 0))
    xf = _dq(ctx, x, sx, zx)
    if channels_last:
        xf = ctx.op("transpose", [xf], {"perm": [0, r - 1] + list(range(1, r - 1))})
    attrs = {k: v for k, v in ctx.attrs.items() if k in POOL_ATTRS}
    (y,) = _delegate(ctx, "AveragePool", [xf], attrs)
    if channels_last:
        y = ctx.op("transpose", [y], {"perm": [0] + list(range(2, r)) + [1]})
    y = ctx.op("div", [y, _scalar(sy, ctx)])
    if zy is not None:
        y = ctx.op("add", [y, ctx.op("cast", [_scalar(zy, ctx)], {"to": "f32"})])
    return [_q(ctx, y, ctx.const(np.ones((), np.float32)), None, x.type.dtype)]


# ====================================================================== softmax

@_contrib("QLinearSoftmax", needs=("dequantize", "softmax", "flatten", "reshape", "mul", "div", "floor",
                                        "quantize"))
def _qlinear_softmax(ctx: _Ctx) -> list[Value | None]:
    """softmax of the dequantized input, times ``floor(1 / y_scale)``, rounded, plus y_zp (onnxruntime)."""
    x, sx, zx, sy, zy = ctx.x(0), ctx.x(1), ctx.input(2), ctx.x(3), ctx.input(4)
    _known(ctx, ("axis", "opset"))
    _codes(x, "input X")
    _per_tensor(ctx, (sx, "X_scale"), (zx, "X_zero_point"), (sy, "Y_scale"), (zy, "Y_zero_point"))
    if "opset" not in ctx.attrs:
        raise _Refuse("attribute opset is required (it decides the softmax's axis semantics)")
    opset = int(ctx.attrs["opset"])
    axis = int(ctx.attrs.get("axis", 1 if opset < 13 else -1))
    (p,) = _delegate(ctx, "Softmax", [_dq(ctx, x, sx, zx)], {"axis": axis}, opset=opset)
    steps = ctx.op("floor", [ctx.op("div", [ctx.const(np.ones((), np.float32)), _scalar(sy, ctx)])])
    return [_requantize_unit(ctx, ctx.op("mul", [p, steps]), zy, x.type.dtype)]


# ====================================================================== float-output matmuls

def _matmul_to_float(ctx: _Ctx, a: Value, sa: Value, za: Value | None, b: Value, sb: Value, zb: Value | None,
                     bias: Value | None) -> Value:
    """``(a - za) @ (b - zb) * (sa * sb) (+ bias)``: qmatmul with onnxruntime's combined scale."""
    _codes(a, "input A")
    _codes(b, "input B")
    if a.type.rank < 2 or b.type.rank != 2:
        raise _Refuse(f"A must have rank >= 2 and B be 2-D, got {a.type} and {b.type}")
    n = b.type.shape[1]
    _per_tensor(ctx, (za, "a_zero_point"))
    if not _one(sa) or sa.type.dtype != "f32":
        raise _Refuse(f"a_scale must be one float32, got {sa.type}")
    for v, what in ((sb, "b_scale"), (zb, "b_zero_point")):
        if v is not None and not _one(v) and tuple(v.type.shape) != (n,):
            raise _Refuse(f"{what} must be per tensor or one per column [{n}], got {v.type}")
    scale, zb = _match(ctx, ctx.op("mul", [_scalar(sa, ctx), _flat(ctx, sb)]), zb, n)
    za = _zero(ctx, a.type.dtype) if za is None else _scalar(za, ctx)
    has_bias = bias is not None
    y = ctx.op("qmatmul", [a, ctx.const(np.ones((), np.float32)), za, b, scale, zb], out=None if has_bias else 0)
    if has_bias:
        if bias.type.dtype != "f32":
            raise _Refuse(f"bias must be float32, got {bias.type}")
        y = ctx.op("add", [y, bias], out=0)
    return y


@_contrib("MatMulIntegerToFloat", needs=("qmatmul", "mul", "add", "reshape", "expand"))
def _matmul_integer_to_float(ctx: _Ctx) -> list[Value | None]:
    a, b, sa, sb = ctx.x(0), ctx.x(1), ctx.x(2), ctx.x(3)
    _known(ctx, ())
    za, zb, bias = _opt_zp(ctx, 4, a, "a_zero_point"), _opt_zp(ctx, 5, b, "b_zero_point"), ctx.input(6)
    return [_matmul_to_float(ctx, a, sa, za, b, sb, zb, bias)]


@_contrib("DynamicQuantizeMatMul", needs=("qmatmul", "mul", "add", "reshape", "expand", "reduce_min",
                                               "reduce_max", "quantize"))
def _dynamic_quantize_matmul(ctx: _Ctx) -> list[Value | None]:
    a, b, sb = ctx.x(0), ctx.x(1), ctx.x(2)
    _known(ctx, ())
    zb, bias = _opt_zp(ctx, 3, b, "b_zero_point"), ctx.input(4)
    if a.type.dtype != "f32":
        raise _Refuse(f"A must be float32, got {a.type}")
    aq, sa, za = _delegate(ctx, "DynamicQuantizeLinear", [a], n_out=3)
    return [_matmul_to_float(ctx, aq, sa, za, b, sb, zb, bias)]


# ====================================================================== Q/DQ of the contrib domain

@_contrib("QuantizeLinear", needs=("quantize",))
def _ms_quantize(ctx: _Ctx) -> list[Value | None]:
    _known(ctx, ("axis",))
    return _delegate(ctx, "QuantizeLinear", ctx.inputs, dict(ctx.attrs), own_outputs=True)


@_contrib("DequantizeLinear", needs=("dequantize",))
def _ms_dequantize(ctx: _Ctx) -> list[Value | None]:
    _known(ctx, ("axis",))
    return _delegate(ctx, "DequantizeLinear", ctx.inputs, dict(ctx.attrs), own_outputs=True)
