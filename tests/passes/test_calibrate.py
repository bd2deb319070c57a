"""Calibration methods (passes/calibrate.py) against onnxruntime.quantization's calibrators and formulas.

The same samples go through ORT's calibrator (``create_calibrator`` on an ONNX
model, a CalibrationDataReader) and through :func:`compute_ranges` on the lifted
graph.  Ranges of graph inputs (the same float32 data on both sides) must be
equal bit for bit for minmax, percentile and entropy.  Ranges of a computed
tensor (a MatMul output, which ORT computes in float32 and kiln's interpreter in
float64) may differ: minmax within 1e-6 relative, the histogram methods within
one histogram bin (the chosen edge may move by one when a value crosses an
edge).  MSE has no ORT counterpart; it is checked against a brute-force search
over the raw values.  The scale / zero-point formulas are compared with ORT's
``compute_scale_zp`` and ``quantize_data`` for all inputs (hypothesis).
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization.calibrate import (
    CalibrationDataReader,
    CalibrationMethod,
    create_calibrator,
)
from onnxruntime.quantization.quant_utils import compute_scale_zp, quantize_data

from kiln.frontend import lift
from kiln.passes import calibrate as cal
from kiln.passes.calibrate import (
    EntropyObserver,
    MinMaxObserver,
    MseObserver,
    PercentileObserver,
    activation_qparams,
    as_calibration,
    compute_ranges,
    make_observer,
    quantize_symmetric,
    symmetric_weight_qparams,
)

INPUTS = ("a", "b", "c")
SHAPE = (16, 64)
N_SAMPLES = 12


class Reader(CalibrationDataReader):
    """ORT's view of the same calibration samples."""

    def __init__(self, samples: list[dict[str, np.ndarray]]):
        self.it = iter(samples)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.it, None)


def _model(rng: np.random.Generator) -> onnx.ModelProto:
    """Three inputs, each read by a MatMul with one shared weight: a, b, c are calibrated as they are fed."""
    w = rng.standard_normal((SHAPE[1], 8)).astype(np.float32)
    nodes = [helper.make_node("MatMul", [n, "W"], [f"y{n}"], name=f"mm_{n}") for n in INPUTS]
    graph = helper.make_graph(
        nodes, "calib", [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(SHAPE)) for n in INPUTS],
        [helper.make_tensor_value_info(f"y{n}", TensorProto.FLOAT, [SHAPE[0], 8]) for n in INPUTS],
        [numpy_helper.from_array(w, "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def _samples(rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
    """a: heavy-tailed with rare outliers; b: all positive; c: all negative and skewed."""
    out = []
    for i in range(N_SAMPLES):
        a = rng.laplace(size=SHAPE) * 2.0
        if i % 4 == 0:
            a.flat[rng.integers(a.size)] = 40.0 * rng.choice([-1, 1])
        b = np.abs(rng.standard_normal(SHAPE)) + 0.25
        c = -rng.exponential(1.5, SHAPE) - 0.1
        out.append({"a": a.astype(np.float32), "b": b.astype(np.float32), "c": c.astype(np.float32)})
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, onnx.ModelProto, list[dict[str, np.ndarray]]]:
    rng = np.random.default_rng(11)
    model = _model(rng)
    path = tmp_path_factory.mktemp("calib") / "model.onnx"
    onnx.save(model, str(path))
    return path, model, _samples(rng)


def _ort_ranges(path: Path, samples: list[dict[str, np.ndarray]], method: CalibrationMethod,
                options: dict) -> dict[str, tuple[float, float]]:
    with contextlib.redirect_stdout(io.StringIO()):
        c = create_calibrator(str(path), ["MatMul"], str(path.with_name(f"aug_{method.name}.onnx")),
                              calibrate_method=method, extra_options=options)
        c.collect_data(Reader(samples))
        data = c.compute_data()
    return {k: tuple(float(np.asarray(x).reshape(-1)[0]) for x in data[k].range_value) for k in data.keys()}


CASES = {
    "minmax": ("minmax", CalibrationMethod.MinMax, {}, {}),
    "percentile": ("percentile", CalibrationMethod.Percentile, {}, {}),
    "percentile-99": ("percentile", CalibrationMethod.Percentile, {"percentile": 99.0}, {"percentile": 99.0}),
    "entropy": ("entropy", CalibrationMethod.Entropy, {}, {}),
    "entropy-512": ("entropy", CalibrationMethod.Entropy, {"num_bins": 512}, {"bins": 512}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_ranges_match_onnxruntime_calibrators(setup, case: str):
    path, model, samples = setup
    method, ort_method, ort_opts, opts = CASES[case]
    want = _ort_ranges(path, samples, ort_method, ort_opts)
    names = [*INPUTS, "ya"]
    got = compute_ranges(lift(model), as_calibration(samples), names, method, **opts)
    for n in INPUTS:
        assert got[n] == want[n], (n, got[n], want[n])
    lo, hi = want["ya"]
    bins = {"minmax": 0, "percentile": 2048, "entropy": opts.get("bins", 128)}[method]
    width = 2 * max(abs(lo), abs(hi)) / bins if bins else 0.0
    for g, w in zip(got["ya"], want["ya"]):
        assert abs(g - w) <= width + 1e-6 * abs(w), (got["ya"], want["ya"], width)


def test_histogram_methods_clip_outliers(setup):
    """On a (heavy-tailed, outlier) the histogram methods that can clip do; minmax spans the outliers."""
    _, model, samples = setup
    g, calib = lift(model), as_calibration(samples)
    mm = compute_ranges(g, calib, ["a"], "minmax")["a"]
    assert max(abs(x) for x in mm) == 40.0
    for method, opts in (("percentile", {"percentile": 99.9}), ("entropy", {"bins": 512})):
        lo, hi = compute_ranges(g, calib, ["a"], method, **opts)["a"]
        assert mm[0] <= lo < 0 < hi <= mm[1] and hi - lo < 0.75 * (mm[1] - mm[0]), (method, lo, hi)


def _actual_mse(x: np.ndarray, lo: float, hi: float) -> float:
    """The squared error of quantizing every raw value of x with the qparams of [lo, hi] (brute force)."""
    s, z = activation_qparams(lo, hi)
    q = np.clip(np.rint(x.astype(np.float32) / np.float32(s)) + z, -128, 127)
    return float(np.mean(((q - z) * np.float64(np.float32(s)) - x) ** 2))


@pytest.mark.parametrize("name", INPUTS)
def test_mse_range_is_the_brute_force_optimum(setup, name: str):
    """The histogram's choice is within 2 % of the best clip threshold found on the raw values."""
    _, model, samples = setup
    lo, hi = compute_ranges(lift(model), as_calibration(samples), [name], "mse")[name]
    x = np.concatenate([s[name].ravel() for s in samples]).astype(np.float64)
    amax = np.abs(x).max()
    lo0, hi0 = min(x.min(), 0.0), max(x.max(), 0.0)
    best = min(_actual_mse(x, max(lo0, -c), min(hi0, c)) for c in np.linspace(amax / 256, amax, 512))
    assert _actual_mse(x, lo, hi) <= 1.02 * best
    assert _actual_mse(x, lo, hi) <= _actual_mse(x, x.min(), x.max())


@settings(max_examples=200, deadline=None)
@given(st.floats(-1e4, 1e4, width=32), st.floats(-1e4, 1e4, width=32), st.sampled_from(["i8", "u8"]))
def test_activation_qparams_is_orts_formula(a: float, b: float, dtype: str):
    lo, hi = min(a, b), max(a, b)
    qmin, qmax = cal.QRANGE[dtype]
    zp, scale = compute_scale_zp(np.float32(lo), np.float32(hi), np.array(qmin, np.int8 if dtype == "i8" else np.uint8),
                                 np.array(qmax, np.int8 if dtype == "i8" else np.uint8))
    assert activation_qparams(lo, hi, dtype) == (float(np.float32(scale)), int(zp))


def test_activation_qparams_edges():
    assert activation_qparams(0.0, 0.0) == (1.0, 0)
    assert activation_qparams(0.5, 2.55) == (float(np.float32(2.55 / 255)), -128)  # widened to include 0
    assert activation_qparams(-2.55, -0.5) == (float(np.float32(2.55 / 255)), 127)
    with pytest.raises(ValueError, match="rmin <= rmax"):
        activation_qparams(1.0, -1.0)
    with pytest.raises(ValueError, match="'i3'"):
        activation_qparams(0.0, 1.0, "i3")


arrays = st.integers(1, 6).flatmap(lambda c: st.lists(
    st.floats(-100, 100, width=32, allow_subnormal=False), min_size=3 * c, max_size=3 * c).map(
        lambda v: np.array(v, np.float32).reshape(3, c)))


@settings(max_examples=150, deadline=None)
@given(arrays, st.sampled_from([0, 1, None]))
def test_symmetric_weights_match_ort_quantize_data(w: np.ndarray, axis: int | None):
    """Per channel (either axis) and per tensor: ORT's symmetric int8 [-127, 127] scale and codes."""
    scale, zp = symmetric_weight_qparams(w, axis)
    codes = quantize_symmetric(w, scale, axis)
    assert codes.dtype == np.int8 and zp.dtype == np.int8 and not zp.any() and scale.dtype == np.float32
    slices = [w] if axis is None else [np.take(w, i, axis=axis) for i in range(w.shape[axis])]
    for i, sl in enumerate(slices):
        ozp, oscale, oq = quantize_data(sl, TensorProto.INT8, symmetric=True)
        assert int(ozp) == 0
        assert np.float32(oscale) == scale.reshape(-1)[i]
        np.testing.assert_array_equal(oq, codes if axis is None else np.take(codes, i, axis=axis))


def test_weight_qparams_shapes_and_zero_channel():
    w = np.zeros((4, 3), np.float32)
    w[:, 1] = [0.5, -1.27, 0.2, 0.0]
    scale, zp = symmetric_weight_qparams(w, 1)
    assert scale.shape == (3,) and zp.shape == (3,)
    assert scale[0] == 1.0 and scale[2] == 1.0  # an all-zero channel: scale 1, codes 0
    assert scale[1] == np.float32(1.27 / 127)
    np.testing.assert_array_equal(quantize_symmetric(w, scale, 1)[:, 1], [50, -127, 20, 0])
    s4, z4 = symmetric_weight_qparams(w, 1, bits=4)
    assert s4[1] == np.float32(1.27 / 7) and str(z4.dtype) == "int4"
    with pytest.raises(ValueError, match="bits 4, 8 or 16"):
        symmetric_weight_qparams(w, 1, bits=3)


def test_observers_ignore_non_finite_values_and_empty_data():
    x = np.array([np.nan, -np.inf, -2.0, 0.5, 3.0, np.inf], np.float32)
    for obs in (MinMaxObserver(), PercentileObserver(), EntropyObserver(), MseObserver()):
        for p in range(obs.passes):
            obs.observe(x, p)
        lo, hi = obs.range()
        assert np.isfinite([lo, hi]).all() and -2.0 <= lo <= 0 <= hi <= 3.0, (type(obs).__name__, lo, hi)
    empty = make_observer("entropy")
    for p in range(empty.passes):
        empty.observe(np.array([np.nan], np.float32), p)
    assert empty.range() == (0.0, 0.0)


def test_two_passes_without_cache_give_the_same_ranges(setup, monkeypatch):
    """The histogram pass re-runs the interpreter when the first pass's arrays do not fit in the cache."""
    _, model, samples = setup
    g, calib = lift(model), as_calibration(samples[:4])
    cached = compute_ranges(g, calib, ["a", "ya"], "percentile", percentile=99.0)
    calls = []
    monkeypatch.setattr(cal, "CACHE_BYTES", 0)
    again = compute_ranges(g, calib, ["a", "ya"], "percentile", percentile=99.0,
                           progress=lambda i, n: calls.append((i, n)))
    assert again == cached
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_bad_method_and_options():
    with pytest.raises(ValueError, match="unknown calibration method 'kl'.*minmax, percentile, entropy, mse"):
        make_observer("kl")
    with pytest.raises(ValueError, match="quantized_bins"):
        make_observer("entropy", bins=64, quantized_bins=128)
    with pytest.raises(ValueError, match="percentile must be in"):
        make_observer("percentile", percentile=101.0)


@settings(max_examples=60, deadline=None)
@given(st.floats(-5, 5), st.floats(0.01, 3), st.floats(0.005, 0.2), st.integers(-128, 127))
def test_expected_sq_error_is_the_integral_over_the_bin(start: float, width: float, scale: float, zp: int):
    """The closed form equals the mean squared quantization error over a dense grid of the bin (midpoint rule)."""
    n = 20000
    x = start + (np.arange(n) + 0.5) * (width / n)
    q = np.clip(np.rint(x / scale) + zp, -128, 127)
    dense = np.mean(((q - zp) * scale - x) ** 2)
    got = cal.expected_sq_error(np.array([start]), np.array([start + width]), np.array([1.0]),
                                np.array([[scale]]), np.array([[float(zp)]]), -128, 127)[0]
    assert got == pytest.approx(dense, rel=2e-3, abs=1e-4 * scale ** 2)
