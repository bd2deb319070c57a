"""The slim ``kiln-runtime`` distribution (issue 18): built, installed alone, and equal to the full runtime.

The slow tests build the wheel (``scripts/build_runtime_wheel.py``, what ``make runtime-wheel`` runs),
install it into a fresh venv with numpy and its dependencies only, and run every zoo artifact there,
bitwise against the full install's ``kiln.load(...).run(...)``; refusals (unsigned, tampered,
untrusted, unknown format version, bad input) must be the same errors with the same messages.  The
fast tests check :mod:`kiln.runtime.ed25519_openssl` (the verifier the slim runtime uses when
``cryptography`` is not installed) against ``cryptography`` itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tomllib
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from kiln.runtime import ed25519_openssl, threads
from kiln.runtime.signing import local_key_path, local_private_key

from .conftest import edit_manifest, rewrite_member

pytestmark = pytest.mark.xdist_group("slim-runtime")  # one worker builds the wheel, venv and zoo once

REPO = Path(__file__).resolve().parents[2]
FORBIDDEN = {"torch", "onnx", "onnxruntime", "onnxscript", "apache-tvm", "cryptography", "kiln"}

# Runs in either install: loads each case's artifact with the module named in argv[1] and prints,
# per case, the outputs' file or the error's class name and message.
RUN_CASES = """
import importlib, json, sys
import numpy as np
rt = importlib.import_module(sys.argv[1])
cases = json.loads(open(sys.argv[2]).read())
results = []
for case in cases:
    try:
        sess = rt.load(case["path"], **case["load"])
        out = sess.run(dict(np.load(case["inputs"])))
        np.savez(case["out"], **out)
        results.append(["ok", list(out)])
    except rt.Error as e:
        results.append([type(e).__name__, str(e)])
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"tvm", "torch", "onnx", "cryptography", "kiln"})
maps = sorted({line.split()[-1] for line in open("/proc/self/maps") if "libtvm" in line or "kiln-pool" in line})
pool = importlib.import_module(sys.argv[1] + ".threads")
print(json.dumps({"results": results, "heavy": heavy, "maps": maps, "pool": pool.unavailable_reason()}))
"""


def _project() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _pin(name: str) -> str:
    (req,) = [r for r in _project()["dependencies"] if re.split(r"[<>=!~; ]", r, maxsplit=1)[0] == name]
    return req


# ------------------------------------------------------------------ fixtures (built once per module)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "build_runtime_wheel.py"), "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return Path(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def slim_python(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with numpy and the wheel (its dependencies from pip's configured, local index)."""
    venv = tmp_path_factory.mktemp("slim") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    proc = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                           _pin("numpy"), str(wheel)], capture_output=True, text=True, timeout=300)
    if proc.returncode and ("No matching distribution" in proc.stderr or "Could not find a version" in proc.stderr):
        pytest.skip(f"a fresh venv needs numpy and the wheel's dependencies from a package index, which pip "
                    f"could not reach: {proc.stderr.strip().splitlines()[-1][:200]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return python


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    """Every zoo model compiled (signed with the session's local key) with its example inputs."""
    import kiln
    from kiln import zoo as zoo_models

    d = tmp_path_factory.mktemp("zoo")
    out = {}
    for name in zoo_models.names():
        path = d / f"{name}.kiln"
        kiln.compile(name).save(path)
        _, example = zoo_models.get(name)
        inputs = d / f"{name}.in.npz"
        np.savez(inputs, **{n: t.numpy() for n, t in zip(zoo_models.input_names(name), example)})
        out[name] = {"path": path, "inputs": inputs}
    return out


def _run_cases(python: Path | str, module: str, cases: list[dict[str, Any]], tmp: Path) -> dict[str, Any]:
    """RUN_CASES in a fresh process with an empty KILN_HOME (trust only what the cases pass).

    The slim one also gets no C compiler and an empty cache: its pool must be the wheel's.
    """
    spec = tmp / f"cases-{module}.json"
    spec.write_text(json.dumps(cases))
    home = tmp / f"home-{module}"
    home.mkdir(exist_ok=True)
    env = {**os.environ, "KILN_HOME": str(home)}
    if module == "kiln_runtime":
        env.update(KILN_CACHE_DIR=str(tmp / "empty-cache"), CC="false")
    env.pop("KILN_TRUSTED_KEYS", None)
    proc = subprocess.run([str(python), "-c", textwrap.dedent(RUN_CASES), module, str(spec)], capture_output=True,
                          text=True, timeout=300, env=env, cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _public_key() -> str:
    local_private_key()
    return str(local_key_path().with_name("signing.pub"))


# ------------------------------------------------------------------ the distribution


@pytest.mark.slow
def test_wheel_holds_the_runtime_the_tvm_runtime_library_and_the_pool(wheel):
    import importlib.util

    version = _project()["version"]
    assert re.fullmatch(rf"kiln_runtime-{re.escape(version)}-py3-none-manylinux_2_\d+_x86_64\.whl", wheel.name)
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        for src in (REPO / "runtime").glob("*.py"):
            assert zf.read(f"kiln_runtime/{src.name}") == src.read_bytes(), src.name
        tvm_lib = Path(importlib.util.find_spec("tvm").origin).parent / "lib" / "libtvm_runtime.so"
        shipped = zf.read("kiln_runtime/lib/libtvm_runtime.so")
        assert hashlib.sha256(shipped).digest() == hashlib.sha256(tvm_lib.read_bytes()).digest()
        assert f"kiln_runtime/lib/{threads.library_name()}" in names
        assert not [n for n in names if "libtvm_compiler" in n]
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        requires = re.findall(r"^Requires-Dist: (.+)$", zf.read(metadata).decode(), re.M)
    assert requires == [_pin("numpy"), _pin("ml-dtypes"), _pin("apache-tvm-ffi"),
                        f'{_pin("cryptography")}; extra == "cryptography"']


@pytest.mark.slow
def test_slim_venv_has_no_compiler_torch_onnx_or_cryptography(slim_python):
    proc = subprocess.run([str(slim_python), "-m", "pip", "list", "--format", "json",
                           "--disable-pip-version-check"], capture_output=True, text=True, timeout=120, check=True)
    installed = {p["name"].lower().replace("_", "-") for p in json.loads(proc.stdout)}
    assert "kiln-runtime" in installed
    assert not installed & FORBIDDEN


@pytest.mark.slow
def test_every_zoo_artifact_runs_in_the_slim_venv_bitwise_equal(slim_python, zoo, tmp_path):
    """Full install and slim venv, each in a fresh process, on every zoo model: the same bytes out.

    In the slim process no C compiler is reachable (CC=false, empty cache), so kiln's pool is the
    prebuilt one the wheel ships; libtvm_runtime.so is the wheel's; nothing heavy is imported.
    """
    key = _public_key()
    outs: dict[str, list[dict[str, Any]]] = {}
    for module, python in (("kiln.runtime", sys.executable), ("kiln_runtime", slim_python)):
        cases = [{"path": str(z["path"]), "inputs": str(z["inputs"]), "load": {"trusted_keys": [key]},
                  "out": str(tmp_path / f"{name}.{module}.npz")} for name, z in zoo.items()]
        res = _run_cases(python, module, cases, tmp_path)
        assert all(r[0] == "ok" for r in res["results"]), res["results"]
        assert res["pool"] is None
        if module == "kiln_runtime":
            assert res["heavy"] == []
            lib = [m for m in res["maps"] if "libtvm_runtime" in m]
            assert len(lib) == 1 and "kiln_runtime/lib/" in lib[0]
            assert [m for m in res["maps"] if "kiln-pool" in m][0].startswith(str(slim_python.parents[1]))
        assert not [m for m in res["maps"] if "libtvm_compiler" in m]
        outs[module] = cases
    for full, slim in zip(outs["kiln.runtime"], outs["kiln_runtime"]):
        a, b = dict(np.load(full["out"])), dict(np.load(slim["out"]))
        assert list(a) == list(b)
        for name in a:
            assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape
            assert a[name].tobytes() == b[name].tobytes(), (full["path"], name)


@pytest.mark.slow
def test_slim_runtime_refuses_what_the_full_one_refuses_with_the_same_message(slim_python, zoo, tmp_path):
    src = zoo["mlp"]["path"]
    unsigned, forged, edited, future, untrusted = (tmp_path / f"{n}.kiln" for n in
                                                   ("unsigned", "forged", "edited", "future", "untrusted"))
    rewrite_member(src, unsigned, "signature.json",
                   lambda d: json.dumps({"digest": json.loads(d)["digest"]}).encode())

    def flip(data: bytes) -> bytes:
        record = json.loads(data)
        sig = record["signature"]
        record["signature"] = ("0" if sig[0] != "0" else "1") + sig[1:]
        return json.dumps(record).encode()

    rewrite_member(src, forged, "signature.json", flip)
    edit_manifest(src, edited, lambda m: m.update(pipeline="edited"), resign=None)
    edit_manifest(src, future, lambda m: m.update(format_version=99))
    edit_manifest(src, untrusted, lambda m: m, resign=ed25519.Ed25519PrivateKey.generate())
    bad_input = tmp_path / "bad.npz"
    from kiln import zoo as zoo_models

    np.savez(bad_input, **{zoo_models.input_names("mlp")[0]: np.zeros((1, 3), np.float64)})
    key = _public_key()
    trusted = {"trusted_keys": [key]}
    inputs = str(zoo["mlp"]["inputs"])
    cases = [{"path": str(p), "inputs": i, "load": kw, "out": str(tmp_path / "o.npz")} for p, i, kw in (
        (unsigned, inputs, trusted), (forged, inputs, trusted), (forged, inputs, {"allow_unsigned": True}),
        (edited, inputs, trusted), (future, inputs, trusted), (untrusted, inputs, trusted),
        (src, inputs, {}), (src, str(bad_input), trusted), (unsigned, inputs, {"allow_unsigned": True}))]
    full = _run_cases(sys.executable, "kiln.runtime", cases, tmp_path)["results"]
    slim = _run_cases(slim_python, "kiln_runtime", cases, tmp_path)["results"]
    assert slim == full
    kinds = [r[0] for r in slim]
    assert kinds == ["TrustError", "TrustError", "TrustError", "ArtifactError", "ArtifactError", "TrustError",
                     "TrustError", "InputError", "ok"]
    assert "the artifact is not signed" in slim[0][1]
    assert "signature does not verify" in slim[1][1] and "signature does not verify" in slim[2][1]
    assert "newer than this runtime supports (version 2, and version 1 with allow_unsigned" in slim[4][1]


# ------------------------------------------------------------------ the OpenSSL verifier (fast)


def _signed(message: bytes) -> tuple[ed25519.Ed25519PrivateKey, bytes, bytes]:
    key = ed25519.Ed25519PrivateKey.generate()
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return key, raw, key.sign(message)


def test_openssl_verifier_accepts_what_cryptography_signed_and_nothing_else():
    assert ed25519_openssl.available()
    message = b"kiln-artifact-signature-v1\n" + b"ab" * 32
    key, raw, sig = _signed(message)
    ed25519_openssl.Ed25519PublicKey.from_public_bytes(raw).verify(sig, message)
    other = _signed(message)[1]
    for bad_key, bad_sig, bad_msg in ((raw, bytes([sig[0] ^ 1]) + sig[1:], message),
                                      (raw, sig[:-1] + bytes([sig[-1] ^ 0x80]), message),
                                      (raw, sig, message + b"x"), (raw, sig, message[:-1]),
                                      (other, sig, message), (raw, sig[:63], message), (raw, b"", message)):
        with pytest.raises(ed25519_openssl.InvalidSignature):
            ed25519_openssl.Ed25519PublicKey(bad_key).verify(bad_sig, bad_msg)


def test_openssl_verifier_reads_the_pem_keys_cryptography_writes_and_refuses_others():
    key, raw, _ = _signed(b"")
    pub_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    priv_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())
    raw_of = lambda k: k.public_bytes(ed25519_openssl.Encoding.Raw, ed25519_openssl.PublicFormat.Raw)  # noqa: E731
    assert raw_of(ed25519_openssl.load_pem_public_key(pub_pem)) == raw
    assert raw_of(ed25519_openssl.load_pem_private_key(priv_pem).public_key()) == raw
    assert ed25519_openssl.Ed25519PublicKey(raw).public_bytes(
        ed25519_openssl.Encoding.PEM, ed25519_openssl.PublicFormat.SubjectPublicKeyInfo) == pub_pem
    rsa_pem = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    for bad in (rsa_pem, priv_pem, pub_pem.replace(b"MCow", b"MCox"), pub_pem[:40], b"", pub_pem + pub_pem):
        with pytest.raises(ValueError):
            ed25519_openssl.load_pem_public_key(bad)
    with pytest.raises(ValueError):
        ed25519_openssl.load_pem_private_key(pub_pem)


def test_signing_without_cryptography_trusts_and_refuses_the_same(artifacts, tmp_path, monkeypatch):
    """``kiln.runtime`` with ``cryptography`` hidden (as in the slim venv): same results, same messages."""
    from kiln.runtime import Error, read_artifact

    forged = tmp_path / "forged.kiln"
    rewrite_member(artifacts["static"].path, forged, "signature.json",
                   lambda d: json.dumps({**json.loads(d), "signature": "00" * 64}).encode())
    untrusted = tmp_path / "untrusted.kiln"
    edit_manifest(artifacts["static"].path, untrusted, lambda m: m, resign=ed25519.Ed25519PrivateKey.generate())

    def outcomes() -> list[str]:
        out = []
        for path, kw in ((artifacts["static"].path, {}), (forged, {}), (forged, {"allow_unsigned": True}),
                         (untrusted, {}), (untrusted, {"allow_unsigned": True})):
            try:
                out.append(f"ok {read_artifact(path, **kw).trust}")
            except Error as e:
                out.append(f"{type(e).__name__}: {e}")
        return out

    with_cryptography = outcomes()
    for name in [m for m in sys.modules if m == "cryptography" or m.startswith("cryptography.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "cryptography", None)  # import cryptography -> ImportError
    assert outcomes() == with_cryptography
    assert with_cryptography[0].startswith("ok") and with_cryptography[4].startswith("ok")
    assert [o.split(":")[0] for o in with_cryptography[1:4]] == ["TrustError"] * 3
