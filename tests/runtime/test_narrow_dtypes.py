"""ml_dtypes' types (bfloat16, float8) through the artifact and the Session: numpy can neither write them
to .npy nor DLPack-export them, so weights are stored as bits and tensors cross over as bits."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest

from kiln.runtime import Session, load, read_artifact, write_artifact
from kiln.runtime.artifact import bits_dtype

from .conftest import _compile, _manifest

BF16 = np.dtype(ml_dtypes.bfloat16)
F8 = np.dtype(ml_dtypes.float8_e4m3fn)
WB = np.array([0.5, -1.25, 3.0, 1e-3, -7.5, 0.0, 2.0**-20, 100.0], np.float32).astype(BF16)


def _module() -> Any:
    """main(x: [2, 8] bf16, f: [3] f8e4m3fn, w: [8] bf16) -> (x + w, x as f32, f copied)."""
    from tvm import relax, te, topi

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 8), "bfloat16"))
    f = relax.Var("f", relax.TensorType((3,), "float8_e4m3fn"))
    w = relax.Var("w", relax.TensorType((8,), "bfloat16"))
    with bb.function("main", [x, f, w]):
        with bb.dataflow():
            s = bb.emit_te(lambda a, b: te.compute(a.shape, lambda i, j: (a[i, j].astype("float32")
                                                                          + b[j].astype("float32"))
                                                   .astype("bfloat16")), x, w)
            c = bb.emit_te(topi.cast, x, "float32")
            g = bb.emit_te(lambda t: te.compute(t.shape, lambda i: t[i]), f)
            out = bb.emit_output(relax.Tuple([s, c, g]))
        bb.emit_func_output(out)
    return bb.get()


def _sig(name: str, dtype: str, shape: list) -> dict[str, Any]:
    return {"name": name, "dtype": dtype, "shape": shape}


@pytest.fixture(scope="module")
def narrow(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("narrow")
    library, target = _compile(_module(), tmp)
    manifest = _manifest(target, [_sig("x", "bfloat16", [2, 8]), _sig("f", "float8_e4m3fn", [3])],
                         [_sig("sum", "bfloat16", [2, 8]), _sig("wide", "float32", [2, 8]),
                          _sig("copy", "float8_e4m3fn", [3])], {}, ["w"])
    path = tmp / "narrow.kiln"
    write_artifact(path, library=library, weights={"w": WB}, ir_text="narrow\n", manifest=manifest)
    return path


def test_bits_dtype_only_for_ml_dtypes():
    assert bits_dtype(BF16) == np.uint16 and bits_dtype(F8) == np.uint8
    assert bits_dtype(np.dtype(ml_dtypes.float8_e5m2)) == np.uint8
    for dt in (np.float32, np.float16, np.int8, np.bool_, np.uint16):
        assert bits_dtype(np.dtype(dt)) is None


def test_bf16_weight_is_stored_as_bits_and_read_back(narrow):
    with zipfile.ZipFile(narrow) as zf, zipfile.ZipFile(io.BytesIO(zf.read("weights.npz"))) as npz:
        raw = np.lib.format.read_array(io.BytesIO(npz.read("w.npy")), allow_pickle=False)
    assert raw.dtype == np.uint16
    np.testing.assert_array_equal(raw, WB.view(np.uint16))
    w = read_artifact(narrow).weights["w"]
    assert w.dtype == BF16
    np.testing.assert_array_equal(w.view(np.uint16), WB.view(np.uint16))


def test_float8_e5m2_weight_round_trips(tmp_path, narrow):
    """float8_e5m2 has descriptor '<f1', which .npy writes but cannot read back."""
    contents = read_artifact(narrow)
    w = np.array([1.5, -0.25, 57344.0, np.nan], np.float32).astype(ml_dtypes.float8_e5m2)
    path = tmp_path / "e5m2.kiln"
    write_artifact(path, library=contents.library, weights={"w": w}, ir_text="x",
                   manifest={k: v for k, v in contents.manifest.items() if k not in ("members", "weight_specs",
                                                                                   "weights")})
    got = read_artifact(path).weights["w"]
    assert got.dtype == w.dtype
    np.testing.assert_array_equal(got.view(np.uint8), w.view(np.uint8))


def test_session_runs_bf16_and_float8_tensors(narrow):
    sess: Session = load(narrow)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8)).astype(np.float32).astype(BF16)
    f = np.array([0.5, -448.0, 3.25], np.float32).astype(F8)
    out = sess.run({"x": x, "f": f})
    assert out["sum"].dtype == BF16 and out["copy"].dtype == F8 and out["wide"].dtype == np.float32
    want = (x.astype(np.float32) + WB.astype(np.float32)).astype(BF16)
    np.testing.assert_array_equal(out["sum"].view(np.uint16), want.view(np.uint16))
    np.testing.assert_array_equal(out["wide"], x.astype(np.float32))
    np.testing.assert_array_equal(out["copy"].view(np.uint8), f.view(np.uint8))
    unaligned = np.empty(2 * 8 * 2 + 2, np.uint8)[2:].view(BF16).reshape(2, 8)
    unaligned[...] = x
    again = sess.run({"x": unaligned, "f": f})
    np.testing.assert_array_equal(again["sum"].view(np.uint16), want.view(np.uint16))
