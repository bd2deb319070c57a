"""The artifact format: round trip, and every way a file can be damaged, edited or too new."""

from __future__ import annotations

import json
import os
import zipfile

import numpy as np
import pytest

from kiln.runtime import FORMAT_VERSION, ArtifactError, load, read_artifact, write_artifact

from .conftest import edit_manifest, rewrite_member


def test_round_trip_keeps_every_member(artifacts):
    built = artifacts["static"]
    got = read_artifact(built.path)
    assert got.library == built.library
    assert list(got.weights) == ["w"]
    np.testing.assert_array_equal(got.weights["w"], built.weights["w"])
    assert got.ir_text == "graph static\n"
    m = got.manifest
    assert m["format_version"] == FORMAT_VERSION
    assert set(m["members"]) == {"lib.so", "weights.npz", "model.ir"}
    assert m["weight_specs"] == [{"name": "w", "dtype": "float32", "shape": [8]}]
    assert m["inputs"] == [{"name": "x", "dtype": "float32", "shape": [2, 8]}]
    with zipfile.ZipFile(built.path) as zf:
        assert zf.namelist()[0] == "manifest.json"


def test_weights_in_manifest_order_and_odd_names(artifacts, tmp_path):
    built = artifacts["static"]
    weights = {"z.bias": np.arange(3, dtype=np.int8), "file": np.ones((2, 2), np.float16),
               "allow_pickle": np.zeros(0, np.float32), "w": built.weights["w"]}
    path = tmp_path / "odd.kiln"
    write_artifact(path, library=built.library, weights=weights, ir_text="ir",
                   manifest={**built.manifest, "weights": list(weights)})
    got = read_artifact(path)
    assert list(got.weights) == list(weights)
    for k, v in weights.items():
        assert got.weights[k].dtype == v.dtype
        np.testing.assert_array_equal(got.weights[k], v)


def test_not_a_file_and_missing_file(tmp_path):
    with pytest.raises(ArtifactError, match="no such file"):
        read_artifact(tmp_path / "absent.kiln")
    with pytest.raises(ArtifactError, match="not a file"):
        read_artifact(tmp_path)


def test_not_a_zip(tmp_path):
    path = tmp_path / "model.kiln"
    path.write_bytes(b"\x7fELF this is a shared library, not an artifact")
    with pytest.raises(ArtifactError, match=r"model\.kiln: not a kiln artifact: expected a zip file.*ELF"):
        read_artifact(path)


def test_truncated_file(artifacts, tmp_path):
    data = artifacts["static"].path.read_bytes()
    path = tmp_path / "cut.kiln"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match=r"cut\.kiln: truncated or corrupted zip"):
        read_artifact(path)


def test_flipped_bytes_inside_the_library_are_caught(artifacts, tmp_path):
    """Bytes flipped in the stored zip data: a CRC/deflate error or a sha256 mismatch, never a crash."""
    src = artifacts["static"].path
    with zipfile.ZipFile(src) as zf:
        info = zf.getinfo("lib.so")
    data = bytearray(src.read_bytes())
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    for i in range(start + 100, start + 110):
        data[i] ^= 0xFF
    path = tmp_path / "flipped.kiln"
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"flipped\.kiln: .*(lib\.so is corrupted|lib\.so: sha256 mismatch)"):
        read_artifact(path)


def test_replaced_library_fails_the_hash(artifacts, tmp_path):
    """A consistent zip whose lib.so differs from what the manifest recorded."""
    path = tmp_path / "edited.kiln"
    rewrite_member(artifacts["static"].path, path, "lib.so", lambda b: b[:-1] + bytes([b[-1] ^ 1]))
    with pytest.raises(ArtifactError) as err:
        read_artifact(path)
    msg = str(err.value)
    assert "edited.kiln: lib.so: sha256 mismatch: manifest says " in msg
    assert ", file has " in msg


def test_manifest_hash_edited(artifacts, tmp_path):
    path = tmp_path / "hash.kiln"
    edit_manifest(artifacts["static"].path, path, lambda m: m["members"].update({"weights.npz": "0" * 64}))
    with pytest.raises(ArtifactError, match=f"weights.npz: sha256 mismatch: manifest says {'0' * 64}, file has [0-9a-f]{{64}}"):
        read_artifact(path)


def test_future_format_version(artifacts, tmp_path):
    path = tmp_path / "future.kiln"
    edit_manifest(artifacts["static"].path, path, lambda m: m.update(format_version=FORMAT_VERSION + 1))
    with pytest.raises(ArtifactError, match=f"format version {FORMAT_VERSION + 1} is newer than this runtime "
                                            f"supports \\(version {FORMAT_VERSION}"):
        read_artifact(path)


@pytest.mark.parametrize("member", ["lib.so", "weights.npz", "manifest.json"])
def test_missing_member(artifacts, tmp_path, member):
    path = tmp_path / "missing.kiln"
    rewrite_member(artifacts["static"].path, path, member, lambda b: None)
    with pytest.raises(ArtifactError, match=f"missing members \\['{member}'\\]: expected .*found"):
        read_artifact(path)


def test_manifest_not_json_or_missing_keys(artifacts, tmp_path):
    path = tmp_path / "bad.kiln"
    rewrite_member(artifacts["static"].path, path, "manifest.json", lambda b: b"{not json", resign=True)
    with pytest.raises(ArtifactError, match=r"bad\.kiln: manifest\.json is not valid JSON"):
        read_artifact(path)
    edit_manifest(artifacts["static"].path, path, lambda m: [m.pop("inputs"), m.pop("entry")])
    with pytest.raises(ArtifactError, match=r"lacks required keys \['inputs', 'entry'\]"):
        read_artifact(path)
    edit_manifest(artifacts["static"].path, path, lambda m: m["inputs"][0].update(dtype="float33"))
    with pytest.raises(ArtifactError, match=r"inputs\[0\] \('x'\) has dtype 'float33', which kiln never emits"):
        read_artifact(path)
    edit_manifest(artifacts["static"].path, path, lambda m: m["inputs"][0].update(name=[["x"]]))
    with pytest.raises(ArtifactError, match=r"inputs\[0\] name should be a non-empty string, found \[\['x'\]\]"):
        read_artifact(path)
    edit_manifest(artifacts["static"].path, path, lambda m: m.update(params=7))
    with pytest.raises(ArtifactError, match=r"params should be a list of input names, found 7"):
        read_artifact(path)
    edit_manifest(artifacts["static"].path, path, lambda m: m["kernels"].append({"name": 3, "ops": [None]}))
    with pytest.raises(ArtifactError, match=r"kernels\[\d+\] should be an object with a string name"):
        read_artifact(path)


def test_a_dtype_kiln_never_emits_is_refused_before_tvm_sees_it(artifacts, tmp_path):
    """complex64 in a (re-signed) manifest made TVM's dtype check abort the process (found by
    ``kiln fuzz --level inputs``); the manifest's dtypes must be kiln's."""
    path = tmp_path / "complex.kiln"
    edit_manifest(artifacts["static"].path, path, lambda m: m["inputs"][0].update(dtype="complex64"))
    with pytest.raises(ArtifactError, match=r"dtype 'complex64', which kiln never emits"):
        load(path)


def test_manifest_dtypes_are_exactly_the_irs():
    from kiln.ir.types import DTYPES, to_numpy_dtype
    from kiln.runtime.artifact import KILN_DTYPES

    assert KILN_DTYPES == {str(to_numpy_dtype(d)) for d in DTYPES}


def test_weights_disagreeing_with_manifest(artifacts, tmp_path):
    built = artifacts["static"]
    path = tmp_path / "w.kiln"
    edit_manifest(built.path, path, lambda m: m.update(weights=["w", "b"]))
    with pytest.raises(ArtifactError, match=r"expected weights \['w', 'b'\], found \['w'\] \(missing \['b'\]"):
        read_artifact(path)
    edit_manifest(built.path, path, lambda m: m.update(weight_specs=[{"name": "w", "dtype": "float16", "shape": [4]}]))
    with pytest.raises(ArtifactError, match=r"weight 'w': manifest says float16 \[4\], weights.npz has float32 \[8\]"):
        read_artifact(path)


def test_write_rejects_invalid_manifest(artifacts, tmp_path):
    built = artifacts["static"]
    manifest = {k: v for k, v in built.manifest.items() if k != "outputs"}
    with pytest.raises(ArtifactError, match=r"refusing to write.*lacks required keys \['outputs'\]"):
        write_artifact(tmp_path / "x.kiln", library=built.library, weights=built.weights, ir_text="",
                       manifest=manifest)
    assert os.listdir(tmp_path) == []


def test_failed_write_leaves_old_file_and_no_temp(artifacts, tmp_path):
    built = artifacts["static"]
    path = tmp_path / "model.kiln"
    path.write_bytes(built.path.read_bytes())
    before = path.read_bytes()
    bad = {"w": np.array([object()], dtype=object)}
    with pytest.raises(ValueError):
        write_artifact(path, library=built.library, weights=bad, ir_text="", manifest=built.manifest)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["model.kiln"]
    read_artifact(path)


def test_write_replaces_and_file_is_loadable(artifacts, tmp_path):
    built = artifacts["static"]
    path = tmp_path / "model.kiln"
    path.write_bytes(b"old junk")
    built.variant(path)
    assert read_artifact(path).manifest["weights"] == ["w"]
    assert load(path).run({"x": np.ones((2, 8), np.float32)})["relu"].shape == (2, 8)
    assert json.loads(zipfile.ZipFile(path).read("manifest.json"))["entry"] == "main"
