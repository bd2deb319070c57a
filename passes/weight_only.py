"""Weight-only quantization: ``weight-only{bits,method=rtn|gptq|awq,group_size,...}`` (passes-math.md §3-4).

Every ``matmul(x, W)`` with a constant 2-D float weight ``W[K, N]`` (kiln
weights are [in, out]) becomes the weight-only form of the quantization
contract::

    %W.q  = const u4[K, N]                                  (codes)
    %W.dq = dequantize(%W.q, %W.scale, %W.zp) {axis=0, block_size=g}
    %y    = matmul(%x, %W.dq)

Groups of ``g`` rows run along K, the input axis (ONNX blocked quantization,
axis 0, scale ``[ceil(K/g), N]``; when g does not divide K the last block is
partial, as ONNX and kiln's ``dequantize`` type rule ``ceil(D/B)`` allow).
``group_size=0`` is per output channel: scale ``[N]``, ``axis=1``,
``block_size=0``.  Codes are stored as u4/u8 with a zero point (asymmetric,
the default) or i4/i8 without one (symmetric, range ±(2^(b-1) − 1)); the scale
has the weight's dtype (f32; f16/bf16 for such weights).

Methods (pure numpy cores on one weight, usable without a graph):

* :func:`rtn` — round to nearest, half to even like ONNX.  Asymmetric: the range
  includes 0, scale = (max − min)/(2^b − 1), zero = round(−min/scale),
  q = clamp(round(w/scale) + zero, 0, 2^b − 1).  A group of zeros gets scale 1.
* :func:`gptq` — GPTQ (IST-DASLab/gptq): H = 2/n Σ x xᵀ over the layer's inputs,
  dead columns zeroed, 1 % dampening, the upper Cholesky factor of H⁻¹, column
  by column error feedback with lazy batch updates.  The scale and zero of a
  group are computed at its first column from the *current* weights (all
  earlier updates applied, including those of the same lazy batch; the
  reference reads the batch-start copy there, which differs only when a group
  starts inside a batch).  ``act_order`` processes columns by descending
  diag(H) with *static* groups (scales from the weights before any update, the
  reference's ``static_groups``), so stored groups stay contiguous in the
  original row order as ONNX blocked storage needs; it is off by default.
  With a diagonal H no error is fed forward and GPTQ's codes are RTN's.
* AWQ (mit-han-lab/llm-awq, ``auto_scale``) — per input channel
  s_j = mean|x_j|^r / √(max s · min s), r on {0, 0.05, …, 0.95} chosen by the
  output MSE of all linears sharing the input with W replaced by
  diag(s)⁻¹ · Q(diag(s) · W) (:func:`awq_scales`; r = 0 is RTN, so on the
  calibration data AWQ is never worse).  The scales are folded
  (:func:`awq_fold`): s into the rows of every linear reading the input, 1/s
  into the producer — a layer_norm/rms_norm's γ (and β), or a previous linear's
  output columns (and its bias add) — or, when the input has another reader or
  no such producer, into a ``mul`` by 1/s inserted before the linears.  The
  folded weights are then quantized by RTN.  Not done: folding through a
  reshape (an attention out-projection reading reshape(A·V) gets a mul, where
  llm-awq folds into v_proj), and AWQ's clipping search (``auto_clip``).

:func:`quantize_weights` clones the graph, gathers each layer's inputs from the
calibration set (:func:`kiln.passes.calibrate.activations`, flattened to
[tokens, K]; only their Gram matrix Σ x xᵀ, count and Σ|x| are kept), quantizes
and records per weight a :class:`WeightLayer` (relative weight error, and the
relative output error ‖X(Ŵ − W)‖ / ‖XW‖ on the calibration inputs).

Refused (logged, the matmul left in float): a weight that is not a constant
(a graph input, a computed value, an already dequantized weight), not 2-D, not
f16/bf16/f32 (dequantize scales cannot be f64), with NaN/Inf, a graph output,
shared with a non-matmul or used as a matmul's left operand, excluded by name,
or with K smaller than the group size.  For AWQ a weight read by several
matmuls gets no scales (it is quantized by RTN, and the log says so).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from kiln.ir.graph import Graph, Node, Value
from kiln.ir.types import from_numpy_dtype, to_numpy_dtype

from .calibrate import CalibrationSet, activations, calibration_for
from .manager import Pass, PassLog, register_pass

__all__ = ["BITS", "METHODS", "QWeight", "WeightLayer", "WeightOnly", "awq_fold", "awq_scales", "dequant",
           "gptq", "quantize_weights", "rtn"]

METHODS = ("rtn", "gptq", "awq")
BITS = (4, 8)
SCALE_DTYPES = ("f16", "bf16", "f32")
_STORAGE = {(4, False): "u4", (4, True): "i4", (8, False): "u8", (8, True): "i8"}
_NORMS = ("layer_norm", "rms_norm")


# ====================================================================== numeric cores


@dataclass(frozen=True)
class QWeight:
    """A quantized [K, N] weight in the contract's storage: codes, scale, zero point, axis, block size."""

    q: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray | None
    axis: int
    block_size: int

    @property
    def bits(self) -> int:
        return int(from_numpy_dtype(self.q.dtype)[1:])

    @property
    def symmetric(self) -> bool:
        return self.zero_point is None


def _qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """The code range: [0, 2^b − 1] asymmetric, ±(2^(b−1) − 1) symmetric."""
    if symmetric:
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


def _check_bits(bits: int) -> None:
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")


def _as_weight(w: np.ndarray) -> np.ndarray:
    """The weight as a finite float64 [K, N] matrix; ValueError otherwise."""
    a = np.asarray(w)
    if a.ndim != 2 or not (a.dtype.kind == "f" or a.dtype.name == "bfloat16"):
        raise ValueError(f"weight must be a 2-D float [K, N] array, got {a.dtype}{list(a.shape)}")
    a = a.astype(np.float64)
    if not np.isfinite(a).all():
        raise ValueError("weight has NaN or Inf entries")
    return a


def _group(group_size: int) -> int:
    """The block size along K (0 = per output channel)."""
    if group_size < 0:
        raise ValueError(f"group_size must be >= 0 (0 = per output channel), got {group_size}")
    return group_size


def _rows(p: np.ndarray, k: int, g: int) -> np.ndarray:
    """Block (or per-channel) parameters expanded to one row per input channel: [K, N] (or [1, N])."""
    return np.repeat(p, g, axis=0)[:k] if g else p[None, :]


def _params(lo: np.ndarray, hi: np.ndarray, bits: int, symmetric: bool,
            dtype: np.dtype) -> tuple[np.ndarray, np.ndarray | None]:
    """Scale (stored dtype) and integer zero point (float64, None when symmetric) of ranges [lo, hi]."""
    qlo, qhi = _qrange(bits, symmetric)
    if symmetric:
        scale = np.maximum(np.abs(lo), np.abs(hi)) / qhi
    else:
        lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
        scale = (hi - lo) / (qhi - qlo)
    with np.errstate(over="ignore"):
        stored = scale.astype(dtype)
    s64 = stored.astype(np.float64)
    stored = np.where((s64 > 0) & np.isfinite(s64), stored, np.ones((), dtype)).astype(dtype)
    if symmetric:
        return stored, None
    return stored, np.clip(np.rint(-lo / stored.astype(np.float64)), qlo, qhi)


def _codes(w: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, bits: int, symmetric: bool) -> np.ndarray:
    """clamp(round_half_even(w / scale) + zero) as float64 integers (broadcasting scale/zero against w)."""
    qlo, qhi = _qrange(bits, symmetric)
    q = np.rint(w / scale.astype(np.float64))
    return np.clip(q if zero is None else q + zero, qlo, qhi)


def _values(q: np.ndarray, scale: np.ndarray, zero: np.ndarray | None) -> np.ndarray:
    """(q − zero) · scale in float64: the dequantized value before its cast to the scale's dtype."""
    return (q if zero is None else q - zero) * scale.astype(np.float64)


def _qweight(q: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, bits: int, symmetric: bool,
             g: int) -> QWeight:
    """Pack float64 codes and zero points into the storage dtype."""
    st = to_numpy_dtype(_STORAGE[bits, symmetric])
    zp = None if zero is None else zero.astype(np.int32).astype(st)
    return QWeight(q.astype(np.int32).astype(st), scale, zp, 0 if g else 1, g)


def rtn(w: np.ndarray, *, bits: int = 4, group_size: int = 128, symmetric: bool = False,
        dtype: str = "f32") -> QWeight:
    """Round-to-nearest quantization of W[K, N] in groups of ``group_size`` rows (0: per output channel)."""
    _check_bits(bits)
    w64 = _as_weight(w)
    k = w64.shape[0]
    g = _group(group_size)
    if g:
        starts = np.arange(0, k, g)
        lo, hi = np.minimum.reduceat(w64, starts, axis=0), np.maximum.reduceat(w64, starts, axis=0)
    else:
        lo, hi = w64.min(axis=0), w64.max(axis=0)
    scale, zero = _params(lo, hi, bits, symmetric, to_numpy_dtype(dtype))
    q = _codes(w64, _rows(scale, k, g), None if zero is None else _rows(zero, k, g), bits, symmetric)
    return _qweight(q, scale, zero, bits, symmetric, g)


def dequant(qw: QWeight) -> np.ndarray:
    """The weight a QWeight stands for: (q − zero) · scale, in the scale's dtype (ONNX DequantizeLinear)."""
    q = qw.q.astype(np.float64)
    k, g = q.shape[0], qw.block_size
    zero = None if qw.zero_point is None else _rows(qw.zero_point.astype(np.float64), k, g)
    return _values(q, _rows(qw.scale, k, g), zero).astype(qw.scale.dtype)


def _upper_cholesky_inverse(h: np.ndarray) -> np.ndarray:
    """U upper triangular with Uᵀ U = H⁻¹ (GPTQ's Hinv)."""
    try:
        hinv = np.linalg.inv(h)
        return np.linalg.cholesky((hinv + hinv.T) / 2, upper=True)
    except np.linalg.LinAlgError:
        raise ValueError("GPTQ: the dampened Hessian is not positive definite; raise damp") from None


def gptq(w: np.ndarray, h: np.ndarray, *, bits: int = 4, group_size: int = 128, damp: float = 0.01,
         block: int = 128, act_order: bool = False, symmetric: bool = False, dtype: str = "f32") -> QWeight:
    """GPTQ quantization of W[K, N] given the Hessian H[K, K] = 2/n Σ x xᵀ of its inputs (module docstring)."""
    _check_bits(bits)
    wt = _as_weight(w).T.copy()  # [N, K]: the reference's [out, in] layout; columns are input channels
    n_out, k = wt.shape
    h = np.array(h, np.float64)
    if h.shape != (k, k) or not np.isfinite(h).all():
        raise ValueError(f"GPTQ: Hessian must be a finite [{k}, {k}] matrix for a weight with K={k}, "
                         f"got {list(h.shape)}")
    if block < 1 or damp < 0:
        raise ValueError(f"GPTQ: block must be >= 1 and damp >= 0, got block={block}, damp={damp}")
    g = _group(group_size)
    sdt = to_numpy_dtype(dtype)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    wt[:, dead] = 0.0
    n_groups = -(-k // g) if g else 1
    scales = np.zeros((n_groups, n_out), sdt)
    zeros = None if symmetric else np.zeros((n_groups, n_out))
    static = not g or act_order
    if static:
        for j in range(n_groups):
            cols = wt[:, j * g:(j + 1) * g] if g else wt
            scales[j], z = _params(cols.min(axis=1), cols.max(axis=1), bits, symmetric, sdt)
            if zeros is not None:
                zeros[j] = z
    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(k)
    wt, h = wt[:, perm], h[np.ix_(perm, perm)]
    h[np.diag_indices(k)] += damp * np.mean(np.diag(h))
    u = _upper_cholesky_inverse(h)
    codes = np.zeros((n_out, k))
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1, err1, u1 = wt[:, i1:i2].copy(), np.zeros((n_out, i2 - i1)), u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if not static and col % g == 0:
                end = min(col + g, k)
                pending = wt[:, i2:end] - err1[:, :i] @ u[i1:col, i2:end]
                cur = np.concatenate([w1[:, i:min(i + g, i2 - i1)], pending], axis=1)
                scales[col // g], z = _params(cur.min(axis=1), cur.max(axis=1), bits, symmetric, sdt)
                if zeros is not None:
                    zeros[col // g] = z
            j = perm[col] // g if g else 0
            zj = None if zeros is None else zeros[j]
            q = _codes(w1[:, i], scales[j], zj, bits, symmetric)
            codes[:, col] = q
            err = (w1[:, i] - _values(q, scales[j], zj)) / u1[i, i]
            w1[:, i:] -= np.outer(err, u1[i, i:])
            err1[:, i] = err
        wt[:, i2:] -= err1 @ u[i1:i2, i2:]
    out = np.empty_like(codes)
    out[:, perm] = codes
    scale = scales if g else scales[0]
    zero = None if zeros is None else (zeros if g else zeros[0])
    return _qweight(out.T, scale, zero, bits, symmetric, g)


def _sq_error(d: np.ndarray, gram: np.ndarray) -> float:
    """‖X D‖² from the Gram matrix XᵀX."""
    return max(float(np.sum(d * (gram @ d))), 0.0)


def _awq_search(ws: Sequence[np.ndarray], mean_abs: np.ndarray, gram: np.ndarray, *, bits: int,
                group_size: int, grid: int, symmetric: bool) -> tuple[np.ndarray, float]:
    """AWQ's grid search: the scales s and ratio r minimizing Σ ‖X(W − diag(s)⁻¹ Q(diag(s) W))‖²."""
    best: tuple[float, np.ndarray, float] | None = None
    w64 = [_as_weight(w) for w in ws]
    for r in np.arange(grid) / grid:
        s = np.maximum(mean_abs ** r, 1e-4)
        s = s / np.sqrt(s.max() * s.min())
        loss = 0.0
        for w in w64:
            qw = rtn(s[:, None] * w, bits=bits, group_size=group_size, symmetric=symmetric)
            loss += _sq_error(w - dequant(qw).astype(np.float64) / s[:, None], gram)
        if best is None or loss < best[0]:
            best = (loss, s, float(r))
    assert best is not None
    return best[1], best[2]


def awq_scales(w_list: Sequence[np.ndarray], x: np.ndarray, *, bits: int = 4, group_size: int = 128,
               grid: int = 20, symmetric: bool = False) -> np.ndarray:
    """AWQ's per-input-channel scales s[K] for the linears ``w_list`` (each [K, N_i]) that all read ``x``."""
    _check_bits(bits)
    if grid < 1:
        raise ValueError(f"AWQ: grid must be >= 1, got {grid}")
    k = {np.shape(w)[0] for w in w_list}
    if len(k) != 1 or not w_list:
        raise ValueError(f"AWQ: the linears sharing an input need one K, got weights "
                         f"{[list(np.shape(w)) for w in w_list]}")
    x64 = np.asarray(x, np.float64).reshape(-1, k.pop())
    s, _ = _awq_search(w_list, np.abs(x64).mean(axis=0), x64.T @ x64, bits=bits, group_size=group_size,
                       grid=grid, symmetric=symmetric)
    return s


# ====================================================================== graph helpers


def _is_output(graph: Graph, v: Value) -> bool:
    return any(o is v for o in graph.outputs)


def _swap_const(graph: Graph, node: Node, index: int, array: np.ndarray, tag: str) -> Value:
    """Point input ``index`` of ``node`` at a new constant; the old one goes (and lends its name) if unused."""
    old = node.inputs[index]
    array = np.asarray(array).astype(old.type.np_dtype)
    graph.set_input(node, index, None)
    if not old.uses and not _is_output(graph, old) and old.name in graph.constants:
        graph.remove_constant(old)
        new = graph.add_constant(array, old.name)
    else:
        new = graph.add_constant(array, graph.fresh_name(f"{old.name}.{tag}"))
    graph.set_input(node, index, new)
    return new


def _describe(v: Value) -> str:
    if v.producer is None:
        return "a graph input"
    return f"computed by {v.producer.op}"


def _matches(names: Sequence[str], patterns: Collection[str]) -> str | None:
    """The first pattern (fnmatch) that one of ``names`` matches."""
    for p in patterns:
        if any(n and (n == p or fnmatch.fnmatchcase(n, p)) for n in names):
            return p
    return None


@dataclass
class _Candidate:
    """A constant weight and the matmuls that read it as their right operand."""

    weight: Value
    matmuls: list[Node] = field(default_factory=list)


def _weight_reason(graph: Graph, node: Node, group_size: int, exclude: Collection[str]) -> str | None:
    """Why the matmul ``node``'s right operand is not quantized (None: it is)."""
    w = node.inputs[1]
    out = node.outputs[0].name
    if w is None:
        return "matmul has no right operand"
    if not w.is_const:
        if w.producer is not None and w.producer.op == "dequantize":
            return f"weight %{w.name} is already quantized (computed by dequantize)"
        return f"weight %{w.name} is not a constant ({_describe(w)})"
    pat = _matches([out, node.name, w.name], exclude)
    if pat is not None:
        return f"excluded by pattern {pat!r}"
    if w.type.rank != 2:
        return f"weight %{w.name} is {w.type}; only a 2-D [in, out] weight is quantized"
    if w.type.dtype not in SCALE_DTYPES:
        return f"weight %{w.name} is {w.type.dtype}; weight-only quantization takes {', '.join(SCALE_DTYPES)}"
    if w.const.size == 0:
        return f"weight %{w.name} is {w.type}: it has no elements"
    if not np.isfinite(np.asarray(w.const, np.float64)).all():
        return f"weight %{w.name} has NaN or Inf entries"
    if _is_output(graph, w):
        return f"weight %{w.name} is a graph output"
    k = w.type.shape[0]
    if group_size > k:
        return (f"group_size {group_size} is larger than K={k} (the input dim of %{w.name}); "
                f"use group_size <= {k}, or 0 for per output channel")
    for user, i in w.uses:
        if user.op != "matmul" or i != 1:
            role = "left operand of matmul" if user.op == "matmul" else user.op
            return (f"weight %{w.name} is shared: it also feeds {role} %{user.outputs[0].name}, "
                    f"which would read the dequantized weight")
    return None


def _candidates(graph: Graph, group_size: int, exclude: Collection[str],
                log: PassLog | None) -> list[_Candidate]:
    """The quantizable weights in graph order; every refused matmul is logged at its output."""
    found: dict[int, _Candidate] = {}
    for node in graph.nodes:
        if node.op != "matmul":
            continue
        reason = _weight_reason(graph, node, group_size, exclude)
        if reason is not None:
            if log is not None:
                log.refuse(node.outputs[0].name, reason)
            continue
        w = node.inputs[1]
        found.setdefault(id(w), _Candidate(w)).matmuls.append(node)
    return list(found.values())


# ====================================================================== calibration statistics


@dataclass
class _Stats:
    """What is kept of a layer input X[tokens, K]: the count, Σ|x| per channel and XᵀX."""

    n: int
    abs_sum: np.ndarray
    gram: np.ndarray

    def scaled(self, c: np.ndarray) -> _Stats:
        """The statistics of X · diag(c)."""
        return _Stats(self.n, self.abs_sum * np.abs(c), self.gram * np.outer(c, c))

    def __add__(self, other: _Stats) -> _Stats:
        return _Stats(self.n + other.n, self.abs_sum + other.abs_sum, self.gram + other.gram)


def _collect(graph: Graph, calib: CalibrationSet, xs: Mapping[str, int]) -> dict[str, _Stats]:
    """Statistics of the values ``xs`` (name -> K) over the calibration set."""
    stats = {x: _Stats(0, np.zeros(k), np.zeros((k, k))) for x, k in xs.items()}
    for env in activations(graph, calib, list(xs)):
        for x, k in xs.items():
            a = np.asarray(env[x], np.float64).reshape(-1, k)
            if not np.isfinite(a).all():
                raise ValueError(f"calibration: the matmul input %{x} has NaN or Inf values")
            st = stats[x]
            stats[x] = _Stats(st.n + a.shape[0], st.abs_sum + np.abs(a).sum(axis=0), st.gram + a.T @ a)
    return stats


# ====================================================================== AWQ folding


def _bias_operand(node: Node, k: int) -> int | None:
    """For ``add(matmul, b)``: the index of a constant per-channel bias b ([K], [1, .., K] or a scalar)."""
    for i in (0, 1):
        b, o = node.inputs[i], node.inputs[1 - i]
        if (b is not None and b.is_const and o is not None and o.producer is not None
                and o.producer.op == "matmul" and b.type.rank <= o.type.rank
                and all(d == 1 for d in b.type.shape[:-1]) and (b.type.rank == 0 or b.type.shape[-1] in (1, k))):
            return i
    return None


def _linear_weight(graph: Graph, v: Value, k: int) -> Node | None:
    """The matmul producing ``v`` with a constant 2-D weight [*, K], when ``v`` is read only through it."""
    p = v.producer
    if p is None or p.op != "matmul":
        return None
    w = p.inputs[1]
    if w is None or not w.is_const or w.type.rank != 2 or w.type.shape[1] != k:
        return None
    return p


def _fold_into_producer(graph: Graph, x: Value, inv: np.ndarray) -> str | None:
    """Multiply the producer of ``x`` by 1/s (``inv``) along x's last axis; where it went, or None."""
    p, k = x.producer, inv.shape[0]
    if p is None:
        return None
    if p.op in _NORMS and p.attrs.get("axis", -1) in (-1, x.type.rank - 1):
        params = [i for i in (1, 2) if i < len(p.inputs) and p.inputs[i] is not None]
        if not all(p.inputs[i].is_const and p.inputs[i].type.rank <= 1 for i in params):
            return None
        for i in params:
            _swap_const(graph, p, i, np.broadcast_to(np.asarray(p.inputs[i].const, np.float64), (k,)) * inv, "awq")
        return f"{p.op} %{x.name}'s " + " and ".join(("scale", "bias")[i - 1] for i in params)
    if p.op == "add":
        bi = _bias_operand(p, k)
        if bi is None:
            return None
        mm_out = p.inputs[1 - bi]
        mm = _linear_weight(graph, mm_out, k)
        if mm is None or _is_output(graph, mm_out) or mm_out.users != [p] or len(mm_out.uses) != 1:
            return None
        b = np.asarray(p.inputs[bi].const, np.float64)
        _swap_const(graph, p, bi, np.broadcast_to(b, b.shape[:-1] + (k,) if b.ndim else (k,)) * inv, "awq")
        _swap_const(graph, mm, 1, np.asarray(mm.inputs[1].const, np.float64) * inv[None, :], "awq")
        return f"the output columns of %{mm.inputs[1].name} and bias %{p.inputs[bi].name}"
    mm = _linear_weight(graph, x, k)
    if mm is not None:
        _swap_const(graph, mm, 1, np.asarray(mm.inputs[1].const, np.float64) * inv[None, :], "awq")
        return f"the output columns of %{mm.inputs[1].name}"
    return None


def _fold_one(graph: Graph, x: Value, s: np.ndarray, matmuls: Sequence[Node]) -> str:
    """Scale the rows of the matmuls' weights by s and fold 1/s into x's producer or an inserted mul."""
    s = np.asarray(s, np.float64)
    inv = 1.0 / s
    for m in matmuls:
        _swap_const(graph, m, 1, s[:, None] * np.asarray(m.inputs[1].const, np.float64), "awq")
    mine = {id(m) for m in matmuls}
    exclusive = not _is_output(graph, x) and all(id(n) in mine and i == 0 for n, i in x.uses)
    where = _fold_into_producer(graph, x, inv) if exclusive else None
    if where is not None:
        return f"1/s folded into {where}"
    order = {id(n): i for i, n in enumerate(graph.nodes)}
    first = min(matmuls, key=lambda m: order[id(m)])
    c = graph.add_constant(inv.astype(x.type.np_dtype), graph.fresh_name(f"{x.name}.awq_inv"))
    y = graph.add_node("mul", [x, c], before=first, out_names=[graph.fresh_name(f"{x.name}.awq")]).output
    for m in matmuls:
        graph.set_input(m, 0, y)
    reason = "it is a graph output" if _is_output(graph, x) else (
        "it has other readers" if not exclusive else f"it is {_describe(x)}, which cannot absorb it")
    return f"1/s applied by an inserted mul %{y.name} ({reason})"


def _awq_eligible(graph: Graph, x: Value) -> list[Node]:
    """The matmuls reading ``x`` as left operand with a constant 2-D weight of their own."""
    k = x.type.shape[-1] if x.type.rank else None
    return [n for n, i in x.uses if n.op == "matmul" and i == 0 and n.inputs[1] is not None
            and n.inputs[1].is_const and n.inputs[1].type.rank == 2 and n.inputs[1].type.shape[0] == k]


def awq_fold(graph: Graph, scales: Mapping[str, np.ndarray]) -> Graph:
    """A copy of ``graph`` with AWQ scales s (value name -> s[K]) folded: exact in exact arithmetic."""
    g = graph.clone()
    for name, s in scales.items():
        x = g.value(name)
        ms = _awq_eligible(g, x)
        if not ms:
            raise ValueError(f"AWQ: no matmul with a constant 2-D weight reads %{name} as its left operand")
        s = np.asarray(s, np.float64)
        if s.shape != (ms[0].inputs[1].type.shape[0],) or not (np.isfinite(s).all() and (s > 0).all()):
            raise ValueError(f"AWQ: scales for %{name} must be finite and positive with shape "
                             f"[{ms[0].inputs[1].type.shape[0]}], got {list(s.shape)}")
        _fold_one(g, x, s, ms)
    return g


# ====================================================================== the graph rewrite


@dataclass(frozen=True)
class WeightLayer:
    """One quantized weight: names, settings and its errors (output error None without calibration)."""

    name: str
    weight: str
    outputs: tuple[str, ...]
    bits: int
    group_size: int
    method: str
    symmetric: bool
    weight_error: float
    output_error: float | None
    awq: str = ""

    def __str__(self) -> str:
        out = "-" if self.output_error is None else f"{self.output_error:.3g}"
        return (f"w{self.bits} {'g' + str(self.group_size) if self.group_size else 'per-channel'} {self.method} "
                f"{'sym' if self.symmetric else 'asym'}: weight error {self.weight_error:.3g}, output error {out}"
                + (f"; AWQ {self.awq}" if self.awq else ""))


def _replace_weight(graph: Graph, cand: _Candidate, qw: QWeight) -> Value:
    """Point the candidate's matmuls at ``dequantize(W.q, W.scale, W.zp?)``; the float weight goes if unused."""
    w = cand.weight
    operands = [graph.add_constant(qw.q, graph.fresh_name(f"{w.name}.q")),
                graph.add_constant(qw.scale, graph.fresh_name(f"{w.name}.scale"))]
    if qw.zero_point is not None:
        operands.append(graph.add_constant(qw.zero_point, graph.fresh_name(f"{w.name}.zp")))
    order = {id(n): i for i, n in enumerate(graph.nodes)}
    first = min(cand.matmuls, key=lambda m: order[id(m)])
    dq = graph.add_node("dequantize", operands, {"axis": qw.axis, "block_size": qw.block_size}, before=first,
                        out_names=[graph.fresh_name(f"{w.name}.dq")]).output
    for m in cand.matmuls:
        graph.set_input(m, 1, dq)
    if not w.uses and not _is_output(graph, w):
        graph.remove_constant(w)
    return dq


def _relative(num: float, den: float) -> float:
    return float(np.sqrt(num / den)) if den > 0 else (0.0 if num == 0 else float("inf"))


def _check_options(bits: int, method: str, group_size: int) -> None:
    _check_bits(bits)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if group_size < 0:
        raise ValueError(f"group_size must be >= 0 (0 = per output channel), got {group_size}")


def _awq_stage(g: Graph, cands: list[_Candidate], stats: dict[str, _Stats], *,
               bits: int, group_size: int, symmetric: bool, log: PassLog | None) -> dict[str, str]:
    """Search and fold AWQ scales for each input shared by single-use weights; the fold note per weight."""
    groups: dict[int, list[_Candidate]] = {}
    for c in cands:
        if len(c.matmuls) == 1:
            groups.setdefault(id(c.matmuls[0].inputs[0]), []).append(c)
        elif log is not None:
            log.refuse(c.matmuls[0].outputs[0].name, f"AWQ: weight %{c.weight.name} is read by "
                       f"{len(c.matmuls)} matmuls and AWQ scales one linear's rows; quantized by RTN without scales")
    notes: dict[str, str] = {}
    for group in groups.values():
        x = group[0].matmuls[0].inputs[0]
        st = stats[x.name]
        s, r = _awq_search([c.matmuls[0].inputs[1].const for c in group], st.abs_sum / max(st.n, 1), st.gram,
                           bits=bits, group_size=group_size, grid=20, symmetric=symmetric)
        matmuls = [c.matmuls[0] for c in group]
        where = _fold_one(g, x, s, matmuls)
        stats[matmuls[0].inputs[0].name] = st.scaled(1.0 / s)
        for m in matmuls:
            notes[m.inputs[1].name] = f"r={r:.2f}, {where}"
    return notes


def _quantize_one(c: _Candidate, st: _Stats | None, *, bits: int, method: str, group_size: int, symmetric: bool,
                  act_order: bool, awq: str) -> tuple[QWeight, WeightLayer]:
    """Quantize one candidate weight (GPTQ on its inputs' Hessian, else RTN) and record its errors."""
    w64 = np.asarray(c.weight.const, np.float64)
    dtype = c.weight.type.dtype
    if method == "gptq":
        qw = gptq(w64, 2.0 / max(st.n, 1) * st.gram, bits=bits, group_size=group_size, act_order=act_order,
                  symmetric=symmetric, dtype=dtype)
    else:
        qw = rtn(w64, bits=bits, group_size=group_size, symmetric=symmetric, dtype=dtype)
    d = dequant(qw).astype(np.float64) - w64
    out_err = None if st is None else _relative(_sq_error(d, st.gram), _sq_error(w64, st.gram))
    first = c.matmuls[0]
    layer = WeightLayer(first.name or first.outputs[0].name, c.weight.name,
                        tuple(m.outputs[0].name for m in c.matmuls), bits, group_size,
                        "rtn" if method == "awq" and not awq else method, symmetric,
                        _relative(float(np.sum(d * d)), float(np.sum(w64 * w64))), out_err, awq)
    return qw, layer


def quantize_weights(graph: Graph, calib: CalibrationSet | None, *, bits: int = 4, method: str = "rtn",
                     group_size: int = 128, exclude: Collection[str] = (), symmetric: bool = False,
                     act_order: bool = False, log: PassLog | None = None) -> tuple[Graph, list[WeightLayer]]:
    """A weight-only quantized copy of ``graph`` and one record per quantized weight (module docstring).

    ``calib`` may be None for ``rtn`` (no output errors then); GPTQ and AWQ need it.
    """
    _check_options(bits, method, group_size)
    if calib is None and method != "rtn":
        raise ValueError(f"weight-only method {method!r} needs calibration data (calib is None)")
    g = graph.clone()
    exclude = tuple(exclude)
    cands = _candidates(g, group_size, exclude, None if method == "awq" else log)

    def inputs_of(cs: list[_Candidate]) -> dict[str, int]:
        return {m.inputs[0].name: c.weight.type.shape[0] for c in cs for m in c.matmuls}

    stats = _collect(g, calib, inputs_of(cands)) if calib is not None and cands else {}
    notes: dict[str, str] = {}
    if method == "awq":
        notes = _awq_stage(g, cands, stats, bits=bits, group_size=group_size, symmetric=symmetric, log=log)
        cands = _candidates(g, group_size, exclude, log)
    layers = []
    for c in cands:
        st = None
        if stats:
            parts = [stats[m.inputs[0].name] for m in c.matmuls]
            st = parts[0] if len(parts) == 1 else sum(parts[1:], parts[0])
        qw, layer = _quantize_one(c, st, bits=bits, method=method, group_size=group_size, symmetric=symmetric,
                                  act_order=act_order, awq=notes.get(c.weight.name, ""))
        _replace_weight(g, c, qw)
        layers.append(layer)
        if log is not None:
            log.rewrote(c.matmuls[0].outputs[0].name, f"%{c.weight.name} -> {_STORAGE[bits, symmetric]} {layer}")
    return g, layers


# ====================================================================== the pass


@register_pass
@dataclass(frozen=True)
class WeightOnly(Pass):
    """``weight-only``: constant matmul weights to blocked int4/int8 codes + dequantize (module docstring).

    ``exclude`` is a ``|``-separated list of fnmatch patterns matched against a
    matmul's output name, node name and weight name.  ``rtn`` reads calibration
    data only when ``calib`` names a path (for the output errors); GPTQ and AWQ
    use synthetic random inputs when it is empty.
    """

    name: ClassVar[str] = "weight-only"
    exact: ClassVar[bool] = False  # quantizes: changes the outputs by design
    bits: int = 4
    method: str = "rtn"
    group_size: int = 128
    symmetric: bool = False
    act_order: bool = False
    exclude: str = ""
    calib: str = ""
    samples: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        _check_options(self.bits, self.method, self.group_size)

    def apply(self, graph: Graph, log: PassLog) -> Graph:
        calib = None
        if self.method != "rtn" or self.calib:
            calib = calibration_for(graph, self.calib, self.samples, self.seed)
        patterns = tuple(p.strip() for p in self.exclude.split("|") if p.strip())
        out, _ = quantize_weights(graph, calib, bits=self.bits, method=self.method, group_size=self.group_size,
                                  exclude=patterns, symmetric=self.symmetric, act_order=self.act_order, log=log)
        return out
