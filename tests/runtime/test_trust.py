"""Artifact trust (issue 15 items 1, 3, 6, 12, 14): signatures, digests, CPU features, output checks, clean errors.

A ``.kiln`` holds native code: the runtime loads only artifacts signed by a trusted
key (or with ``allow_unsigned``), refuses before inflating anything but the
manifest and signature, and catches a changed byte anywhere.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

import kiln
from kiln.runtime import ArtifactError, InputError, TrustError, load, read_artifact, write_artifact
from kiln.runtime import artifact as artifact_module
from kiln.runtime.cpu import host_cpu_flags
from kiln.runtime.signing import (
    generate_keypair,
    key_id,
    load_private_key,
    local_private_key,
    signature_record,
)

from .conftest import edit_manifest, rewrite_member

REPO = Path(__file__).resolve().parents[2]


def _x() -> np.ndarray:
    return np.arange(16, dtype=np.float32).reshape(2, 8) - 8


def _sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {n: zf.read(n) for n in zf.namelist()}


def _write_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


# ------------------------------------------------------------------ keys


def test_local_key_is_created_once_race_free_and_private(tmp_path):
    """Eight processes asking for the local key at once all get the same one; it is 0600, its .pub beside it."""
    home = tmp_path / "home"
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from kiln.runtime.signing import local_private_key, key_id; "
            "print(key_id(local_private_key()))")
    env = {**os.environ, "KILN_HOME": str(home)}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(REPO)], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(8)]
    ids = {p.communicate(timeout=120)[0].strip() for p in procs}
    assert len(ids) == 1 and len(ids.pop()) == 16
    assert stat.S_IMODE((home / "signing.key").stat().st_mode) == 0o600
    assert (home / "signing.pub").read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    assert sorted(p.name for p in home.iterdir()) == ["signing.key", "signing.pub"]


def test_keygen_writes_a_pair_and_never_overwrites(tmp_path):
    key, pub, kid = generate_keypair(tmp_path / "team")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert key_id(load_private_key(key)) == kid
    before = key.read_bytes()
    with pytest.raises(kiln.Error, match="refusing to overwrite"):
        generate_keypair(tmp_path / "team")
    assert key.read_bytes() == before
    from kiln.cli import main

    assert main(["keygen", "-o", str(tmp_path / "team")]) == 1
    assert main(["keygen", "-o", str(tmp_path / "ci")]) == 0
    assert (tmp_path / "ci.key").exists() and (tmp_path / "ci.pub").exists()


# ------------------------------------------------------------------ the trust decision


def test_local_key_signs_by_default_and_is_trusted(artifacts):
    art = read_artifact(artifacts["static"].path)
    assert art.trust.signed and art.trust.trusted and art.trust.key_id == key_id(local_private_key())
    record = json.loads(_members(artifacts["static"].path)["signature.json"])
    assert set(record) == {"digest", "algorithm", "key_id", "public_key", "signature"}
    assert record["algorithm"] == "ed25519"


def test_unsigned_artifact_is_refused_before_any_other_member_is_inflated(artifacts, tmp_path, monkeypatch):
    built = artifacts["static"]
    path = tmp_path / "unsigned.kiln"
    write_artifact(path, library=built.library, weights=built.weights, ir_text="ir", manifest=built.manifest,
                   sign=False)
    assert set(json.loads(_members(path)["signature.json"])) == {"digest"}
    inflated = []
    real = artifact_module._inflate
    monkeypatch.setattr(artifact_module, "_inflate", lambda p, zf, info: inflated.append(info.filename) or
                        real(p, zf, info))
    with pytest.raises(TrustError, match=r"unsigned\.kiln: the artifact is not signed.*native code.*"
                                         r"--allow-unsigned"):
        load(path)
    assert inflated == ["manifest.json", "signature.json"]
    sess = load(path, allow_unsigned=True)
    assert not sess.trust.signed
    np.testing.assert_array_equal(sess.run({"x": _x()})["relu"], np.maximum(_x(), 0))


def test_untrusted_signer_needs_trust_or_allow_unsigned(artifacts, tmp_path, monkeypatch):
    built = artifacts["static"]
    key, pub, kid = generate_keypair(tmp_path / "vendor")
    path = tmp_path / "vendor.kiln"
    write_artifact(path, library=built.library, weights=built.weights, ir_text="ir", manifest=built.manifest,
                   sign=key)
    with pytest.raises(TrustError, match=f"signed by key {kid}, which is not trusted here.*--trust KEY.pub.*"
                                         "KILN_TRUSTED_KEYS.*--allow-unsigned"):
        load(path)
    assert load(path, trusted_keys=[pub]).trust.trusted_by == str(pub)
    assert load(path, trusted_keys=[pub.read_bytes()]).trust.trusted
    untrusted = load(path, allow_unsigned=True).trust
    assert untrusted.signed and not untrusted.trusted and untrusted.key_id == kid
    monkeypatch.setenv("KILN_TRUSTED_KEYS", os.pathsep.join([str(tmp_path / "absent.pub"), str(pub)]))
    with pytest.raises(kiln.Error, match=r"KILN_TRUSTED_KEYS: .*absent\.pub: cannot read key file"):
        load(path)
    monkeypatch.setenv("KILN_TRUSTED_KEYS", os.pathsep.join(["", str(pub)]))
    assert load(path).trust.trusted_by == f"KILN_TRUSTED_KEYS: {pub}"


def test_forged_signature_is_refused_even_with_allow_unsigned(artifacts, tmp_path):
    path = tmp_path / "forged.kiln"

    def flip(data: bytes) -> bytes:
        record = json.loads(data)
        sig = bytearray.fromhex(record["signature"])
        sig[0] ^= 1
        return json.dumps({**record, "signature": sig.hex()}).encode()

    rewrite_member(artifacts["static"].path, path, "signature.json", flip)
    for allow in (False, True):
        with pytest.raises(TrustError, match=r"signature does not verify .*modified after it was signed"):
            read_artifact(path, allow_unsigned=allow)


def test_format_1_needs_allow_unsigned(artifacts, tmp_path):
    """A version-1 file (no signature.json, manifest hashed by nothing) loads only with allow_unsigned."""
    members = _members(artifacts["static"].path)
    manifest = json.loads(members.pop("manifest.json"))
    members.pop("signature.json")
    manifest["format_version"] = 1
    path = _write_zip(tmp_path / "v1.kiln", {"manifest.json": json.dumps(manifest).encode(), **members})
    with pytest.raises(TrustError, match=r"format version 1 .* reads version 2, and version 1 only with "
                                         r"--allow-unsigned.*recompile"):
        load(path)
    np.testing.assert_array_equal(load(path, allow_unsigned=True).run({"x": _x()})["relu"], np.maximum(_x(), 0))
    # a version-2 file whose signature.json was stripped is damaged, not legacy
    manifest["format_version"] = 2
    path = _write_zip(tmp_path / "stripped.kiln", {"manifest.json": json.dumps(manifest).encode(), **members})
    with pytest.raises(ArtifactError, match=r"missing members \['signature.json'\]"):
        load(path, allow_unsigned=True)


# ------------------------------------------------------------------ item 1: native code from an untrusted file

EVIL_C = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void payload(void) {
    const char *p = getenv("KILN_TEST_MARKER");
    if (p) { FILE *f = fopen(p, "w"); if (f) { fputs("ran", f); fclose(f); } }
}
int __tvm_ffi_main(void) { return 0; }
"""


@pytest.fixture(scope="module")
def evil_library(tmp_path_factory) -> bytes:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("needs a C compiler (cc) to build the payload library")
    d = tmp_path_factory.mktemp("evil")
    (d / "evil.c").write_text(EVIL_C)
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(d / "evil.so"), str(d / "evil.c")], check=True)
    return (d / "evil.so").read_bytes()


def _tampered(src: Path, dst: Path, library: bytes, resign: object) -> Path:
    """``src`` with lib.so replaced and its sha256 recomputed in the manifest, as an attacker would."""
    members = _members(src)
    manifest = json.loads(members["manifest.json"])
    manifest["members"]["lib.so"] = _sha(library)
    members["lib.so"] = library
    members["manifest.json"] = json.dumps(manifest).encode()
    if resign is not None:
        key = resign if resign != "unsigned" else None
        members["signature.json"] = json.dumps(signature_record(members["manifest.json"], key)).encode()
    return _write_zip(dst, members)


def test_rehashed_library_with_a_constructor_never_runs(artifacts, evil_library, tmp_path):
    """The issue's case: lib.so swapped for one with an ELF constructor, hashes recomputed. It must not run
    under kiln.load or kiln run, whatever else the attacker redoes (digest, own signature)."""
    attacker, _, _ = generate_keypair(tmp_path / "attacker")
    marker = tmp_path / "marker"
    cases = {"hash only": None, "digest redone": "unsigned", "signed by attacker": load_private_key(attacker)}
    env = {**os.environ, "KILN_TEST_MARKER": str(marker)}
    for label, resign in cases.items():
        path = _tampered(artifacts["static"].path, tmp_path / "evil.kiln", evil_library, resign)
        code = f"import kiln\ntry:\n    kiln.load({str(path)!r})\nexcept kiln.Error as e:\n    print(type(e).__name__)"
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                              cwd=REPO)
        assert proc.stdout.strip() in ("ArtifactError", "TrustError"), (label, proc.stdout, proc.stderr[-2000:])
        cli = subprocess.run([sys.executable, "-m", "kiln", "run", str(path)], env=env, capture_output=True,
                             text=True, timeout=120, cwd=REPO)
        assert cli.returncode == 1 and "Traceback" not in cli.stderr, (label, cli.stderr[-2000:])
        assert not marker.exists(), f"payload ran ({label})"
    # the control: the payload is real, and runs when the user explicitly waives trust
    code = f"import kiln\ntry:\n    kiln.load({str(path)!r}, allow_unsigned=True)\nexcept kiln.Error:\n    pass"
    subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=120, cwd=REPO)
    assert marker.read_text() == "ran"


# ------------------------------------------------------------------ item 6: the manifest is covered


def test_flipped_byte_in_any_member_is_caught(artifacts, tmp_path):
    """Every member's stored bytes, manifest included, flipped at several places: always a kiln error."""
    src = artifacts["static"].path
    data = src.read_bytes()
    with zipfile.ZipFile(src) as zf:
        infos = zf.infolist()
    path = tmp_path / "flip.kiln"
    tried = 0
    for info in infos:
        start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
        for frac in (0.0, 0.3, 0.6, 0.99):
            i = start + int(frac * (info.compress_size - 1))
            flipped = bytearray(data)
            flipped[i] ^= 0x01
            path.write_bytes(bytes(flipped))
            with pytest.raises(kiln.Error):
                read_artifact(path, allow_unsigned=True)
            tried += 1
    assert tried == 4 * len(infos) == 20


def test_swapped_same_shape_entries_in_the_manifest_are_caught(artifacts, tmp_path):
    """The issue's case: two same-shape entries swapped in manifest.json (there: weights; here: outputs)."""
    path = tmp_path / "swapped.kiln"
    edit_manifest(artifacts["static"].path, path,
                  lambda m: m.update(outputs=[m["outputs"][1], m["outputs"][0]]), resign=None)
    with pytest.raises(ArtifactError, match=r"manifest.json: sha256 [0-9a-f]{64} does not match the digest in "
                                            r"signature.json .*modified or damaged"):
        load(path, allow_unsigned=True)


def test_output_shape_and_dtype_are_checked_against_the_manifest(artifacts, tmp_path):
    """A signed manifest that disagrees with its library: the run names the output, expected and got."""
    path = tmp_path / "shape.kiln"
    edit_manifest(artifacts["static"].path, path, lambda m: m["outputs"][1].update(shape=[2, 4]))
    with pytest.raises(ArtifactError, match=r"output 'relu': the manifest says float32\[2, 4\], the library "
                                            r"returned float32\[2, 8\]"):
        load(path).run({"x": _x()})
    edit_manifest(artifacts["static"].path, path, lambda m: m["outputs"][0].update(dtype="int32"))
    with pytest.raises(ArtifactError, match=r"output 'sum': the manifest says int32\[2, 8\], the library "
                                            r"returned float32\[2, 8\]"):
        load(path).run({"x": _x()})


# ------------------------------------------------------------------ item 3: CPU features incl. mattr


def _lacking(*candidates: str) -> str:
    """A CPU flag (cpuinfo spelling) this machine lacks, from ``candidates``."""
    have = host_cpu_flags()
    for flag in candidates:
        if flag not in have:
            return flag
    pytest.skip(f"needs a CPU that lacks one of {candidates}; this one has them all")


MATTR = {"sse4a": "sse4a", "fma4": "fma4", "xop": "xop", "avx512er": "avx512er", "amx_tile": "amx-tile",
         "avx512f": "avx512f"}


@pytest.mark.skipif(not host_cpu_flags(), reason="needs the CPU feature flags of /proc/cpuinfo, which this machine does not show")
def test_mattr_feature_this_cpu_lacks_is_refused_before_dlopen(artifacts, tmp_path, monkeypatch):
    flag = _lacking(*MATTR)
    path = tmp_path / "mattr.kiln"
    edit_manifest(artifacts["static"].path, path,
                  lambda m: m.update(target={**m["target"], "mattr": [f"+{MATTR[flag]}"]}, cpu_features=[]))
    loaded = []
    monkeypatch.setattr("kiln.runtime.session._load_library", lambda *a: loaded.append(a))
    with pytest.raises(ArtifactError, match=rf"mattr=\+{MATTR[flag]} which needs CPU features .*{flag}.*this CPU "
                                            r"lacks them .*SIGILL"):
        load(path)
    assert loaded == []
    # editing the target in the file (without the signer's key) is caught by the digest
    edit_manifest(artifacts["static"].path, path, lambda m: m["target"].update(mcpu="x86-64"), resign=None)
    with pytest.raises(ArtifactError, match="does not match the digest"):
        load(path, allow_unsigned=True)


def _tiny_onnx(path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 16])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Add", ["r", "x"], ["y"])],
                              "tiny", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    return path


def test_compile_records_mattr_and_what_it_implies(tmp_path, monkeypatch):
    """The issue's SIGILL case: -mattr=+avx512f reaches the manifest (target.mattr, cpu_features with what
    it implies), and a CPU without AVX-512 (simulated) refuses the artifact before dlopen."""
    model = _tiny_onnx(tmp_path / "tiny.onnx")
    art = kiln.compile(str(model), target="llvm -mcpu=x86-64 -mattr=+avx512f")
    assert art.manifest["target"]["mattr"] == ["+avx512f"]
    assert {"avx512f", "avx2", "fma", "avx"} <= set(art.manifest["cpu_features"])
    path = art.save(tmp_path / "avx512.kiln")
    monkeypatch.setattr("kiln.runtime.cpu.host_cpu_flags", lambda: frozenset({"avx", "avx2", "fma", "sse4_2"}))
    with pytest.raises(ArtifactError, match=r"mcpu=x86-64 mattr=\+avx512f which needs CPU features avx512f"):
        load(path)


@pytest.mark.slow
def test_cli_sign_trust_and_allow_unsigned(tmp_path):
    """kiln compile --sign KEY; kiln run needs --trust KEY.pub (or --allow-unsigned); one-line errors, exit 1."""
    from kiln.cli import main

    model = _tiny_onnx(tmp_path / "tiny.onnx")
    key, pub, kid = generate_keypair(tmp_path / "release")
    out = tmp_path / "tiny.kiln"
    assert main(["compile", str(model), "-o", str(out), "--sign", str(key)]) == 0
    assert read_artifact(out, trusted_keys=[pub]).trust.key_id == kid
    assert main(["run", str(out)]) == 1
    assert main(["inspect", str(out)]) == 1
    assert main(["run", str(out), "--trust", str(pub)]) == 0
    assert main(["inspect", str(out), "--allow-unsigned"]) == 0
    assert main(["compile", str(model), "-o", str(tmp_path / "x.kiln"), "--sign", str(pub)]) == 1
    assert not (tmp_path / "x.kiln").exists()


# ------------------------------------------------------------------ item 12: nothing but kiln errors


def test_garbage_library_deep_json_and_bad_npy_are_kiln_errors(artifacts, tmp_path):
    src = artifacts["static"].path
    path = tmp_path / "bad.kiln"

    def rehash(member: str, data: bytes):
        def edit(m: dict) -> None:
            m["members"][member] = _sha(data)
        members = _members(src)
        members[member] = data
        manifest = json.loads(members["manifest.json"])
        edit(manifest)
        members["manifest.json"] = json.dumps(manifest).encode()
        members["signature.json"] = json.dumps(signature_record(members["manifest.json"],
                                                                local_private_key())).encode()
        return _write_zip(path, members)

    rehash("lib.so", b"\x7fELF" + bytes(200))
    with pytest.raises(ArtifactError, match=r"lib.so could not be loaded"):
        load(path)
    rehash("weights.npz", b"PK\x05\x06" + bytes(18))
    with pytest.raises(ArtifactError, match=r"weights.npz does not match the manifest"):
        load(path)
    npy = b"\x93NUMPY\x01\x00" + b"{'descr': '<f4', 'fortran_order': False, 'shape': (-2, -4), }".ljust(118) + b"\n"
    import io

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("w.npy", npy + bytes(32))
    rehash("weights.npz", buf.getvalue())
    with pytest.raises(ArtifactError, match=r"weights.npz is not a readable npz"):
        load(path)
    rewrite_member(src, path, "manifest.json", lambda b: b"[" * 100_000 + b"]" * 100_000, resign=True)
    with pytest.raises(ArtifactError, match=r"manifest.json is not valid JSON \(RecursionError"):
        load(path)
    rewrite_member(src, path, "manifest.json", lambda b: b"\xff\xfe" + b, resign=True)
    with pytest.raises(ArtifactError, match=r"manifest.json is not valid JSON \(UnicodeDecodeError"):
        load(path)


def test_run_inputs_that_numpy_cannot_read_are_input_errors(artifacts):
    class Bad:
        def __array__(self, *a, **k):
            raise RuntimeError("no array here")

    sess = load(artifacts["static"].path)
    with pytest.raises(InputError, match=r"could not be read as arrays \(RuntimeError: no array here"):
        sess.run({"x": Bad()})


# ------------------------------------------------------------------ item 14: byte order


def test_big_endian_input_is_converted_exactly(artifacts):
    """numpy, unlike ONNX Runtime (which reads the bytes as if native: wrong numbers), knows the values."""
    sess = load(artifacts["static"].path)
    native = sess.run({"x": _x()})
    swapped = sess.run({"x": _x().astype(">f4")})
    for name in native:
        np.testing.assert_array_equal(swapped[name], native[name])
    with pytest.raises(InputError, match=r"expected dtype float32, got float64 \(big-endian, >f8\)"):
        sess.run({"x": _x().astype(">f8")})
