"""kiln's C++ runtime (cpp/) against the Python runtime: same outputs bit for bit, same refusals.

The C++ side is the example program built from a ``kiln compile --bundle`` folder (``write_bundle``)
with only CMake and the system compiler, in a clean environment: what a user on another machine
gets. Its outputs come back as .npy files (``--out``) and are compared bitwise with
``kiln.load(...).run(...)`` on the same deterministic inputs; its errors ("Kind: message" on
stderr) are compared with the Python exception's class name and text.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import kiln
from kiln.runtime import Error, threads
from kiln.runtime import cpu as pycpu
from kiln.runtime.signing import signature_record

REPO = Path(__file__).resolve().parents[2]
CPP = REPO / "cpp"
CLEAN_PATH = "/usr/local/bin:/usr/bin:/bin"


def test_pool_source_is_threads_c_source() -> None:
    """The pool compiled into libkiln_runtime.so is the Python runtime's: CMake compiles runtime/pool.c."""
    cmake = (CPP / "CMakeLists.txt").read_text()
    assert '"${CMAKE_CURRENT_SOURCE_DIR}/../runtime/pool.c"' in cmake and "${KILN_POOL_C})" in cmake
    assert (CPP.parent / "runtime" / "pool.c").read_text() == threads.C_SOURCE
    assert not list(CPP.rglob("*.c")), "a second copy of the pool's source"


def _cpp_table(text: str, name: str) -> dict[str, Any]:
    """One ``const std::map<...> NAME = {...};`` table of cpu.cpp as a dict."""
    body = re.search(rf"{name} = \{{\n(.*?)\n\}};", text, re.S).group(1)
    out: dict[str, Any] = {}
    for line in body.splitlines():
        key, rest = re.match(r'\s*\{"([^"]+)", (.*)\},$', line).groups()
        out[key] = tuple(re.findall(r'"([^"]*)"', rest)) if rest.startswith("{") else rest.strip('"')
    return out


def test_cpu_tables_are_python_s() -> None:
    """cpu.cpp's feature tables equal runtime/cpu.py's (the same artifacts pass and fail the CPU check)."""
    text = (CPP / "src" / "cpu.cpp").read_text()
    assert _cpp_table(text, "kMcpuFeatures") == pycpu._MCPU_FEATURES
    assert _cpp_table(text, "kMattrToFlag") == pycpu._MATTR_TO_FLAG
    assert _cpp_table(text, "kImplies") == pycpu._IMPLIES
    assert _cpp_table(text, "kArchAliases") == pycpu._ARCH_ALIASES


def _clean_env(**extra: str) -> dict[str, str]:
    """A minimal environment: no virtualenv, no Python paths; KILN_HOME kept (the trusted local key)."""
    env = {"PATH": CLEAN_PATH, "HOME": os.environ.get("HOME", "/tmp"), "LANG": "C"}
    for key in ("KILN_HOME", "TMPDIR"):
        if key in os.environ:
            env[key] = os.environ[key]
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The zoo mlp and gpt compiled and signed with the session's local key."""
    d = tmp_path_factory.mktemp("cpp-zoo")
    out = {}
    for name in ("mlp", "gpt"):
        out[name] = d / f"{name}.kiln"
        kiln.compile(name).save(out[name])
    return out


@pytest.fixture(scope="module")
def bundle(zoo: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The mlp bundle, built in a clean environment with cmake + the system compiler."""
    if shutil.which("cmake") is None or shutil.which("c++") is None:
        pytest.skip("cmake and a C++ compiler are needed to build the C++ runtime")
    missing = [h for h in ("openssl/evp.h", "zlib.h") if not (Path("/usr/include") / h).exists()]
    if missing:
        pytest.skip(f"building the C++ runtime needs OpenSSL's and zlib's headers (libssl-dev, zlib1g-dev); "
                    f"missing {missing}")
    from kiln.bundle import write_bundle

    folder = write_bundle(zoo["mlp"], tmp_path_factory.mktemp("cpp-bundle") / "bundle")
    log = []
    for cmd in (["cmake", "-S", ".", "-B", "build"], ["cmake", "--build", "build"]):
        res = subprocess.run(cmd, cwd=folder, env=_clean_env(), capture_output=True, text=True)
        log.append(res.stdout + res.stderr)
        assert res.returncode == 0, res.stdout + res.stderr
    example = folder / "build" / "kiln_example"
    ldd = subprocess.run(["ldd", str(example)], capture_output=True, text=True, check=True).stdout
    return {"folder": folder, "example": example, "log": "\n".join(log), "ldd": ldd}


def _inputs(session: Any) -> dict[str, np.ndarray]:
    """main.cpp's deterministic inputs, reproduced: element k of input i from (k * 7 + i * 3) % 11."""
    out = {}
    for i, spec in enumerate(session.inputs):
        shape = tuple(int(d) for d in spec.shape)
        k = np.arange(int(np.prod(shape)))
        base = (k * 7 + i * 3) % 11
        if spec.dtype == "bool":
            values = ((k + i) % 2).astype(bool)
        elif spec.dtype.startswith("float"):
            values = ((base - 5) / 4).astype(spec.dtype)
        else:
            values = base.astype(spec.dtype)
        out[spec.name] = values.reshape(shape)
    return out


def _run_cpp(example: Path, artifact: Path, *args: str, out: Path | None = None) -> subprocess.CompletedProcess:
    cmd = [str(example), str(artifact), "--print", "4", *args] + (["--out", str(out)] if out else [])
    return subprocess.run(cmd, env=_clean_env(), capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_bundle_builds_without_the_repository(bundle: dict[str, Any]) -> None:
    """The bundle's build and its binary reference nothing in the repository or its virtualenv."""
    folder = bundle["folder"]
    assert sorted(p.name for p in (folder / "lib").iterdir()) == [
        "libkiln_runtime.so", "libtvm_ffi.so", "libtvm_runtime.so"]
    for text in (bundle["log"], bundle["ldd"]):
        assert str(REPO) not in text and ".venv" not in text and "site-packages" not in text
    for lib in ("libkiln_runtime.so", "libtvm_runtime.so", "libtvm_ffi.so"):
        assert f"{lib} => {folder / 'lib' / lib}" in bundle["ldd"]
    assert "libcrypto" not in bundle["ldd"] or not Path("/usr/lib/x86_64-linux-gnu/libcrypto.a").exists()
    assert "--trust signer.pub" in (folder / "README.txt").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("model", ["mlp", "gpt"])
def test_example_outputs_equal_python_bitwise(bundle: dict[str, Any], zoo: dict[str, Path], model: str,
                                              tmp_path: Path) -> None:
    """The C++ example's outputs are the Python runtime's, bit for bit (the same kernels, same pool)."""
    res = _run_cpp(bundle["example"], zoo[model], out=tmp_path)
    assert res.returncode == 0, res.stderr
    session = kiln.load(zoo[model])
    want = session.run(_inputs(session))
    assert list(want) == [s.name for s in session.outputs]
    for name, array in want.items():
        got = np.load(tmp_path / f"{name}.npy")
        assert got.dtype == array.dtype and got.shape == array.shape
        assert got.tobytes() == array.tobytes(), name
        assert name in res.stdout


@pytest.mark.slow
def test_example_uses_kiln_thread_pool(bundle: dict[str, Any], zoo: dict[str, Path]) -> None:
    """Kernel libraries with parallel loops run them on kiln's pool (and on TVM's with KILN_THREAD_POOL=tvm)."""
    res = _run_cpp(bundle["example"], zoo["gpt"], "--threads", "2", "--stats")
    pooled = int(re.search(r"pooled=(\d+)", res.stdout).group(1))
    assert res.returncode == 0 and pooled > 0, res.stdout + res.stderr
    env = _clean_env(KILN_THREAD_POOL="tvm")
    res = subprocess.run([str(bundle["example"]), str(zoo["gpt"]), "--print", "0", "--stats"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "launches=0 " in res.stdout, res.stdout + res.stderr


def _members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {i.filename: zf.read(i) for i in zf.infolist()}


def _write(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            method = zipfile.ZIP_STORED if name == "weights.npz" else zipfile.ZIP_DEFLATED
            zf.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), data, compress_type=method)
    return path


def _edited(src: Path, dst: Path, *, manifest: Any = None, key: Any = None, **members: bytes) -> Path:
    """A copy of ``src`` with members replaced, the manifest edited by ``manifest(dict)`` and re-hashed,
    and signature.json recomputed (digest only, or signed by ``key``)."""
    blobs = _members(src)
    blobs.update({k.replace("_", "."): v for k, v in members.items()})
    m = json.loads(blobs["manifest.json"])
    for name in ("lib.so", "weights.npz", "model.ir"):
        m["members"][name] = hashlib.sha256(blobs[name]).hexdigest()
    if manifest is not None:
        manifest(m)
    blobs["manifest.json"] = json.dumps(m, indent=2).encode()
    blobs["signature.json"] = json.dumps(signature_record(blobs["manifest.json"], key)).encode()
    return _write(dst, blobs)


def _python_error(path: Path, inputs: dict[str, np.ndarray] | None = None, **kw: Any) -> tuple[str, str]:
    try:
        session = kiln.load(path, **kw)
        session.run(inputs if inputs is not None else _inputs(session))
    except Error as e:
        return type(e).__name__, str(e)
    raise AssertionError(f"{path}: the Python runtime accepted it")


def _cpp_error(example: Path, path: Path, *args: str) -> tuple[str, str]:
    res = _run_cpp(example, path, *args)
    assert res.returncode == 2, res.stdout + res.stderr
    kind, _, message = res.stderr.strip().partition(": ")
    return kind, message


def _cases(mlp: Path, d: Path) -> list[tuple[str, Path, dict[str, Any], list[str]]]:
    """(name, artifact, Python load/run keywords, C++ example arguments) for each refusal compared."""
    from cryptography.hazmat.primitives.asymmetric import ed25519

    blobs = _members(mlp)
    lib = bytearray(blobs["lib.so"])
    lib[len(lib) // 2] ^= 1
    flipped = dict(blobs, **{"lib.so": bytes(lib)})
    record = json.loads(blobs["signature.json"])
    record["signature"] = ("00" if record["signature"][:2] != "00" else "11") + record["signature"][2:]
    sig = json.dumps(record).encode()
    npz = blobs["weights.npz"].replace(b"(4, 64, 32)", b"(4, 64, 33)", 1)
    wrong_shape = d / "x63.npy"
    np.save(wrong_shape, np.zeros((4, 63), np.float32))
    wrong_dtype = d / "x64.npy"
    np.save(wrong_dtype, np.zeros((4, 64), np.float64))
    u = {"allow_unsigned": True}
    return [
        ("unsigned", _edited(mlp, d / "unsigned.kiln"), {}, []),
        ("untrusted", _edited(mlp, d / "untrusted.kiln", key=ed25519.Ed25519PrivateKey.generate()), {}, []),
        ("forged", _write(d / "forged.kiln", dict(blobs, **{"signature.json": sig})), {}, []),
        ("manifest-edited", _write(d / "medit.kiln", dict(blobs, **{"manifest.json": blobs["manifest.json"] + b" "})),
         {}, []),
        ("lib-flipped", _write(d / "flipped.kiln", flipped), {}, []),
        ("too-new", _edited(mlp, d / "v3.kiln", manifest=lambda m: m.update(format_version=3)), u, ["--allow-unsigned"]),
        ("cpu", _edited(mlp, d / "cpu.kiln", manifest=lambda m: m["cpu_features"].append("kiln_test_flag")), u,
         ["--allow-unsigned"]),
        ("npy-header", _edited(mlp, d / "npy.kiln", weights_npz=npz), u, ["--allow-unsigned"]),
        ("missing-member", _write(d / "noir.kiln", {k: v for k, v in blobs.items() if k != "model.ir"}), {}, []),
        ("not-zip", _write_bytes(d / "text.kiln", b"hello, not a zip"), {}, []),
        ("truncated", _write_bytes(d / "cut.kiln", mlp.read_bytes()[: mlp.stat().st_size // 2]), {}, []),
        ("no-file", d / "absent.kiln", {}, []),
        ("input-shape", mlp, {"inputs": {"x": np.load(wrong_shape)}}, ["--input", f"x={wrong_shape}"]),
        ("input-dtype", mlp, {"inputs": {"x": np.load(wrong_dtype)}}, ["--input", f"x={wrong_dtype}"]),
    ]


def _write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.slow
def test_refusals_match_python(bundle: dict[str, Any], zoo: dict[str, Path], tmp_path: Path) -> None:
    """Unsigned, untrusted, forged, tampered, too new, wrong CPU, bad weights, bad zip, bad inputs:
    the C++ runtime refuses each with the Python runtime's error class and message."""
    for name, path, kw, args in _cases(zoo["mlp"], tmp_path):
        inputs = kw.pop("inputs", None)
        want = _python_error(path, inputs, **kw)
        got = _cpp_error(bundle["example"], path, *args)
        assert got == want, name
