"""ONNX converters for the ops of family 'transformer' that the generic registry lifting cannot express.

* ``Attention`` (opset 23, 24, 25) is decomposed into kiln ops in the order the fused attention
  kernel (``codegen/attention.py``) matches: ``matmul(q, kT) -> mul(scale) -> add(bias) ->
  softmax -> matmul(p, v)``.  Everything around that chain is ordinary ops: 3-D inputs are
  reshaped/transposed to (B, H, S, D), the KV cache is a ``concat``, GQA repeats each KV head
  (``unsqueeze``/``expand``/``reshape``, interleaved as ONNX does), softcap is
  ``softcap * tanh(x / softcap)`` (which leaves the chain unfused), and every mask (a bool or float
  ``attn_mask``, padded to the total KV length; ``is_causal``; the ONNX 25 sliding window; the
  ONNX 24 ``nonpad_kv_seqlen`` padding) becomes one additive bias of 0 / -inf.  The bias is a
  constant when no run-time input decides it.  A query row whose bias is -inf everywhere is a zero
  row (ONNX's fully-masked-row rule): a ``where`` on the output, emitted unless the bias is a
  constant with no such row.
* ``SwiGLU`` (opset 28) is ``silu(a) * b`` (``a * sigmoid(alpha * a) * b`` for alpha != 1).
* ``CausalConvWithState`` (opset 27) is ``concat(past_state or zeros, x)`` -> depthwise ``conv``
  (+ ``silu``), and ``present_state`` the last k - 1 steps of the padded input.
* ``RotaryEmbedding`` and ``LinearAttention`` lift generically to their registry ops.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from kiln.ir.graph import Value
from kiln.ir.types import FLOAT_DTYPES, Dim

from .lift import _check_only, _Ctx, _Refuse, _special, reshape_target

_ATTENTION_ATTRS = ("is_causal", "kv_num_heads", "q_num_heads", "qk_matmul_output_mode", "scale", "softcap",
                    "softmax_precision", "left_window_size", "right_window_size")
_ATTENTION_OPS = ("matmul", "mul", "div", "add", "softmax", "transpose", "reshape", "concat", "where", "expand",
                  "unsqueeze", "reduce_max", "equal", "tanh", "cast", "sub", "and", "less", "greater_equal",
                  "less_equal", "identity")


def _reshape(ctx: _Ctx, x: Value, target: Sequence[Dim], *, out: int | None = None) -> Value:
    """``x`` reshaped to ``target`` (ints or x's own symbols), or a refusal when that needs a run-time shape."""
    shape = reshape_target(x.type.shape, target)
    if shape is None:
        raise _Refuse(f"reshaping {x.type} to {list(target)} needs a static shape", dynamic=True)
    return ctx.op("reshape", [x], {"shape": shape}, out=out)


def _static_dim(d: Dim, what: str) -> int:
    if not isinstance(d, int):
        raise _Refuse(f"{what} is symbolic ({d}); kiln needs it static here", dynamic=True)
    return d


def _heads_4d(ctx: _Ctx, x: Value, heads: int, what: str) -> Value:
    """(B, S, H*D) -> (B, H, S, D)."""
    b, s, hidden = x.type.shape
    hidden = _static_dim(hidden, f"the hidden size of {what}")
    if heads <= 0 or hidden % heads:
        raise _Refuse(f"{what} hidden size {hidden} does not split into {heads} heads")
    x4 = _reshape(ctx, x, [b, s, heads, hidden // heads])
    return ctx.op("transpose", [x4], {"perm": [0, 2, 1, 3]})


def _repeat_heads(ctx: _Ctx, x: Value, reps: int) -> Value:
    """(B, Hkv, S, D) -> (B, Hkv*reps, S, D), each head repeated ``reps`` times in a row (h0, h0, h1, ...)."""
    if reps == 1:
        return x
    b, h, s, d = x.type.shape
    wide = ctx.op("expand", [ctx.op("unsqueeze", [x], {"axes": [2]})], {"shape": [1, 1, reps, 1, 1]})
    return _reshape(ctx, wide, [b, h * reps, s, d])


def _allowed(sq: int, skv: int, offset: np.ndarray | int, causal: bool, left: int, right: int) -> np.ndarray:
    """Bool (Sq, Skv) (or (B, Sq, Skv) for a per-batch offset): where query i may attend key j."""
    i = np.arange(sq).reshape(sq, 1)
    j = np.arange(skv).reshape(1, skv)
    off = np.reshape(offset, (-1, 1, 1)) if np.ndim(offset) else int(offset)
    diff = i + off - j
    ok = np.ones(np.shape(diff), dtype=bool)
    if causal:
        ok &= diff >= 0
    if left >= 0:
        ok &= diff <= left
    if right >= 0:
        ok &= -diff <= right
    return ok


def _neg_inf_where_not(ctx: _Ctx, allowed: Value, like: Value) -> Value:
    """0 where ``allowed``, -inf elsewhere, in ``like``'s dtype."""
    return ctx.op("where", [allowed, ctx.scalar(0.0, like), ctx.scalar(-np.inf, like)])


def _structural_bias(ctx: _Ctx, q: Value, sq: int, skv: int, past: int, nonpad: Value | None,
                     causal: bool, left: int, right: int) -> Value | None:
    """The 0/-inf bias of is_causal, the sliding window and nonpad_kv_seqlen (None when none applies)."""
    windowed = causal or left >= 0 or right >= 0
    if nonpad is None:
        if not windowed:
            return None
        ok = _allowed(sq, skv, past, causal, left, right)
        return ctx.const(np.where(ok, 0.0, -np.inf).astype(q.type.np_dtype))
    if nonpad.type.rank != 1:
        raise _Refuse(f"nonpad_kv_seqlen must be 1-D (batch,), got {nonpad.type}")
    lens = ctx.op("cast", [nonpad], {"to": "i64"}) if nonpad.type.dtype != "i64" else nonpad
    j = ctx.const(np.arange(skv, dtype=np.int64))
    ok = ctx.op("less", [ctx.op("unsqueeze", [j], {"axes": [0]}),
                         ctx.op("unsqueeze", [lens], {"axes": [1]})])  # (B, Skv): key j is no padding
    ok = ctx.op("unsqueeze", [ok], {"axes": [1]})  # (B, 1, Skv)
    if windowed:
        # diff[b, i, j] = i + (len[b] - Sq) - j
        off = ctx.op("unsqueeze", [ctx.op("sub", [lens, ctx.const(np.array(sq, np.int64))])], {"axes": [1, 2]})
        ij = ctx.const((np.arange(sq).reshape(sq, 1) - np.arange(skv).reshape(1, skv)).astype(np.int64))
        diff = ctx.op("add", [off, ij])
        for kind, bound in (("causal", 0 if causal else -1), ("left", left), ("right", right)):
            if bound < 0:
                continue
            if kind == "causal":
                cond = ctx.op("greater_equal", [diff, ctx.const(np.array(0, np.int64))])
            elif kind == "left":
                cond = ctx.op("less_equal", [diff, ctx.const(np.array(bound, np.int64))])
            else:
                cond = ctx.op("greater_equal", [diff, ctx.const(np.array(-bound, np.int64))])
            ok = ctx.op("and", [ok, cond])
    ok = ctx.op("unsqueeze", [ok], {"axes": [1]})  # (B, 1, Sq or 1, Skv)
    return _neg_inf_where_not(ctx, ok, q)


def _mask_bias(ctx: _Ctx, mask: Value, q: Value, skv: int) -> Value:
    """attn_mask as an additive bias in q's dtype, its last dim padded to Skv (-inf / False)."""
    if mask.type.rank < 1:
        raise _Refuse(f"attn_mask must have rank >= 1, got {mask.type}")
    last = _static_dim(mask.type.shape[-1], "attn_mask's last dim")
    if last > skv:
        raise _Refuse(f"attn_mask's last dim {last} exceeds the total KV length {skv}")
    if mask.type.dtype != "bool" and mask.type.dtype not in FLOAT_DTYPES:
        raise _Refuse(f"attn_mask has dtype {mask.type.dtype}; ONNX allows bool or float")
    if last < skv:
        shape = [_static_dim(d, "attn_mask's shape") for d in mask.type.shape[:-1]] + [skv - last]
        fill = np.zeros(shape, bool) if mask.type.dtype == "bool" else np.full(shape, -np.inf, mask.type.np_dtype)
        mask = ctx.op("concat", [mask, ctx.const(fill)], {"axis": -1})
    if mask.type.dtype == "bool":
        return _neg_inf_where_not(ctx, mask, q)
    if mask.type.dtype != q.type.dtype:
        return ctx.op("cast", [mask], {"to": q.type.dtype})
    return mask


def _fully_masked_rows(ctx: _Ctx, bias: Value) -> Value | None:
    """Bool (..., Sq, 1): rows whose bias is -inf everywhere; None when a constant bias has none."""
    if bias.is_const:
        with np.errstate(invalid="ignore"):
            if not np.isneginf(np.max(bias.const.astype(np.float64), axis=-1)).any():
                return None
    row_max = ctx.op("reduce_max", [bias], {"axes": [-1], "keepdims": 1})
    return ctx.op("equal", [row_max, ctx.scalar(-np.inf, bias)])


@_special("Attention", needs=_ATTENTION_OPS, since=25)
def _attention(ctx: _Ctx) -> list[Value | None]:
    _check_only(ctx, _ATTENTION_ATTRS)
    q, k, v = ctx.x(0), ctx.x(1), ctx.x(2)
    mask, past_k, past_v, nonpad = ctx.input(3), ctx.input(4), ctx.input(5), ctx.input(6)
    if q.type.dtype not in FLOAT_DTYPES or len({q.type.dtype, k.type.dtype, v.type.dtype}) != 1:
        raise _Refuse(f"Q, K, V must share one float dtype, got {q.type.dtype}, {k.type.dtype}, {v.type.dtype}")
    rank = q.type.rank
    if rank not in (3, 4) or k.type.rank != rank or v.type.rank != rank:
        raise _Refuse(f"Q, K, V must all be 3-D or all 4-D, got {q.type}, {k.type}, {v.type}")
    if (past_k is None) != (past_v is None):
        raise _Refuse("past_key and past_value must be given together")
    if nonpad is not None and past_k is not None:
        raise _Refuse("nonpad_kv_seqlen cannot be combined with past_key / past_value")
    hq_attr, hkv_attr = ctx.attrs.get("q_num_heads"), ctx.attrs.get("kv_num_heads")
    if rank == 3:
        if hq_attr is None or hkv_attr is None:
            raise _Refuse("3-D Q, K, V need the q_num_heads and kv_num_heads attributes")
        q4 = _heads_4d(ctx, q, int(hq_attr), "Q")
        k4 = _heads_4d(ctx, k, int(hkv_attr), "K")
        v4 = _heads_4d(ctx, v, int(hkv_attr), "V")
    else:
        if ctx.opset >= 25 and (hq_attr is not None or hkv_attr is not None):
            raise _Refuse("q_num_heads / kv_num_heads must not be given for 4-D inputs (opset 25)")
        q4, k4, v4 = q, k, v
    hq = _static_dim(q4.type.shape[1], "the number of query heads")
    hkv = _static_dim(k4.type.shape[1], "the number of KV heads")
    for name, given, have in (("q_num_heads", hq_attr, hq), ("kv_num_heads", hkv_attr, hkv)):
        if given is not None and int(given) != have:
            raise _Refuse(f"{name}={given} disagrees with the inputs' {have} heads")
    if v4.type.shape[1] != hkv or hq % hkv:
        raise _Refuse(f"{hq} query heads do not group over {hkv} key / {v4.type.shape[1]} value heads")
    past = 0
    if past_k is not None:
        past = _static_dim(past_k.type.shape[2], "past_key's sequence length")
        k4 = ctx.op("concat", [past_k, k4], {"axis": 2}, out=1)
        v4 = ctx.op("concat", [past_v, v4], {"axis": 2}, out=2)
    else:
        if ctx.output_used(1):
            k4 = ctx.op("identity", [k4], out=1)
        if ctx.output_used(2):
            v4 = ctx.op("identity", [v4], out=2)
    present_k, present_v = k4, v4
    k4, v4 = _repeat_heads(ctx, k4, hq // hkv), _repeat_heads(ctx, v4, hq // hkv)

    causal = bool(int(ctx.attr("is_causal", 0)))
    left, right = int(ctx.attr("left_window_size", -1)), int(ctx.attr("right_window_size", -1))
    if left < -1 or right < -1:
        raise _Refuse(f"window sizes must be -1 or >= 0, got left={left}, right={right}")
    mode = int(ctx.attr("qk_matmul_output_mode", 0))
    if mode not in (0, 1, 2, 3):
        raise _Refuse(f"qk_matmul_output_mode={mode} is not one of 0, 1, 2, 3")
    softcap = float(ctx.attr("softcap", 0.0))
    head = _static_dim(q4.type.shape[3], "the query head size")
    scale = ctx.attrs.get("scale")
    scale = 1.0 / math.sqrt(head) if scale is None else float(scale)
    # ONNX scales Q and K by sqrt(scale) rounded to their dtype: the product of the two is the factor
    root = float(np.asarray(math.sqrt(scale)).astype(q.type.np_dtype))

    k_t = ctx.op("transpose", [k4], {"perm": [0, 1, 3, 2]})
    raw = ctx.op("mul", [ctx.op("matmul", [q4, k_t]), ctx.scalar(root * root, q)])
    scores = raw
    if softcap > 0:
        cap = ctx.scalar(softcap, q)
        scores = ctx.op("mul", [ctx.op("tanh", [ctx.op("div", [scores, cap])]), cap])

    bias: Value | None = None
    needs_static = mask is not None or causal or left >= 0 or right >= 0 or nonpad is not None
    if needs_static:
        sq = _static_dim(q4.type.shape[2], "the query sequence length")
        skv = _static_dim(k4.type.shape[2], "the total KV sequence length")
        mask_bias = None if mask is None else _mask_bias(ctx, mask, q, skv)
        struct = _structural_bias(ctx, q, sq, skv, past, nonpad, causal, left, right)
        parts = [p for p in (mask_bias, struct) if p is not None]
        bias = parts[0] if len(parts) == 1 else ctx.op("add", parts) if parts else None
    logits = scores if bias is None else ctx.op("add", [scores, bias])
    probs = ctx.op("softmax", [logits], {"axis": -1})
    dead = None if bias is None else _fully_masked_rows(ctx, bias)
    zero = ctx.scalar(0.0, q)
    if dead is not None and mode == 3:
        probs = ctx.op("where", [dead, zero, probs])
    guard = dead is not None and mode != 3
    last = 0 if rank == 4 else None
    y = ctx.op("matmul", [probs, v4], out=None if guard else last)
    if guard:
        y = ctx.op("where", [dead, zero, y], out=last)
    if rank == 3:
        b, _, s, _ = y.type.shape
        y = _reshape(ctx, ctx.op("transpose", [y], {"perm": [0, 2, 1, 3]}), [b, s, -1], out=0)
    qk = None
    if ctx.output_used(3):
        qk = {0: raw, 1: scores, 2: logits, 3: probs}[mode]
        qk = ctx.op("identity", [qk], out=3)
    return [y, present_k if ctx.output_used(1) else None, present_v if ctx.output_used(2) else None, qk]


@_special("SwiGLU", needs=("silu", "sigmoid", "mul"), since=28)
def _swiglu(ctx: _Ctx) -> list[Value | None]:
    _check_only(ctx, ("alpha",))
    a, b = ctx.x(0), ctx.x(1)
    if a.type != b.type:
        raise _Refuse(f"SwiGLU needs A and B of one type (no broadcasting), got {a.type} and {b.type}")
    if a.type.dtype not in FLOAT_DTYPES:
        raise _Refuse(f"SwiGLU needs float inputs, got {a.type.dtype}")
    alpha = float(ctx.attr("alpha", 1.0))
    if alpha == 1.0:
        gate = ctx.op("silu", [a])
    else:
        gate = ctx.op("mul", [a, ctx.op("sigmoid", [ctx.op("mul", [a, ctx.scalar(alpha, a)])])])
    return [ctx.op("mul", [gate, b], out=0)]


@_special("CausalConvWithState", needs=("concat", "conv", "silu", "slice"), since=27)
def _causal_conv_with_state(ctx: _Ctx) -> list[Value | None]:
    _check_only(ctx, ("activation",))
    x, w, bias, past = ctx.x(0), ctx.x(1), ctx.input(2), ctx.input(3)
    act = str(ctx.attr("activation", "none"))
    if act not in ("none", "silu", "swish"):
        raise _Refuse(f"activation {act!r} is not one of none, silu, swish")
    if x.type.rank != 3 or w.type.rank != 3:
        raise _Refuse(f"input (B, C, L) and weight (C, 1, k) must be 3-D, got {x.type} and {w.type}")
    c = x.type.shape[1]
    k = _static_dim(w.type.shape[2], "the kernel size")
    if w.type.shape[0] != c or w.type.shape[1] != 1:
        raise _Refuse(f"weight {w.type} must be (C, 1, k) for input {x.type} (depthwise)")
    if k < 1:
        raise _Refuse(f"kernel size {k} must be >= 1")
    channels = _static_dim(c, "the channel count")
    if past is None:
        if k > 1:
            batch = _static_dim(x.type.shape[0], "the batch size")
            past = ctx.const(np.zeros((batch, channels, k - 1), x.type.np_dtype))
    elif past.type.rank != 3 or past.type.shape[1:] != (c, k - 1):
        raise _Refuse(f"past_state {past.type} must be (B, C, k - 1) = (B, {c}, {k - 1})")
    padded = x if past is None or k == 1 else ctx.op("concat", [past, x], {"axis": 2})
    y = ctx.op("conv", [padded, w, bias], {"group": channels}, out=0 if act == "none" else None)
    if act != "none":
        y = ctx.op("silu", [y], out=0)
    length = _static_dim(padded.type.shape[2], "the padded length")
    state = ctx.op("slice", [padded], {"starts": [length - (k - 1)], "ends": [length], "axes": [2]}, out=1)
    return [y, state]
