"""Calibration data for post-training quantization: loading, seeded sampling, and the activations it produces.

A calibration set is a list of samples, each ``{graph input name: array}`` for
one batch the model would see, with an id per sample (the ``.npz`` file's stem,
or ``"file.npz:i"`` for row i of a stacked file).  Every data-driven rewrite
(insert-qdq, RepQ-ViT, SmoothQuant, GPTQ, AWQ) draws a seeded subset with
:func:`draw` and reads the tensors it needs through :func:`activations`; the
seed and the ids drawn go into the artifact manifest.

Ranges (:func:`compute_ranges`) follow ``onnxruntime.quantization.calibrate``
so that kiln's scales can be compared with ``quantize_static``'s:

* ``minmax``: the smallest and largest value over all samples (ORT's
  ``MinMaxCalibrater`` without moving average).
* ``percentile``: ORT's default for quantize_static (``symmetric=True``): a
  2048-bin histogram of |x| over [min|x|, max|x|]; t = the bin edge where the
  cumulative share reaches 99.999 %; the range is (-t, t) clipped to the
  observed [min, max].
* ``entropy``: a histogram of x over (-a, a), a = max|x| (128 bins), and the
  TensorRT/MXNet KL search over symmetric windows with 128 quantized bins
  (ORT's ``get_entropy_threshold``, arithmetic included), clipped to [min, max].
  With ORT's default 128/128 there is only one window, the whole histogram,
  so the default entropy range equals minmax; use ``bins=2048`` for a real search.
* ``mse``: not in ORT.  The histogram of x over (-a, a) (2048 bins), and the
  clip threshold c (a positive bin edge) whose range [max(min(rmin, 0), -c),
  min(max(rmax, 0), c)] (widened to include 0, so never empty), quantized with
  :func:`activation_qparams`, gives the smallest expected squared error, the
  values taken as uniform within each bin (integrated in closed form).

Where kiln differs from ORT: ORT collects all samples and builds each
histogram in one go; kiln streams samples and makes two passes (the first
finds min/max, the second fills a histogram with that fixed range), which gives
the same histogram without holding every activation (the first pass's arrays
are kept and reused when they fit in ``CACHE_BYTES``).  Non-finite values are
ignored (ORT ignores NaN only, and its histograms fail on them); a tensor with
no finite value gets the range (0, 0).
"""

from __future__ import annotations

import math
import os
import tokenize
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from kiln.ir.graph import Graph
from kiln.ir.interpret import interpret
from kiln.ir.types import bind_shape, to_numpy_dtype

from ..runtime.errors import Error, LimitError
from ..runtime.limits import DEFAULT_LIMITS, Limits, check_limit

METHODS = ("minmax", "percentile", "entropy", "mse")
CACHE_BYTES = 256 << 20  # first-pass activations kept for the histogram pass when they fit
DEFAULT_BINS = {"percentile": 2048, "entropy": 128, "mse": 2048}
QRANGE = {"i8": (-128, 127), "u8": (0, 255), "i16": (-32768, 32767), "u16": (0, 65535),
          "i4": (-8, 7), "u4": (0, 15)}
Range = tuple[float, float]

__all__ = ["CACHE_BYTES", "METHODS", "CalibrationError", "CalibrationSet", "EntropyObserver", "MinMaxObserver",
           "MseObserver", "Observer", "PercentileObserver", "activation_qparams", "activations", "as_calibration",
           "calibration_for", "check_calibration", "check_sample", "compute_ranges", "draw", "expected_sq_error", "load_calibration", "make_observer",
           "quantize_symmetric", "read_npz", "symmetric_weight_qparams", "synthetic_calibration"]


class CalibrationError(Error, ValueError):
    """Calibration data that does not fit the model (missing input, wrong shape, empty set, unreadable file)."""


@dataclass(frozen=True)
class CalibrationSet:
    """Samples (``{input name: array}``) and their ids, in the same order."""

    samples: tuple[dict[str, np.ndarray], ...]
    ids: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.samples)


_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a zip with members, an empty zip


def _npz_headers(path: Path, limits: Limits) -> None:
    """Check every ``.npy`` member's header before numpy reads it: no object dtype, a size within
    ``limits.tensor_bytes`` and data enough for it (numpy allocates what a header claims, first)."""
    import zipfile

    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            if not info.filename.endswith(".npy"):
                raise ValueError(f"member {info.filename!r} is not an .npy array (an .npz holds only .npy files)")
            name = info.filename[:-4]
            with zf.open(info) as f:
                version = np.lib.format.read_magic(f)
                read = {(1, 0): np.lib.format.read_array_header_1_0,
                        (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                if read is None:
                    raise ValueError(f"array {name!r} has .npy format version {version}; kiln reads 1.0 and 2.0")
                shape, _, dtype = read(f, max_header_size=10000)
                if dtype.hasobject:
                    raise ValueError(f"array {name!r} holds Python objects (dtype {dtype}), which kiln never "
                                     f"unpickles")
                if not all(isinstance(d, int) and d >= 0 for d in shape):
                    raise ValueError(f"array {name!r} has a malformed shape {shape!r} in its .npy header")
                nbytes = math.prod(shape) * dtype.itemsize
                check_limit(limits, "tensor_bytes", nbytes, f"array {name!r} of {path} ({dtype}{list(shape)})")
                if nbytes > info.file_size:
                    raise ValueError(f"array {name!r} claims {list(shape)} {dtype} ({nbytes:,} bytes) but holds "
                                     f"{info.file_size:,} bytes (truncated or forged)")


def read_npz(path: str | os.PathLike, what: str, limits: Limits | None = None,
             error: type[Error] = CalibrationError) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` file (never unpickled), checked before reading; ``what`` names the file's role
    in errors (``"calibration file"``, ``"--inputs"``), which name the file and what is wrong with it and are
    ``error`` (CalibrationError; the CLI's ``--inputs`` reader passes InputError)."""
    try:
        return _read_npz(Path(path), f"{what} {os.fspath(path)!r}", limits)
    except (CalibrationError, LimitError) as e:
        if isinstance(e, error) or isinstance(e, LimitError):
            raise
        raise error(str(e)) from None


def _read_npz(p: Path, label: str, limits: Limits | None) -> dict[str, np.ndarray]:
    import zipfile
    import zlib

    try:
        with open(p, "rb") as f:
            head = f.read(4)
        if head[:4] not in _ZIP_MAGIC:
            kind = "it is a single .npy array (save with np.savez)" if head.startswith(b"\x93NUM") else \
                "it is empty" if not head else f"it starts with {head!r}"
            raise CalibrationError(f"{label} is not an .npz file (a zip of .npy arrays, as np.savez writes): "
                                   f"{kind}")
        _npz_headers(p, limits or DEFAULT_LIMITS)
        with np.load(p, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (CalibrationError, LimitError):
        raise
    except MemoryError:
        raise CalibrationError(f"{label}: out of memory reading it") from None
    except (OSError, ValueError, EOFError, KeyError, NotImplementedError, RuntimeError, zipfile.BadZipFile,
            zlib.error, SyntaxError, TypeError, OverflowError, tokenize.TokenError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__
        if isinstance(e, (SyntaxError, TypeError, OverflowError, tokenize.TokenError)):
            why = f"a malformed .npy header ({why})"
        raise CalibrationError(f"{label} is not a readable .npz file: {why}") from None


def _npz(path: Path) -> dict[str, np.ndarray]:
    arrays = read_npz(path, "calibration file")
    for name, a in arrays.items():
        if a.dtype.kind in "fc":
            bad = int(a.size - np.count_nonzero(np.isfinite(a)))
            if bad:
                raise CalibrationError(f"calibration file {str(path)!r}: array {name!r} has {bad:,} non-finite "
                                       f"values (NaN or Inf) of {a.size:,}; calibration needs finite data")
    return arrays


def load_calibration(path: str | os.PathLike) -> CalibrationSet:
    """A directory of ``.npz`` files, one sample each, or one ``.npz`` whose arrays have a leading sample axis."""
    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*.npz"))
        if not files:
            raise CalibrationError(f"calibration directory {str(p)!r} holds no .npz files")
        return CalibrationSet(tuple(_npz(f) for f in files), tuple(f.stem for f in files))
    if not p.is_file():
        raise CalibrationError(f"calibration data {str(p)!r} does not exist (expected a directory of .npz "
                               f"files or one .npz file)")
    arrays = _npz(p)
    if not arrays:
        raise CalibrationError(f"calibration file {str(p)!r} holds no arrays")
    counts = {k: (a.shape[0] if a.ndim else None) for k, a in arrays.items()}
    if len(set(counts.values())) != 1 or None in counts.values():
        raise CalibrationError(f"calibration file {str(p)!r}: every array needs the same leading sample axis; "
                               f"got {', '.join(f'{k}: {c}' for k, c in counts.items())}")
    n = next(iter(counts.values()))
    return CalibrationSet(tuple({k: a[i] for k, a in arrays.items()} for i in range(n)),
                          tuple(f"{p.name}:{i}" for i in range(n)))


def as_calibration(data: CalibrationSet | str | os.PathLike | Iterable[Mapping[str, np.ndarray]]) -> CalibrationSet:
    """A CalibrationSet from a set, a path (see :func:`load_calibration`) or an iterable of dicts (ids ``"0"``, ...)."""
    if isinstance(data, CalibrationSet):
        return data
    if isinstance(data, (str, os.PathLike)):
        return load_calibration(data)
    samples = tuple({k: np.asarray(v) for k, v in s.items()} for s in data)
    return CalibrationSet(samples, tuple(str(i) for i in range(len(samples))))


def draw(calib: CalibrationSet, n: int, seed: int) -> CalibrationSet:
    """A seeded sample of ``n`` samples without replacement (all of them when n <= 0 or n >= len), in set order."""
    if len(calib) == 0:
        raise CalibrationError("the calibration set is empty")
    if n <= 0 or n >= len(calib):
        return calib
    idx = np.sort(np.random.default_rng(seed).choice(len(calib), size=n, replace=False))
    return CalibrationSet(tuple(calib.samples[i] for i in idx), tuple(calib.ids[i] for i in idx))


def synthetic_calibration(graph: Graph, n: int, seed: int) -> CalibrationSet:
    """``n`` seeded random-input samples (``random_inputs``): for pipeline strings given no data, and the fuzzer."""
    from kiln.passes.manager import random_inputs

    return CalibrationSet(tuple(random_inputs(graph, seed + i) for i in range(max(n, 1))),
                          tuple(f"random:{seed + i}" for i in range(max(n, 1))))


def calibration_for(graph: Graph, path: str, samples: int, seed: int) -> CalibrationSet:
    """What a pass given the options ``calib=PATH,samples=N,seed=S`` calibrates on (synthetic when PATH is empty)."""
    if not path:
        return synthetic_calibration(graph, samples, seed)
    return draw(load_calibration(path), samples, seed)


def check_sample(graph: Graph, sample: Mapping[str, np.ndarray], sample_id: str) -> dict[str, np.ndarray]:
    """The sample's arrays for the graph's inputs, cast to their dtypes, after checking that every input is
    there with a shape and kind (integer or float) its type admits; errors name the sample and the input."""
    missing = [v.name for v in graph.inputs if v.name not in sample]
    if missing:
        raise CalibrationError(f"calibration sample {sample_id!r} lacks model input(s) {missing}; it holds "
                               f"{sorted(sample)}")
    env: dict[str, int] = {}
    for v in graph.inputs:
        a = np.asarray(sample[v.name])
        err = bind_shape(v.type.shape, tuple(a.shape), env)
        if err:
            raise CalibrationError(f"calibration sample {sample_id!r}: input {v.name!r} expected shape {v.type}, "
                                   f"got {list(a.shape)} ({a.dtype}): {err}")
        if a.dtype.kind not in "biuf" or (a.dtype.kind == "f") != (v.type.np_dtype.kind == "f"):
            raise CalibrationError(f"calibration sample {sample_id!r}: input {v.name!r} expected dtype "
                                   f"{v.type.dtype}, got {a.dtype}")
        if a.dtype.kind == "f" and a.dtype.itemsize > v.type.np_dtype.itemsize:
            raise CalibrationError(f"calibration sample {sample_id!r}: input {v.name!r} expected dtype "
                                   f"{v.type.np_dtype}, got {a.dtype}; kiln does not narrow calibration data "
                                   f"silently (ONNX Runtime refuses it too): convert it with "
                                   f"a.astype(np.{v.type.np_dtype})")
    return {v.name: np.asarray(sample[v.name]).astype(v.type.np_dtype, copy=False) for v in graph.inputs}


def check_calibration(graph: Graph, calib: CalibrationSet) -> None:
    """Every sample passes :func:`check_sample` (and there is at least one)."""
    if len(calib) == 0:
        raise CalibrationError("the calibration set is empty")
    for sample, sid in zip(calib.samples, calib.ids):
        check_sample(graph, sample, sid)


def activations(graph: Graph, calib: CalibrationSet, values: Sequence[str], *,
                progress: Callable[[int, int], None] | None = None) -> Iterator[dict[str, np.ndarray]]:
    """For each sample, the arrays of ``values`` (graph value names) computed by the reference interpreter."""
    names = set(values)
    known = {v.name for v in graph.values()}
    unknown = sorted(names - known)
    if unknown:
        raise CalibrationError(f"cannot observe {unknown}: no such value in graph @{graph.name}")
    for i, (sample, sid) in enumerate(zip(calib.samples, calib.ids)):
        try:
            env = interpret(graph, check_sample(graph, sample, sid), keep_all=True)
        except ValueError as e:
            raise CalibrationError(f"calibration sample {sid!r} does not fit the model: {e}") from None
        if progress is not None:
            progress(i + 1, len(calib))
        yield {k: env[k] for k in names}


# ====================================================================== quantization parameters

def _act_qparams(rmin: np.ndarray, rmax: np.ndarray, qmin: int, qmax: int) -> tuple[np.ndarray, np.ndarray]:
    """ORT's ``compute_scale_zp`` (asymmetric) on arrays: float64 scales (not yet rounded to f32), int zero points."""
    lo = np.minimum(np.asarray(rmin, np.float64), 0.0)
    hi = np.maximum(np.asarray(rmax, np.float64), 0.0)
    scale = (hi - lo) / float(qmax - qmin)
    tiny = scale < np.finfo(np.float32).tiny
    safe = np.where(tiny, 1.0, scale)
    zp = np.where(tiny, 0.0, np.clip(np.round(qmin - lo / safe), qmin, qmax))
    return safe, zp.astype(np.int64)


def activation_qparams(rmin: float, rmax: float, dtype: str = "i8") -> tuple[float, int]:
    """Asymmetric per-tensor (scale, zero point) for a range widened to include 0 (ORT's formula).

    scale = (rmax - rmin) / (qmax - qmin) in float64, then rounded to float32;
    zero_point = round_half_even(qmin - rmin / scale) clipped to [qmin, qmax];
    a range narrower than float32's ``tiny`` gets scale 1 and zero point 0.
    """
    if dtype not in QRANGE:
        raise ValueError(f"activation dtype {dtype!r} is not one of {sorted(QRANGE)}")
    if not (math.isfinite(rmin) and math.isfinite(rmax)) or rmin > rmax:
        raise ValueError(f"activation range ({rmin}, {rmax}) must be finite with rmin <= rmax")
    scale, zp = _act_qparams(np.asarray(rmin), np.asarray(rmax), *QRANGE[dtype])
    return float(np.float32(scale)), int(zp)


def _weight_dtype(bits: int) -> str:
    if bits not in (4, 8, 16):
        raise ValueError(f"symmetric weight quantization takes bits 4, 8 or 16, got {bits}")
    return f"i{bits}"


def symmetric_weight_qparams(w: np.ndarray, axis: int | None, bits: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric (scale, zero point) per slice along ``axis`` (per tensor when None): s = max|w| / (2^(b-1) - 1).

    The scale is float32 ([C], or [] per tensor), computed in float64 as ORT does
    (2·max|w| / (qmax - qmin)); an all-zero slice gets scale 1.  The zero point is zeros of
    the signed ``bits``-bit dtype.
    """
    qmax = 2 ** (bits - 1) - 1
    zdt = to_numpy_dtype(_weight_dtype(bits))
    a = np.abs(np.asarray(w, np.float64))
    if axis is None:
        amax = np.asarray(a.max() if a.size else 0.0)
    else:
        ax = axis % a.ndim
        amax = a.max(axis=tuple(i for i in range(a.ndim) if i != ax)) if a.size else np.zeros(a.shape[ax])
    scale = 2.0 * amax / (2.0 * qmax)
    scale = np.where(scale < np.finfo(np.float32).tiny, 1.0, scale).astype(np.float32)
    return scale, np.zeros(scale.shape, zdt)


def quantize_symmetric(w: np.ndarray, scale: np.ndarray, axis: int | None, bits: int = 8) -> np.ndarray:
    """clip(round_half_even(w / s), -qmax, qmax) with the division in float32 (ORT's ``quantize_nparray``)."""
    qmax = 2 ** (bits - 1) - 1
    s = np.asarray(scale, np.float32)
    if axis is not None and s.ndim:
        ax = axis % w.ndim
        s = s.reshape([-1 if i == ax else 1 for i in range(w.ndim)])
    q = np.clip(np.rint(np.asarray(w, np.float32) / s), -qmax, qmax)
    return q.astype(np.int32).astype(to_numpy_dtype(_weight_dtype(bits)))


# ====================================================================== observers

def _finite(x: np.ndarray) -> np.ndarray:
    """The finite values of x, flat, in x's float dtype (float32 for anything else)."""
    a = np.asarray(x)
    if a.dtype.kind != "f":
        a = a.astype(np.float32)
    a = a.reshape(-1)
    ok = np.isfinite(a)
    return a if ok.all() else a[ok]


class Observer(ABC):
    """Accumulates one tensor's values over samples (in ``passes`` passes over the data) and gives its range."""

    passes: ClassVar[int] = 1

    @abstractmethod
    def observe(self, x: np.ndarray, pass_index: int = 0) -> None:
        """Take one sample's array in pass ``pass_index``."""

    @abstractmethod
    def range(self) -> Range:
        """The calibrated (rmin, rmax); (0, 0) when nothing finite was seen."""


class MinMaxObserver(Observer):
    """The smallest and largest finite value seen (ORT's MinMaxCalibrater, no moving average)."""

    def __init__(self) -> None:
        self.lo, self.hi = math.inf, -math.inf
        self.dtype: np.dtype = np.dtype(np.float32)

    def observe(self, x: np.ndarray, pass_index: int = 0) -> None:
        if pass_index:
            return
        v = _finite(x)
        self.dtype = v.dtype
        if v.size:
            self.lo, self.hi = min(self.lo, float(v.min())), max(self.hi, float(v.max()))

    @property
    def seen(self) -> bool:
        return self.lo <= self.hi

    def range(self) -> Range:
        return (self.lo, self.hi) if self.seen else (0.0, 0.0)

    def clip(self, lo: float, hi: float) -> Range:
        """(lo, hi) narrowed to the observed range, as ORT clips its histogram thresholds."""
        return (max(lo, self.lo), min(hi, self.hi))


class _HistogramObserver(Observer):
    """Pass 0 finds min/max; pass 1 fills ``bins`` equal bins over the range :meth:`_span` fixes."""

    passes: ClassVar[int] = 2

    def __init__(self, bins: int) -> None:
        if bins < 2:
            raise ValueError(f"a histogram needs at least 2 bins, got {bins}")
        self.bins = bins
        self.minmax = MinMaxObserver()
        self.hist: np.ndarray | None = None
        self.edges: np.ndarray | None = None

    def _values(self, v: np.ndarray) -> np.ndarray:
        return v

    def _span(self) -> tuple[np.generic, np.generic]:
        """Symmetric (-a, a), a = max|x| in the data's dtype (ORT's ``collect_value``)."""
        a = self.minmax.dtype.type(max(abs(self.minmax.lo), abs(self.minmax.hi)))
        return -a, a

    def observe(self, x: np.ndarray, pass_index: int = 0) -> None:
        if pass_index == 0:
            self._first(x)
            return
        if not self.minmax.seen:
            return
        v = self._values(_finite(x))
        h, e = np.histogram(v, self.bins, range=self._span())
        self.hist = h if self.hist is None else self.hist + h
        self.edges = e

    def _first(self, x: np.ndarray) -> None:
        self.minmax.observe(x)

    def range(self) -> Range:
        if self.hist is None or not self.hist.sum():
            return self.minmax.range()
        return self._threshold()

    @abstractmethod
    def _threshold(self) -> Range:
        """The range chosen from ``hist`` and ``edges``."""


class PercentileObserver(_HistogramObserver):
    """ORT's PercentileCalibrater as quantize_static configures it (symmetric=True).

    A histogram of |x| over [min|x|, max|x|]; t = the first edge whose cumulative share
    reaches ``percentile`` %; the range is (-t, t) clipped to the observed [min, max].
    """

    def __init__(self, bins: int = 2048, percentile: float = 99.999) -> None:
        if not 0.0 <= percentile <= 100.0:
            raise ValueError(f"percentile must be in [0, 100], got {percentile}")
        super().__init__(bins)
        self.percentile = percentile
        self.amin, self.amax = math.inf, -math.inf

    def _first(self, x: np.ndarray) -> None:
        self.minmax.observe(x)
        v = np.abs(_finite(x))
        if v.size:
            self.amin, self.amax = min(self.amin, float(v.min())), max(self.amax, float(v.max()))

    def _values(self, v: np.ndarray) -> np.ndarray:
        return np.abs(v)

    def _span(self) -> tuple[np.generic, np.generic]:
        t = self.minmax.dtype.type
        return t(self.amin), t(self.amax)

    def _threshold(self) -> Range:
        cdf = np.cumsum(self.hist / self.hist.sum())
        t = float(self.edges[np.searchsorted(cdf, self.percentile / 100.0)])
        return self.minmax.clip(-t, t)


class EntropyObserver(_HistogramObserver):
    """ORT's EntropyCalibrater: the symmetric window of the histogram whose ``quantized_bins``-bin
    requantization has the least KL divergence from it (``get_entropy_threshold``, vectorized,
    same integer arithmetic and ORT's own ``smooth_distribution`` / ``entropy``)."""

    def __init__(self, bins: int = 128, quantized_bins: int = 128) -> None:
        if quantized_bins < 2 or quantized_bins > bins:
            raise ValueError(f"quantized_bins must be in [2, bins={bins}], got {quantized_bins}")
        super().__init__(bins)
        self.quantized_bins = quantized_bins

    def _threshold(self) -> Range:
        from onnxruntime.quantization.calibrate import entropy
        from onnxruntime.quantization.quant_utils import smooth_distribution

        hist, edges, nq = self.hist, self.edges, self.quantized_bins
        n = hist.size
        zero, half = n // 2, nq // 2
        csum = np.concatenate([[0], np.cumsum(hist)])
        best, best_div = None, math.inf
        for i in range(half, zero + 1):
            start, end = zero - i, min(zero + i + 1, n)
            sliced = hist[start:end]
            p = sliced.copy()
            p[0] += csum[start]
            p[-1] += csum[n] - csum[end]
            m = sliced.size // nq
            k = nq * m
            merged = sliced[:k].reshape(nq, m).sum(axis=1)
            merged[-1] += sliced[k:].sum()
            norms = (p[:k] != 0).reshape(nq, m).sum(axis=1)
            with np.errstate(divide="ignore", invalid="ignore"):
                per_bin = np.where(norms != 0, merged / np.where(norms != 0, norms, 1), 0.0)
            q = np.zeros(p.size, np.int64)
            q[:k] = np.repeat(per_bin.astype(np.int64), m)
            ps, qs = smooth_distribution(p), smooth_distribution(q)
            div = math.inf if ps is None or qs is None else float(np.float32(entropy(ps, qs)))
            if best is None or div < best_div:
                best, best_div = (float(edges[start]), float(edges[end])), div
        return self.minmax.clip(*best)


def _sawtooth_integral(x: np.ndarray, s: np.ndarray) -> np.ndarray:
    """G(x) = integral from 0 to x of (t - s*round(t/s))^2 dt: the rounding error's energy on the grid s*Z."""
    k = np.rint(x / s)
    r = x - k * s
    return k * s ** 3 / 12.0 + r ** 3 / 3.0


def expected_sq_error(lo_edges: np.ndarray, hi_edges: np.ndarray, counts: np.ndarray, scale: np.ndarray,
                      zero_point: np.ndarray, qmin: int, qmax: int) -> np.ndarray:
    """Sum over bins of count * E[(Q(x) - x)^2] with x uniform in each bin, for each (scale, zero point) row.

    Q rounds to the grid scale*Z inside [(qmin - z)*s, (qmax - z)*s] and clamps outside it,
    so the error is a sawtooth inside and the distance to the end outside; both integrate in
    closed form.  ``scale`` and ``zero_point`` are column vectors (one row per candidate).
    """
    a, b = (qmin - zero_point) * scale, (qmax - zero_point) * scale
    e0, e1 = lo_edges[None, :], hi_edges[None, :]
    u0, u1 = np.clip(e0, a, b), np.clip(e1, a, b)
    inside = _sawtooth_integral(u1, scale) - _sawtooth_integral(u0, scale)
    below = ((np.minimum(e1, a) - a) ** 3 - (np.minimum(e0, a) - a) ** 3) / 3.0
    above = ((np.maximum(e1, b) - b) ** 3 - (np.maximum(e0, b) - b) ** 3) / 3.0
    return ((inside + below + above) / (e1 - e0)) @ counts


class MseObserver(_HistogramObserver):
    """Not in ORT: the clip threshold c (a positive bin edge of the symmetric histogram) whose range
    [max(min(rmin, 0), -c), min(max(rmax, 0), c)] (so it always includes 0) minimises the expected
    squared error of ``dtype`` quantization with :func:`activation_qparams`, the values taken as
    uniform within each bin (:func:`expected_sq_error`)."""

    def __init__(self, bins: int = 2048, dtype: str = "i8") -> None:
        super().__init__(bins)
        self.qrange = QRANGE[dtype]

    def _threshold(self) -> Range:
        edges = self.edges.astype(np.float64)
        used = self.hist > 0
        cands = edges[self.bins // 2 + 1:]
        lo = np.maximum(min(self.minmax.lo, 0.0), -cands)
        hi = np.minimum(max(self.minmax.hi, 0.0), cands)
        qmin, qmax = self.qrange
        scale, zp = _act_qparams(lo, hi, qmin, qmax)
        s32 = scale.astype(np.float32).astype(np.float64)[:, None]
        err = expected_sq_error(edges[:-1][used], edges[1:][used], self.hist[used].astype(np.float64), s32,
                                zp[:, None].astype(np.float64), qmin, qmax)
        k = int(np.argmin(err))
        return float(lo[k]), float(hi[k])


def make_observer(method: str, *, bins: int = 0, quantized_bins: int = 128, percentile: float = 99.999) -> Observer:
    """A fresh observer for ``method`` (one of METHODS); ``bins`` 0 means the method's ORT default."""
    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}; expected one of {', '.join(METHODS)}")
    if method == "minmax":
        return MinMaxObserver()
    nb = bins or DEFAULT_BINS[method]
    if method == "percentile":
        return PercentileObserver(nb, percentile)
    if method == "entropy":
        return EntropyObserver(nb, quantized_bins)
    return MseObserver(nb)


def compute_ranges(graph: Graph, calib: CalibrationSet, values: Iterable[str], method: str = "minmax", *,
                   progress: Callable[[int, int], None] | None = None, bins: int = 0, quantized_bins: int = 128,
                   percentile: float = 99.999) -> dict[str, Range]:
    """The calibrated (rmin, rmax) of each named value over ``calib`` by ``method`` (see the module docstring).

    Histogram methods need a second pass over the data; the first pass's arrays are
    reused when they fit in CACHE_BYTES, otherwise the interpreter runs again.
    ``progress(done, total)`` is called after each sample of the first pass.
    """
    names = list(dict.fromkeys(values))
    if not names:
        return {}
    obs = {n: make_observer(method, bins=bins, quantized_bins=quantized_bins, percentile=percentile) for n in names}
    cache: list[dict[str, np.ndarray]] | None = []
    size = 0
    for sample in activations(graph, calib, names, progress=progress):
        for n, o in obs.items():
            o.observe(sample[n], 0)
        if cache is not None:
            size += sum(a.nbytes for a in sample.values())
            if size <= CACHE_BYTES:
                cache.append(sample)
            else:
                cache = None
    for k in range(1, max(o.passes for o in obs.values())):
        for sample in cache if cache is not None else activations(graph, calib, names):
            for n, o in obs.items():
                o.observe(sample[n], k)
    return {n: o.range() for n, o in obs.items()}
