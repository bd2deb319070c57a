"""The kiln artifact: one zip file holding a compiled model.

Members:

- ``lib.so``: the TVM Relax VM executable (``Executable.export_library``);
- ``weights.npz``: the weights, an uncompressed npz read with ``allow_pickle=False``; an ml_dtypes
  array (bfloat16, float8, ...) is stored as its unsigned-integer bits and viewed back as the dtype
  the manifest's ``weight_specs`` records (.npy has no descriptor for those types);
- ``model.ir``: the final kiln IR as text (utf-8), for humans and tools;
- ``manifest.json``: what the runtime needs to check and call the library,
  including the sha256 of every other member (``members``) and, when the compiler
  bound inputs to values (``specialized``: name, dtype, shape, value each), those
  inputs, which the runtime accepts only with exactly that value.

Everything is validated on read, so a damaged, edited or too-new file fails
with an :class:`ArtifactError` naming the file and the problem rather than
crashing inside the native library.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import os
import uuid
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import ArtifactError

__all__ = [
    "FORMAT_VERSION",
    "MEMBERS",
    "REQUIRED_KEYS",
    "ArtifactContents",
    "ArtifactError",
    "bits_dtype",
    "numpy_dtype",
    "read_artifact",
    "validate_manifest",
    "write_artifact",
]

FORMAT_VERSION = 1
LIBRARY, WEIGHTS, IR, MANIFEST = "lib.so", "weights.npz", "model.ir", "manifest.json"
MEMBERS = (MANIFEST, LIBRARY, WEIGHTS, IR)
HASHED_MEMBERS = (LIBRARY, WEIGHTS, IR)
REQUIRED_KEYS = (
    "format_version", "kiln_version", "tvm_version", "target", "cpu_features", "pipeline",
    "inputs", "outputs", "symbols", "weights", "entry", "kernels", "calibration", "created",
    "members",
)
_ZIP_MAGIC = b"PK\x03\x04"


@dataclass
class ArtifactContents:
    """A validated artifact in memory: manifest, library bytes, weights (manifest order), IR text."""

    manifest: dict[str, Any]
    library: bytes
    weights: dict[str, np.ndarray]
    ir_text: str


def numpy_dtype(name: str) -> np.dtype:
    """numpy dtype of a manifest dtype name, including ml_dtypes' (bfloat16, int4, ...)."""
    try:
        return np.dtype(name)
    except TypeError:
        import ml_dtypes

        dt = getattr(ml_dtypes, str(name), None)
        if dt is None:
            raise TypeError(f"unknown dtype {name!r}") from None
        return np.dtype(dt)


def bits_dtype(dtype: np.dtype) -> np.dtype | None:
    """The unsigned integer dtype of ``dtype``'s itemsize for ml_dtypes' types (bfloat16, float8, int4, ...),
    whose arrays neither .npy files nor numpy's DLPack carry; None for numpy's own dtypes."""
    dtype = np.dtype(dtype)
    return np.dtype(f"uint{8 * dtype.itemsize}") if dtype.isbuiltin == 2 else None


def _storable(array: np.ndarray) -> np.ndarray:
    """``array`` as written to weights.npz: ml_dtypes' arrays as their bits (the manifest keeps the dtype)."""
    bits = bits_dtype(array.dtype)
    return array if bits is None else array.view(bits)


def _restored(array: np.ndarray, dtype_name: Any) -> np.ndarray:
    """A weight read from weights.npz viewed as the manifest's dtype when it was stored as bits."""
    try:
        want = numpy_dtype(str(dtype_name))
    except TypeError:
        return array
    bits = bits_dtype(want)
    stored_as_bits = array.dtype == bits or (array.dtype.kind == "V" and array.dtype.names is None)
    if bits is not None and stored_as_bits and array.dtype.itemsize == want.itemsize:
        return array.view(want)
    return array


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _is_dim(d: Any) -> bool:
    return (isinstance(d, int) and not isinstance(d, bool) and d >= 0) or (isinstance(d, str) and bool(d))


def _check_signature(key: str, specs: Any) -> list[str]:
    """Problems with an ``inputs``/``outputs`` list: each entry needs name, numpy dtype and shape."""
    if not isinstance(specs, list):
        return [f"{key!r} should be a list, found {type(specs).__name__}"]
    problems = []
    for i, spec in enumerate(specs):
        where = f"{key}[{i}]"
        if not isinstance(spec, dict) or not {"name", "dtype", "shape"} <= spec.keys():
            problems.append(f"{where} should be an object with name, dtype, shape; found {spec!r}")
            continue
        try:
            numpy_dtype(spec["dtype"])
        except TypeError:
            problems.append(f"{where} ({spec['name']!r}) has unknown dtype {spec['dtype']!r}")
        shape = spec["shape"]
        if not isinstance(shape, list) or not all(_is_dim(d) for d in shape):
            problems.append(f"{where} ({spec['name']!r}) shape should be a list of ints or "
                            f"symbol strings, found {shape!r}")
    return problems


def validate_manifest(manifest: Any, *, need_members: bool = True) -> list[str]:
    """Problems with a manifest's structure (missing keys, wrong types); [] when usable."""
    if not isinstance(manifest, dict):
        return [f"manifest should be a JSON object, found {type(manifest).__name__}"]
    keys = [k for k in REQUIRED_KEYS if need_members or k != "members"]
    missing = [k for k in keys if k not in manifest]
    if missing:
        return [f"manifest lacks required keys {missing}"]
    problems = _check_signature("inputs", manifest["inputs"]) + _check_signature("outputs", manifest["outputs"])
    if not isinstance(manifest["format_version"], int):
        problems.append(f"format_version should be an int, found {manifest['format_version']!r}")
    if not isinstance(manifest["target"], dict):
        problems.append(f"target should be an object, found {manifest['target']!r}")
    symbols = manifest["symbols"]
    if not isinstance(symbols, dict) or not all(isinstance(v, int) for v in symbols.values()):
        problems.append(f"symbols should map names to ints, found {symbols!r}")
    for key in ("weights", "cpu_features"):
        if not isinstance(manifest[key], list) or not all(isinstance(w, str) for w in manifest[key]):
            problems.append(f"{key} should be a list of strings, found {manifest[key]!r}")
    if isinstance(manifest["weights"], list) and len(set(manifest["weights"])) != len(manifest["weights"]):
        problems.append("weights lists a name twice")
    if not isinstance(manifest["entry"], str) or not manifest["entry"]:
        problems.append(f"entry should be a function name, found {manifest['entry']!r}")
    if need_members and not isinstance(manifest["members"], dict):
        problems.append(f"members should map member names to sha256, found {manifest['members']!r}")
    if "specialized" in manifest:  # optional: artifacts without specialized inputs may omit it
        problems += _check_specialized(manifest["specialized"])
    return problems


def _check_specialized(specs: Any) -> list[str]:
    """Problems with the ``specialized`` list: inputs bound at compile time (signature plus ``value``)."""
    problems = _check_signature("specialized", specs)
    if problems:
        return problems
    for i, spec in enumerate(specs):
        if "value" not in spec:
            problems.append(f"specialized[{i}] ({spec['name']!r}) has no value")
            continue
        try:
            arr = np.asarray(spec["value"], dtype=numpy_dtype(spec["dtype"]))
        except (TypeError, ValueError, OverflowError) as e:
            problems.append(f"specialized[{i}] ({spec['name']!r}): value does not fit dtype {spec['dtype']}: {e}")
            continue
        if list(arr.shape) != list(spec["shape"]):
            problems.append(f"specialized[{i}] ({spec['name']!r}): value has shape {list(arr.shape)}, "
                            f"the entry says {spec['shape']}")
    return problems


def _npz_bytes(weights: Mapping[str, np.ndarray]) -> bytes:
    """An uncompressed npz of ``weights`` (written member by member: any name works, no pickle)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, array in weights.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, _storable(np.asarray(array)), allow_pickle=False)
    return buf.getvalue()


def _weight_specs(weights: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
    return [{"name": k, "dtype": np.asarray(v).dtype.name, "shape": list(np.shape(v))}
            for k, v in weights.items()]


def _complete_manifest(manifest: Mapping[str, Any], weights: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """A copy of ``manifest`` with the keys the writer owns or can default filled in."""
    from kiln import __version__

    from .cpu import required_cpu_features

    out = dict(manifest)
    out.setdefault("format_version", FORMAT_VERSION)
    out.setdefault("kiln_version", __version__)
    out.setdefault("weights", list(weights))
    out.setdefault("created", datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    out.setdefault("calibration", None)
    out.setdefault("kernels", [])
    out.setdefault("entry", "main")
    if "cpu_features" not in out and isinstance(out.get("target"), dict):
        out["cpu_features"] = required_cpu_features(out["target"])
    out["weight_specs"] = _weight_specs(weights)
    return out


def write_artifact(path: str | os.PathLike, *, library: bytes, weights: Mapping[str, np.ndarray],
                   ir_text: str, manifest: Mapping[str, Any]) -> None:
    """Write an artifact atomically: a temp file in the same directory, then ``os.replace``."""
    path = os.fspath(path)
    weights = dict(weights)
    full = _complete_manifest(manifest, weights)
    problems = validate_manifest(full, need_members=False)
    if not problems and list(full["weights"]) != list(weights):
        problems.append(f"manifest weights {full['weights']} differ from the weights given {list(weights)}")
    if problems:
        raise ArtifactError(f"{path}: refusing to write an invalid artifact: {'; '.join(problems)}")
    blobs = {LIBRARY: bytes(library), WEIGHTS: _npz_bytes(weights), IR: ir_text.encode("utf-8")}
    full["members"] = {name: _sha256(data) for name, data in blobs.items()}
    blobs = {MANIFEST: json.dumps(full, indent=2).encode("utf-8"), **blobs}

    directory, base = os.path.split(os.path.abspath(path))
    tmp = os.path.join(directory, f".{base}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            with zipfile.ZipFile(f, "w") as zf:
                for name, data in blobs.items():
                    method = zipfile.ZIP_STORED if name == WEIGHTS else zipfile.ZIP_DEFLATED
                    zf.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), data,
                                compress_type=method)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _open_zip(path: str) -> zipfile.ZipFile:
    """The artifact's zip, or an ArtifactError saying why it is not one."""
    if not os.path.exists(path):
        raise ArtifactError(f"{path}: no such file")
    if not os.path.isfile(path):
        raise ArtifactError(f"{path}: not a file (expected a kiln artifact, a zip file)")
    with open(path, "rb") as f:
        head = f.read(4)
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError) as e:
        if head == _ZIP_MAGIC:
            raise ArtifactError(f"{path}: truncated or corrupted zip ({e}); "
                                "the file was probably cut short while copying: copy it again") from e
        raise ArtifactError(f"{path}: not a kiln artifact: expected a zip file "
                            f"(starting with {_ZIP_MAGIC!r}), found bytes {head!r}") from e


def _read_members(path: str, zf: zipfile.ZipFile) -> dict[str, bytes]:
    """Every required member's bytes (CRC-checked by zipfile), or an ArtifactError."""
    names = set(zf.namelist())
    missing = [m for m in MEMBERS if m not in names]
    if missing:
        raise ArtifactError(f"{path}: missing members {missing}: expected {list(MEMBERS)}, "
                            f"found {sorted(names)}")
    out = {}
    for name in MEMBERS:
        try:
            out[name] = zf.read(name)
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as e:
            raise ArtifactError(f"{path}: member {name} is corrupted ({e})") from e
    return out


def _parse_manifest(path: str, data: bytes) -> dict[str, Any]:
    """The manifest as a dict, checked for version and structure."""
    try:
        manifest = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path}: {MANIFEST} is not valid JSON ({e})") from e
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path}: {MANIFEST} should be a JSON object, found {type(manifest).__name__}")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ArtifactError(f"{path}: {MANIFEST}: format_version should be an int >= 1, found {version!r}")
    if version > FORMAT_VERSION:
        raise ArtifactError(f"{path}: artifact format version {version} is newer than this runtime "
                            f"supports (version {FORMAT_VERSION}, kiln "
                            f"{manifest.get('kiln_version', '?')} wrote it): upgrade kiln to load it")
    problems = validate_manifest(manifest)
    if problems:
        raise ArtifactError(f"{path}: {MANIFEST}: {'; '.join(problems)}")
    return manifest


def _check_hashes(path: str, manifest: Mapping[str, Any], blobs: Mapping[str, bytes]) -> None:
    """Each hashed member's sha256 must match the manifest's."""
    recorded = manifest["members"]
    for name in HASHED_MEMBERS:
        want = recorded.get(name)
        if not isinstance(want, str):
            raise ArtifactError(f"{path}: {MANIFEST} members lists no sha256 for {name}")
        have = _sha256(blobs[name])
        if have != want.lower():
            raise ArtifactError(f"{path}: {name}: sha256 mismatch: manifest says {want}, file has {have} "
                                "(the artifact was modified or damaged after it was written)")


def _load_weights(path: str, manifest: Mapping[str, Any], data: bytes) -> dict[str, np.ndarray]:
    """The weights in manifest order, checked against the manifest's names, shapes and dtypes."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            found = {}
            for member in zf.namelist():
                if not member.endswith(".npy"):
                    raise ValueError(f"member {member!r} is not a .npy array")
                with zf.open(member) as f:
                    found[member[:-4]] = np.lib.format.read_array(f, allow_pickle=False)
    except (ValueError, OSError, zipfile.BadZipFile, EOFError, zlib.error) as e:
        raise ArtifactError(f"{path}: {WEIGHTS} is not a readable npz without pickles ({e})") from e
    names = list(manifest["weights"])
    missing = [n for n in names if n not in found]
    extra = [n for n in found if n not in names]
    if missing or extra:
        raise ArtifactError(f"{path}: {WEIGHTS} does not match the manifest: expected weights {names}, "
                            f"found {list(found)} (missing {missing}, unexpected {extra})")
    for spec in manifest.get("weight_specs") or []:
        name = spec.get("name")
        if name not in found:
            raise ArtifactError(f"{path}: manifest weight_specs names {name!r}, which is not a weight")
        got = found[name] = _restored(found[name], spec.get("dtype"))
        if got.dtype.name != spec.get("dtype") or list(got.shape) != list(spec.get("shape", [])):
            raise ArtifactError(f"{path}: weight {name!r}: manifest says {spec.get('dtype')} "
                                f"{spec.get('shape')}, {WEIGHTS} has {got.dtype.name} {list(got.shape)}")
    return {n: found[n] for n in names}


def read_artifact(path: str | os.PathLike) -> ArtifactContents:
    """Read and fully validate an artifact (zip, members, manifest, hashes, weights)."""
    path = os.fspath(path)
    with _open_zip(path) as zf:
        blobs = _read_members(path, zf)
    manifest = _parse_manifest(path, blobs[MANIFEST])
    _check_hashes(path, manifest, blobs)
    weights = _load_weights(path, manifest, blobs[WEIGHTS])
    try:
        ir_text = blobs[IR].decode("utf-8")
    except UnicodeDecodeError as e:
        raise ArtifactError(f"{path}: {IR} is not utf-8 text ({e})") from e
    return ArtifactContents(manifest, blobs[LIBRARY], weights, ir_text)
