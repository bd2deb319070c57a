"""Session: running artifacts, input validation messages, CPU checks, threads, benchmark."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from kiln.runtime import ArtifactError, InputError, Session, load, write_artifact
from kiln.runtime.cpu import host_cpu_flags

from .conftest import W, edit_manifest


@pytest.fixture(scope="module")
def static(artifacts) -> Session:
    return load(artifacts["static"].path)


@pytest.fixture(scope="module")
def symbolic(artifacts) -> Session:
    return load(artifacts["symbolic"].path)


@pytest.fixture(scope="module")
def pair(artifacts) -> Session:
    return load(artifacts["pair"].path)


def _x(n: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 8)).astype(np.float32)


def test_run_matches_numpy(static):
    x = _x()
    out = static.run({"x": x})
    assert list(out) == ["sum", "relu"]
    np.testing.assert_array_equal(out["sum"], x + W)
    np.testing.assert_array_equal(out["relu"], np.maximum(x, 0))
    assert [s.name for s in static.inputs] == ["x"]
    assert static.inputs[0]["shape"] == [2, 8] and static.inputs[0].dtype == "float32"
    assert [s["name"] for s in static.outputs] == ["sum", "relu"]
    assert static.manifest["entry"] == "main"


def test_symbolic_run_and_pair(symbolic, pair):
    x = _x(2)
    np.testing.assert_array_equal(symbolic.run({"x": x})["sum"], x + W)
    a, b = np.ones((3, 4), np.float32) * 2, np.arange(12, dtype=np.float32).reshape(3, 4)
    np.testing.assert_array_equal(pair.run({"x": a, "y": b})["prod"], a * b)


def test_non_contiguous_input_is_accepted(static):
    big = _x(4)
    x = big[::2]
    assert not x.flags.c_contiguous
    np.testing.assert_array_equal(static.run({"x": x})["sum"], x + W)
    xt = np.asfortranarray(_x())
    np.testing.assert_array_equal(static.run({"x": xt})["relu"], np.maximum(xt, 0))


def test_missing_and_unexpected_inputs(static, pair):
    with pytest.raises(InputError, match=r"missing inputs \['x'\]: the model takes \['x'\], got \[\]"):
        static.run({})
    with pytest.raises(InputError, match=r"missing inputs \['y'\] and unexpected inputs \['z', 'w'\]: "
                                         r"the model takes \['x', 'y'\], got \['x', 'z', 'w'\]"):
        pair.run({"x": np.ones((3, 4), np.float32), "z": 1, "w": 2})
    with pytest.raises(InputError, match=r"unexpected inputs \['extra'\]"):
        static.run({"x": _x(), "extra": _x()})


def test_wrong_dtype_is_not_cast(static):
    with pytest.raises(InputError, match=r"input 'x': expected dtype float32, got float64"):
        static.run({"x": _x().astype(np.float64)})
    with pytest.raises(InputError, match=r"input 'x': expected dtype float32, got float64"):
        static.run({"x": [[0.0] * 8] * 2})
    assert issubclass(InputError, ValueError)


def test_wrong_rank_and_static_dim(static):
    with pytest.raises(InputError, match=r"input 'x': expected rank 2 \(shape \[2, 8\]\), got rank 1 \(shape \[16\]\)"):
        static.run({"x": np.zeros(16, np.float32)})
    with pytest.raises(InputError, match=r"input 'x': dim 1 should be 8, got 7 \(expected shape \[2, 8\], got \[2, 7\]\)"):
        static.run({"x": np.zeros((2, 7), np.float32)})


def test_symbol_must_match_compiled_value(symbolic):
    with pytest.raises(InputError, match=r"input 'x' dim 0 is symbol N: got 3 but the artifact was compiled "
                                         r"for N=2 \(recompile with that shape\)"):
        symbolic.run({"x": _x(3)})


def test_symbol_must_agree_across_inputs(pair):
    with pytest.raises(InputError, match=r"input 'y' dim 0 is symbol N: got 5 \(so N=5\) but input 'x' dim 0 "
                                         r"gave N=4: N must take one value across all inputs"):
        pair.run({"x": np.ones((4, 4), np.float32), "y": np.ones((5, 4), np.float32)})
    with pytest.raises(InputError, match=r"input 'x' dim 0 is symbol N: got 4 but the artifact was compiled for N=3"):
        pair.run({"x": np.ones((4, 4), np.float32), "y": np.ones((4, 4), np.float32)})


def test_product_dim_message(artifacts, tmp_path):
    """A dim like 2*N is checked against its compiled value (here N=1 -> 2)."""
    path = artifacts["static"].variant(tmp_path / "prod.kiln", symbols={"N": 1},
                                       inputs=[{"name": "x", "dtype": "float32", "shape": ["2*N", 8]}])
    sess = load(path)
    np.testing.assert_array_equal(sess.run({"x": _x()})["sum"], _x() + W)
    with pytest.raises(InputError, match=r"input 'x' dim 0 is 2\*N: got 4 \(N=2\), expected 2 but the artifact "
                                         r"was compiled for N=1"):
        sess.run({"x": _x(4)})


@pytest.mark.skipif(not host_cpu_flags(), reason="needs the CPU feature flags of /proc/cpuinfo, which this machine does not show")
def test_missing_cpu_feature_in_manifest(artifacts, tmp_path):
    path = artifacts["static"].variant(tmp_path / "fake.kiln", cpu_features=["avx2", "avx512_fake"])
    with pytest.raises(ArtifactError, match=r"fake\.kiln: artifact was compiled for mcpu=\S+ which needs CPU "
                                            r"features avx512_fake; this CPU lacks them .*SIGILL.*: recompile with "
                                            r"--target"):
        load(path)
    assert load(path, check_cpu=False).run({"x": _x()})["relu"].shape == (2, 8)


@pytest.mark.skipif("avx512f" in host_cpu_flags() or not host_cpu_flags(), reason="needs a CPU without AVX-512")
def test_mcpu_needing_avx512_is_refused(artifacts, tmp_path):
    path = tmp_path / "spr.kiln"
    edit_manifest(artifacts["static"].path, path,
                  lambda m: m.update(target={**m["target"], "mcpu": "sapphirerapids"}, cpu_features=[]))
    with pytest.raises(ArtifactError, match=r"compiled for mcpu=sapphirerapids which needs .*avx512f.*"
                                            r"this CPU lacks them"):
        load(path)


def test_wrong_architecture_and_kind(artifacts, tmp_path):
    built = artifacts["static"]
    path = built.variant(tmp_path / "arm.kiln", target={"kind": "llvm", "mtriple": "sparc64-linux-gnu"})
    with pytest.raises(ArtifactError, match=r"compiled for sparc64 \(mtriple=sparc64-linux-gnu\), this machine is"):
        load(path)
    path = built.variant(tmp_path / "cuda.kiln", target={"kind": "cuda"})
    with pytest.raises(ArtifactError, match=r"target kind 'cuda'; this runtime runs CPU \(llvm\) code only"):
        load(path)


def test_manifest_disagreeing_with_library(artifacts, tmp_path):
    built = artifacts["static"]
    path = built.variant(tmp_path / "entry.kiln", entry="forward")
    with pytest.raises(ArtifactError, match=r"lib\.so has no usable function 'forward'"):
        load(path)
    path = tmp_path / "arity.kiln"
    write_artifact(path, library=built.library, weights={}, ir_text="", manifest={**built.manifest, "weights": []})
    with pytest.raises(ArtifactError, match=r"main takes 2 parameters, the manifest lists 1 inputs \+ 0 weights = 1"):
        load(path)


def test_threads_share_a_session(symbolic):
    xs = [_x(2, seed) for seed in range(24)]
    expected = [(x + W, np.maximum(x, 0)) for x in xs]
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            for i in range(k, len(xs), 4):
                for _ in range(3):
                    out = symbolic.run({"x": xs[i]})
                    np.testing.assert_array_equal(out["sum"], expected[i][0])
                    np.testing.assert_array_equal(out["relu"], expected[i][1])
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_benchmark(static):
    times = static.benchmark({"x": _x()}, repeat=5, warmup=1)
    assert len(times) == 5 and all(t > 0 for t in times)
    with pytest.raises(InputError):
        static.benchmark({"x": _x(3)}, repeat=1)


def test_weights_come_from_the_artifact(artifacts, tmp_path):
    built = artifacts["static"]
    w2 = {"w": np.full(8, 10.0, np.float32)}
    path = tmp_path / "w2.kiln"
    write_artifact(path, library=built.library, weights=w2, ir_text="", manifest=built.manifest)
    x = _x()
    np.testing.assert_array_equal(load(path).run({"x": x})["sum"], x + 10)


def test_unaligned_input_is_copied_into_an_aligned_buffer(static):
    """TVM takes DLPack data only at 64-byte alignment; others go through an aligned copy."""
    buf = np.zeros(2 * 8 + 16, np.float32)
    for offset in range(1, 16):
        x = buf[offset:offset + 16].reshape(2, 8)
        x[...] = _x(seed=offset)
        np.testing.assert_array_equal(static.run({"x": x})["sum"], x + W)


def test_small_inputs_are_staged_and_outputs_never_alias_the_stage(pair, tmp_path):
    """Small inputs are copied into this thread's staging buffers: an output kept from one run is not
    changed by the next, the caller's array is never written, and an output that is an input (an
    artifact that does not say it aliases) is handed back as a copy, not the reused buffer."""
    from .conftest import _build, _sig

    y = np.full((3, 4), 2, np.float32)
    x1, x2 = np.arange(12, dtype=np.float32).reshape(3, 4), np.full((3, 4), -1, np.float32)
    first = pair.run({"x": x1, "y": y})["prod"]
    second = pair.run({"x": x2, "y": y})["prod"]
    np.testing.assert_array_equal(first, x1 * 2)
    np.testing.assert_array_equal(second, x2 * 2)
    assert x1[0, 1] == 1 and not np.may_share_memory(first, second)

    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 3), "float32"))
    with bb.function("main", [x]):
        bb.emit_func_output(x)
    built = _build(tmp_path, "identity", bb.get(), [_sig("x", [2, 3])], [_sig("x_out", [2, 3])], {}, {})
    ident = load(built.path, allow_unsigned=True)
    a, b = np.ones((2, 3), np.float32), np.zeros((2, 3), np.float32)
    out_a = ident.run({"x": a})["x_out"]
    out_b = ident.run({"x": b})["x_out"]
    assert (out_a == 1).all() and (out_b == 0).all()


# ---------------------------------------------------------------- inputs specialized at compile time

@pytest.fixture(scope="module")
def specialized(artifacts, tmp_path_factory) -> Session:
    """The static artifact, recorded as compiled with input ``axes`` bound to [0, 2]."""
    spec = [{"name": "axes", "dtype": "int64", "shape": [2], "value": [0, 2]}]
    path = artifacts["static"].variant(tmp_path_factory.mktemp("spec") / "spec.kiln", specialized=spec)
    return load(path)


def test_specialized_input_is_optional_and_checked(specialized):
    x = np.arange(16, dtype=np.float32).reshape(2, 8)
    want = specialized.run({"x": x})
    assert np.array_equal(specialized.run({"x": x, "axes": np.array([0, 2])})["sum"], want["sum"])
    assert specialized.specialized["axes"].tolist() == [0, 2]
    with pytest.raises(InputError, match=r"input 'axes' was specialized to \[0, 2\] at compile time; got \[1\]; "
                                         r"recompile with that value"):
        specialized.run({"x": x, "axes": np.array([1])})
    with pytest.raises(InputError, match=r"input 'axes' was specialized to \[0, 2\] at compile time; "
                                         r"got \[0, 1\]"):
        specialized.run({"x": x, "axes": np.array([0, 1])})
    with pytest.raises(InputError, match="input 'axes': expected dtype int64, got int32"):
        specialized.run({"x": x, "axes": np.array([0, 2], dtype=np.int32)})


def test_malformed_specialized_entry_is_an_artifact_error(artifacts, tmp_path):
    bad = [{"name": "axes", "dtype": "int64", "shape": [3], "value": [0, 2]}]
    with pytest.raises(ArtifactError, match=r"specialized\[0\] \('axes'\): value has shape \[2\], the entry "
                                            r"says \[3\]"):
        artifacts["static"].variant(tmp_path / "bad.kiln", specialized=bad)
