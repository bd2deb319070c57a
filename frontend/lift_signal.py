"""ONNX converters for the signal ops: DFT, STFT, the window functions and MelWeightMatrix.

kiln has no signal ops of its own; these converters write each ONNX op with existing ones:

* HannWindow, HammingWindow, BlackmanWindow and MelWeightMatrix have no data input: with
  constant inputs they fold to constants (computed here in float64, then cast to
  ``output_datatype``). With a run-time size the output's *shape* would depend on a value, which
  kiln's static shapes cannot express, so such a node is refused.
* DFT becomes one matmul with a constant DFT matrix (its rows are the transform, computed with
  numpy's FFT in float64, of each unit input): transpose the axis next to the complex dim, reshape
  to rows of N*c values, matmul with the (N*c, K*c') matrix, reshape and transpose back. The
  matmul is kiln's packed-weight kernel, O(N*K) per row; that beats an FFT for the frame sizes of
  audio front-ends and keeps one kernel. Onesided, inverse (including the inverse real transform,
  opset 20's ``onesided`` with ``inverse``) and ``dft_length`` (zero padding or truncation) are all
  folded into the matrix. A matrix beyond ``DFT_MATRIX_LIMIT`` elements is refused. The matrix
  has the input's dtype, so a float32 transform carries float32 rounding (~1e-7 of the input's
  magnitude on outputs that cancel to zero), as an FFT in float32 does.
* STFT: a constant-index gather cuts the frames, then the same matmul, with a constant window
  folded into the matrix (a run-time window is a mul before it).
DFT's axis (opset 20: an input), dft_length, STFT's frame_step and frame_length must be constants.
"""

from __future__ import annotations

import numpy as np

from kiln.ir.graph import Value
from kiln.ir.types import to_numpy_dtype

from .dtypes import kiln_dtype
from .lift import _check_only, _Ctx, _Refuse, _special, reshape_target

DFT_MATRIX_LIMIT = 1 << 24  # elements of a constant DFT matrix (64 MiB in float32)
FLOATS = ("f16", "bf16", "f32", "f64")


# ------------------------------------------------------------------ helpers

def _const_int(ctx: _Ctx, i: int, what: str) -> int | None:
    """Scalar input ``i`` as an int (None when absent); refused when computed at run time."""
    v = ctx.input(i)
    if v is None:
        return None
    if not v.is_const:
        raise ctx.dynamic(i, what)
    arr = np.asarray(v.const).reshape(-1)
    if arr.size != 1:
        raise _Refuse(f"input {i} ({what}) must be a scalar, got shape {list(np.shape(v.const))}")
    return int(arr[0])


def _const_scalar(ctx: _Ctx, i: int, what: str) -> float:
    v = ctx.x(i)
    if not v.is_const:
        raise ctx.dynamic(i, what)
    return float(np.asarray(v.const).reshape(-1)[0])


def _out_dtype(ctx: _Ctx) -> np.dtype:
    try:
        dt = kiln_dtype(int(ctx.attr("output_datatype", 1)))
    except ValueError as e:
        raise _Refuse(f"output_datatype: {e}") from None
    return np.dtype(to_numpy_dtype(dt))


# ------------------------------------------------------------------ windows

def window(kind: str, size: int, periodic: bool) -> np.ndarray:
    """Hann, Hamming or Blackman window of ``size`` samples in float64 (ONNX's formulas: the
    denominator is ``size`` for a periodic window, ``size - 1`` for a symmetric one)."""
    n = np.arange(size, dtype=np.float64)
    denom = size if periodic else size - 1
    with np.errstate(divide="ignore", invalid="ignore"):
        t = 2.0 * np.pi * n / denom
        if kind == "hann":
            return np.sin(t / 2.0) ** 2
        if kind == "hamming":
            alpha = 25.0 / 46.0
            return alpha - (1.0 - alpha) * np.cos(t)
        return 0.42 - 0.5 * np.cos(t) + 0.08 * np.cos(2.0 * t)


def _window_converter(kind: str):
    def convert(ctx: _Ctx) -> list[Value | None]:
        _check_only(ctx, ("periodic", "output_datatype"))
        size = _const_int(ctx, 0, "size")
        if size is None or size < 0:
            raise _Refuse(f"window size {size} must be given and >= 0")
        arr = window(kind, size, bool(int(ctx.attr("periodic", 1))))
        return [ctx.const(arr.astype(_out_dtype(ctx)), out=0)]
    return convert


for _op, _kind in (("HannWindow", "hann"), ("HammingWindow", "hamming"), ("BlackmanWindow", "blackman")):
    _special(_op)(_window_converter(_kind))


def mel_weight_matrix(num_mel_bins: int, dft_length: int, sample_rate: int, lower_hz: float,
                      upper_hz: float) -> np.ndarray:
    """ONNX MelWeightMatrix in float64: (dft_length // 2 + 1, num_mel_bins) triangular filters
    between mel-spaced bin edges (the formulas of ONNX's reference and ONNX Runtime, including
    their mel step of (high - low) / (num_mel_bins + 2))."""
    bins = np.arange(num_mel_bins + 2, dtype=np.float64)
    low = 2595.0 * np.log10(1.0 + lower_hz / 700.0)
    high = 2595.0 * np.log10(1.0 + upper_hz / 700.0)
    hz = 700.0 * (10.0 ** ((bins * (high - low) / (num_mel_bins + 2) + low) / 2595.0) - 1.0)
    edges = (((dft_length + 1) * hz) // sample_rate).astype(np.int64)
    out = np.zeros((dft_length // 2 + 1, num_mel_bins))
    for i in range(num_mel_bins):
        lo, mid, hi = edges[i], edges[i + 1], edges[i + 2]
        if mid == lo:
            out[mid, i] = 1.0
        else:
            j = np.arange(lo, mid + 1)
            out[j, i] = (j - lo) / (mid - lo)
        if hi > mid:
            j = np.arange(mid, hi)
            out[j, i] = (hi - j) / (hi - mid)
    return out


@_special("MelWeightMatrix")
def _mel(ctx: _Ctx) -> list[Value | None]:
    _check_only(ctx, ("output_datatype",))
    mels, n_fft, rate = (_const_int(ctx, i, w) for i, w in enumerate(("num_mel_bins", "dft_length",
                                                                        "sample_rate")))
    lo, hi = _const_scalar(ctx, 3, "lower_edge_hertz"), _const_scalar(ctx, 4, "upper_edge_hertz")
    if mels < 1 or n_fft < 1 or rate < 1 or not 0 <= lo < hi <= rate / 2:
        raise _Refuse(f"num_mel_bins={mels}, dft_length={n_fft}, sample_rate={rate}, edges {lo}..{hi} Hz "
                      f"do not describe a mel filter bank (need positive sizes and 0 <= low < high <= rate/2)")
    return [ctx.const(mel_weight_matrix(mels, n_fft, rate, lo, hi).astype(_out_dtype(ctx)), out=0)]


# ------------------------------------------------------------------ DFT matrices

def dft_matrix(n: int, c: int, length: int, *, inverse: bool, onesided: bool,
               weights: np.ndarray | None = None) -> np.ndarray:
    """The (n * c, k * c') float64 matrix of ONNX DFT along an axis of ``n`` samples with ``c``
    (1: real, 2: complex) components: row i is the transform of the i-th unit input, so
    ``x.reshape(-1, n * c) @ M`` is the transform of each row. ``weights`` (n) scale the samples
    first (a window). numpy's FFT defines every mode exactly as ONNX's reference does."""
    basis = np.eye(n * c).reshape(n * c, n, c)
    if weights is not None:
        basis = basis * weights.astype(np.float64).reshape(1, n, 1)
    s = basis[..., 0] + (1j * basis[..., 1] if c == 2 else 0)
    if inverse and onesided:
        y = np.fft.irfft(s, n=length, axis=1)[..., None]
    elif inverse:
        f = np.fft.ifft(s, n=length, axis=1)
        y = np.stack([f.real, f.imag], axis=-1)
    else:
        f = np.fft.fft(s, n=length, axis=1)
        if onesided:
            f = f[:, : length // 2 + 1]
        y = np.stack([f.real, f.imag], axis=-1)
    return y.reshape(n * c, -1)


def _check_size(n_in: int, n_out: int) -> None:
    if n_in * n_out > DFT_MATRIX_LIMIT:
        raise _Refuse(f"kiln computes DFT/STFT as a matmul with a constant {n_in}x{n_out} matrix, which "
                      f"is beyond its limit of {DFT_MATRIX_LIMIT} elements")


def _float_input(v: Value, what: str) -> None:
    if v.type.dtype not in FLOATS:
        raise _Refuse(f"{what} has dtype {v.type.dtype}; DFT/STFT take float tensors")


# ------------------------------------------------------------------ DFT

@_special("DFT", needs=("matmul", "reshape", "transpose"), since=20)
def _dft(ctx: _Ctx) -> list[Value | None]:
    _check_only(ctx, ("axis", "inverse", "onesided"))
    x = ctx.x(0)
    _float_input(x, "the input")
    r = x.type.rank
    if ctx.opset >= 20:
        axis = _const_int(ctx, 2, "axis")
        axis = -2 if axis is None else axis
    else:
        axis = int(ctx.attr("axis", 1))
    if r < 2 or not -r <= axis < r or axis % r == r - 1:
        raise _Refuse(f"axis {axis} must name a signal dim of {x.type} (not the last, complex dim)")
    axis %= r
    n, c = x.type.shape[axis], x.type.shape[-1]
    if not isinstance(n, int) or c not in (1, 2):
        raise _Refuse(f"DFT needs a static signal dim and a last dim of 1 or 2, got {x.type}",
                      dynamic=not isinstance(n, int))
    inverse, onesided = bool(int(ctx.attr("inverse", 0))), bool(int(ctx.attr("onesided", 0)))
    length = _const_int(ctx, 1, "dft_length")
    if length is None:
        length = 2 * (n - 1) if inverse and onesided else n
    if length < 1:
        raise _Refuse(f"dft_length {length} must be >= 1")
    k = length if inverse or not onesided else length // 2 + 1
    c_out = 1 if inverse and onesided else 2
    _check_size(n * c, k * c_out)
    w = dft_matrix(n, c, length, inverse=inverse, onesided=onesided)
    return [_matmul_along(ctx, x, axis, w, k, c_out)]


def _const_matmul(ctx: _Ctx, rows: Value, w: np.ndarray) -> Value:
    """rows @ w, the float64 matrix rounded to the rows' dtype (kiln's packed-weight matmul)."""
    return ctx.op("matmul", [rows, ctx.const(w.astype(rows.type.np_dtype))])


def _matmul_along(ctx: _Ctx, x: Value, axis: int, w: np.ndarray, k: int, c_out: int) -> Value:
    """x's dims (axis, last) as rows of N*c, times ``w``, back as (k, c_out) at the same places."""
    r = x.type.rank
    perm = [i for i in range(r) if i not in (axis, r - 1)] + [axis, r - 1]
    moved = perm != list(range(r))
    xt = ctx.op("transpose", [x], {"perm": perm}) if moved else x
    lead = list(xt.type.shape[:-2])
    rows = ctx.op("reshape", [xt], {"shape": [0] * len(lead) + [int(w.shape[0])]})
    y = _const_matmul(ctx, rows, w)
    target = reshape_target(y.type.shape, [*lead, k, c_out])
    if target is None:
        raise _Refuse(f"the DFT of {x.type} cannot be reshaped back", dynamic=True)
    y = ctx.op("reshape", [y], {"shape": target}, out=None if moved else 0)
    if moved:
        inv = [perm.index(i) for i in range(r)]
        y = ctx.op("transpose", [y], {"perm": inv}, out=0)
    return y


# ------------------------------------------------------------------ STFT

@_special("STFT", needs=("matmul", "reshape", "gather", "mul"))
def _stft(ctx: _Ctx) -> list[Value | None]:
    _check_only(ctx, ("onesided",))
    x, win = ctx.x(0), ctx.input(2)
    _float_input(x, "the signal")
    if x.type.rank != 3 or x.type.shape[2] not in (1, 2) or not isinstance(x.type.shape[1], int):
        raise _Refuse(f"STFT's signal must be (batch, static length, 1 or 2), got {x.type}",
                      dynamic=x.type.rank == 3 and not isinstance(x.type.shape[1], int))
    length, c = int(x.type.shape[1]), int(x.type.shape[2])
    step = _const_int(ctx, 1, "frame_step")
    frame_length = _const_int(ctx, 3, "frame_length")
    if win is not None and (win.type.rank != 1 or not isinstance(win.type.shape[0], int)):
        raise _Refuse(f"STFT's window must be 1-D with a static length, got {win.type}")
    ws = int(win.type.shape[0]) if win is not None else None
    if frame_length is None:
        frame_length = ws if ws is not None else length
    if ws is not None and ws != frame_length:
        raise _Refuse(f"the window has {ws} samples but frame_length is {frame_length}; ONNX requires them equal")
    onesided = bool(int(ctx.attr("onesided", 1)))
    if step is None or step < 1 or frame_length < 1 or frame_length > length:
        raise _Refuse(f"frame_step {step} and frame_length {frame_length} do not fit a signal of {length}")
    frames = 1 + (length - frame_length) // step
    k = frame_length // 2 + 1 if onesided else frame_length
    _check_size(frame_length * c, k * 2)
    idx = np.arange(frames, dtype=np.int64)[:, None] * step + np.arange(frame_length, dtype=np.int64)[None, :]
    cut = ctx.op("gather", [x, ctx.const(idx)], {"axis": 1})  # (batch, frames, frame_length, c)
    weights = None
    if win is not None and win.is_const:
        weights = np.asarray(win.const)
    elif win is not None:
        cut = ctx.op("mul", [cut, ctx.op("reshape", [win], {"shape": [frame_length, 1]})])
    w = dft_matrix(frame_length, c, frame_length, inverse=False, onesided=onesided, weights=weights)
    rows = ctx.op("reshape", [cut], {"shape": [0, 0, frame_length * c]})
    y = _const_matmul(ctx, rows, w)
    return [ctx.op("reshape", [y], {"shape": [0, 0, k, 2]}, out=0)]
