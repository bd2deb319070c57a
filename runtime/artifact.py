"""The kiln artifact: one zip file holding a compiled model.

Members:

- ``lib.so``: the TVM Relax VM executable (``Executable.export_library``);
- ``weights.npz``: the weights, an uncompressed npz read with ``allow_pickle=False``; an ml_dtypes
  array (bfloat16, float8, ...) is stored as its unsigned-integer bits and viewed back as the dtype
  the manifest's ``weight_specs`` records (.npy has no descriptor for those types);
- ``model.ir``: the final kiln IR as text (utf-8), for humans and tools, constants over a few elements
  elided (``dense<elided>``: their data is in ``weights.npz``, under the names codegen gave them);
- ``manifest.json``: what the runtime needs to check and call the library,
  including the sha256 of every other member (``members``) and, when the compiler
  bound inputs to values (``specialized``: name, dtype, shape, value each), those
  inputs, which the runtime accepts only with exactly that value;
- ``signature.json`` (format 2): the sha256 of the exact manifest bytes and, for a
  signed artifact, an Ed25519 signature over it (:mod:`kiln.runtime.signing`).

Reading checks, in order and before anything is inflated past the two small
records: the zip directory against :class:`~kiln.runtime.limits.Limits` (member
and total inflated sizes, compression ratio), the manifest digest and signature
(:class:`TrustError` unless a trusted key signed it or ``allow_unsigned``), the
manifest's structure, every member's sha256, and every weight's npy header
(shape against the data present and ``tensor_bytes``) before allocating it.  So
a damaged, edited, hostile or too-new file fails with a ``kiln.Error`` naming
the file and the problem instead of running code or exhausting memory.
Format 1 files (unsigned, manifest not covered by any digest) are read only
with ``allow_unsigned``.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import math
import os
import re
import secrets
import socket
import sys
import zipfile
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import ArtifactError, Error, TrustError
from .limits import DEFAULT_LIMITS, Limits, check_limit
from .signing import (
    SIGNATURE,
    TrustInfo,
    load_private_key,
    local_private_key,
    signature_record,
    trusted_public_keys,
    verify_record,
)

__all__ = [
    "FORMAT_VERSION",
    "MEMBERS",
    "REQUIRED_KEYS",
    "ArtifactContents",
    "ArtifactError",
    "TrustError",
    "bits_dtype",
    "numpy_dtype",
    "read_artifact",
    "validate_manifest",
    "write_artifact",
]

FORMAT_VERSION = 2
LEGACY_VERSION = 1  # unsigned, no manifest digest: read only with allow_unsigned
LIBRARY, WEIGHTS, IR, MANIFEST = "lib.so", "weights.npz", "model.ir", "manifest.json"
MEMBERS = (MANIFEST, SIGNATURE, LIBRARY, WEIGHTS, IR)
HASHED_MEMBERS = (LIBRARY, WEIGHTS, IR)
REQUIRED_KEYS = (
    "format_version", "kiln_version", "tvm_version", "target", "cpu_features", "pipeline",
    "inputs", "outputs", "symbols", "weights", "entry", "kernels", "calibration", "created",
    "members",
)
_ZIP_MAGIC = b"PK\x03\x04"
# The dtypes of kiln's IR (kiln.ir.types), as the manifest names them; TVM aborts the process on some
# others (complex64: its error message cannot print the dtype), so a manifest naming one is refused.
KILN_DTYPES = frozenset((
    "bool", "int2", "int4", "int8", "int16", "int32", "int64", "uint2", "uint4", "uint8", "uint16", "uint32",
    "uint64", "float16", "float32", "float64", "bfloat16", "float4_e2m1fn", "float6_e2m3fn", "float6_e3m2fn",
    "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu",
))
_CHUNK = 1 << 20
_RATIO_FLOOR = 1 << 20  # members inflating to less than this skip the ratio check (small and harmless)
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_TEMP = re.compile(r"^\.(?P<base>.+)\.tmp-(?P<pid>\d+)-(?P<host>[0-9a-f]{8})-[0-9a-f]+$")


@dataclass
class ArtifactContents:
    """A validated artifact in memory: manifest, library bytes, weights (manifest order), IR text."""

    manifest: dict[str, Any]
    library: bytes
    weights: dict[str, np.ndarray]
    ir_text: str
    trust: TrustInfo | None = field(default=None, kw_only=True)  # what the signature check found (None: not read)


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
        if not isinstance(spec["name"], str) or not spec["name"]:
            problems.append(f"{where} name should be a non-empty string, found {str(spec['name'])[:80]}")
            continue
        if spec["dtype"] not in KILN_DTYPES:
            problems.append(f"{where} ({spec['name']!r}) has dtype {spec['dtype']!r}, which kiln never "
                            f"emits (kiln's: {', '.join(sorted(KILN_DTYPES))})")
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
    problems += _check_kernels(manifest["kernels"])
    if not isinstance(manifest["entry"], str) or not manifest["entry"]:
        problems.append(f"entry should be a function name, found {manifest['entry']!r}")
    if need_members and not isinstance(manifest["members"], dict):
        problems.append(f"members should map member names to sha256, found {manifest['members']!r}")
    if "params" in manifest and (not isinstance(manifest["params"], list)
                                 or not all(isinstance(n, str) for n in manifest["params"])):
        problems.append(f"params should be a list of input names, found {manifest['params']!r}")
    if "specialized" in manifest:  # optional: artifacts without specialized inputs may omit it
        problems += _check_specialized(manifest["specialized"])
    return problems


def _check_kernels(kernels: Any) -> list[str]:
    """Problems with the ``kernels`` list (read by ``kiln inspect``): objects with a string name and ops."""
    if not isinstance(kernels, list):
        return [f"kernels should be a list, found {type(kernels).__name__}"]
    for i, k in enumerate(kernels):
        if (not isinstance(k, dict) or not isinstance(k.get("name"), str)
                or not isinstance(k.get("ops", []), list) or not all(isinstance(o, str) for o in k.get("ops", []))):
            return [f"kernels[{i}] should be an object with a string name and a list of op names, found {k!r}"]
    return []


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
    from .cpu import required_cpu_features

    out = dict(manifest)
    out.setdefault("format_version", FORMAT_VERSION)
    if "kiln_version" not in out:
        out["kiln_version"] = _kiln_version()
    out.setdefault("weights", list(weights))
    out.setdefault("created", datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    out.setdefault("calibration", None)
    out.setdefault("kernels", [])
    out.setdefault("entry", "main")
    if "cpu_features" not in out and isinstance(out.get("target"), dict):
        out["cpu_features"] = required_cpu_features(out["target"])
    out["weight_specs"] = _weight_specs(weights)
    return out


def _kiln_version() -> str:
    """The version of the kiln writing a manifest: ``kiln.__version__`` when the compiler is loaded, else the
    installed distribution's (kiln or kiln-runtime); the runtime never imports the compiler to ask."""
    compiler = sys.modules.get("kiln")
    if isinstance(getattr(compiler, "__version__", None), str):
        return compiler.__version__
    import importlib.metadata

    for dist in ("kiln", "kiln-runtime"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


def _signing_key(sign: Any) -> Any:
    """The private key ``sign`` asks for: True = this user's local key, False/None = unsigned, else a key spec."""
    if sign is True:
        return local_private_key()
    if sign is False or sign is None:
        return None
    return load_private_key(sign)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (a process we may not signal counts as alive)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def remove_stale_temps(directory: str | os.PathLike) -> list[str]:
    """Remove temp files that saves on this host left in ``directory`` when killed (their PID is gone); returns them.

    Temp names are ``.NAME.tmp-PID-HOST-RANDOM``; only this host's, of dead
    processes, are touched, so a save in progress (here or on another machine
    sharing the folder) keeps its file.
    """
    removed = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP.match(entry.name)
        if m is None or m["host"] != _HOST or _alive(int(m["pid"])):
            continue
        try:
            os.unlink(entry.path)
            removed.append(entry.path)
        except OSError:
            pass
    return removed


def temp_path(path: str) -> str:
    """A fresh temp file name beside ``path`` that :func:`remove_stale_temps` recognizes."""
    directory, base = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{base}.tmp-{os.getpid()}-{_HOST}-{secrets.token_hex(6)}")


def write_artifact(path: str | os.PathLike, *, library: bytes, weights: Mapping[str, np.ndarray],
                   ir_text: str, manifest: Mapping[str, Any], sign: Any = True) -> None:
    """Write an artifact atomically (a temp file in the same directory, then ``os.replace``), signed.

    ``sign``: True (default) signs with this user's local key (created on first
    use, :func:`kiln.runtime.signing.local_private_key`); a PEM path, PEM bytes or
    an Ed25519PrivateKey signs with that key; False/None writes it unsigned
    (``signature.json`` then holds only the manifest digest).
    """
    path = os.fspath(path)
    weights = dict(weights)
    full = _complete_manifest(manifest, weights)
    full["format_version"] = FORMAT_VERSION
    problems = validate_manifest(full, need_members=False)
    if not problems and list(full["weights"]) != list(weights):
        problems.append(f"manifest weights {full['weights']} differ from the weights given {list(weights)}")
    if problems:
        raise ArtifactError(f"{path}: refusing to write an invalid artifact: {'; '.join(problems)}")
    key = _signing_key(sign)
    blobs = {LIBRARY: bytes(library), WEIGHTS: _npz_bytes(weights), IR: ir_text.encode("utf-8")}
    full["members"] = {name: _sha256(data) for name, data in blobs.items()}
    manifest_bytes = json.dumps(full, indent=2).encode("utf-8")
    record = json.dumps(signature_record(manifest_bytes, key), indent=2).encode("utf-8")
    blobs = {MANIFEST: manifest_bytes, SIGNATURE: record, **blobs}

    remove_stale_temps(os.path.dirname(os.path.abspath(path)))
    tmp = temp_path(path)
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
    try:
        with open(path, "rb") as f:
            head = f.read(4)
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, NotImplementedError) as e:
        if isinstance(e, PermissionError):
            raise ArtifactError(f"{path}: cannot read ({e.strerror})") from e
        if head == _ZIP_MAGIC:
            raise ArtifactError(f"{path}: truncated or corrupted zip ({e}); "
                                "the file was probably cut short while copying: copy it again") from e
        raise ArtifactError(f"{path}: not a kiln artifact: expected a zip file "
                            f"(starting with {_ZIP_MAGIC!r}), found bytes {head!r}") from e


def _directory(path: str, zf: zipfile.ZipFile, limits: Limits) -> dict[str, zipfile.ZipInfo]:
    """The members kiln reads, checked from the zip directory alone (sizes, ratios, methods) before inflating any."""
    infos: dict[str, zipfile.ZipInfo] = {}
    names = []
    for info in zf.infolist():
        names.append(info.filename)
        if info.filename in MEMBERS:
            if info.filename in infos:
                raise ArtifactError(f"{path}: member {info.filename} appears twice in the zip (a tampered file)")
            infos[info.filename] = info
    missing = [m for m in MEMBERS if m not in infos and m != SIGNATURE]
    if missing:
        raise ArtifactError(f"{path}: missing members {missing}: expected {list(MEMBERS)}, found {sorted(names)[:20]}")
    size = os.path.getsize(path)
    total = 0
    for name, info in infos.items():
        if info.flag_bits & 0x1:
            raise ArtifactError(f"{path}: member {name} is encrypted; kiln artifacts are not")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise ArtifactError(f"{path}: member {name} uses zip compression method {info.compress_type}; "
                                "kiln reads stored or deflated members only")
        if info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size:
            raise ArtifactError(f"{path}: member {name} is stored uncompressed but the zip directory gives "
                                f"{info.compress_size} stored and {info.file_size} inflated bytes")
        if info.header_offset + info.compress_size > size:
            raise ArtifactError(f"{path}: member {name} extends past the end of the file: truncated or corrupted")
        check_limit(limits, "member_bytes", info.file_size, f"{path}: member {name}'s inflated size")
        if info.compress_type == zipfile.ZIP_DEFLATED and info.file_size > _RATIO_FLOOR:
            check_limit(limits, "zip_ratio", info.file_size // max(info.compress_size, 1),
                        f"{path}: member {name} inflates {info.compress_size:,} to {info.file_size:,} bytes; "
                        "its compression ratio")
        total += info.file_size
    check_limit(limits, "artifact_bytes", total, f"{path}: the inflated size of its members together")
    return infos


def _inflate(path: str, zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytearray:
    """One member's bytes, inflated in chunks into a buffer of its checked directory size (never past it)."""
    want = info.file_size
    out = bytearray(want)
    view = memoryview(out)
    got = 0
    try:
        with zf.open(info) as f:
            while chunk := f.read(min(_CHUNK, want - got + 1)):
                if got + len(chunk) > want:
                    raise ArtifactError(f"{path}: member {info.filename} inflates past the {want:,} bytes "
                                        "its zip directory entry gives")
                view[got:got + len(chunk)] = chunk
                got += len(chunk)
            decompressor = getattr(f, "_decompressor", None)  # CPython's ZipExtFile; absent: skip the check
            if info.compress_type == zipfile.ZIP_DEFLATED and not getattr(decompressor, "eof", True):
                raise ArtifactError(f"{path}: member {info.filename} is corrupted: its deflate stream does not "
                                    "end where the member does")
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, NotImplementedError) as e:
        raise ArtifactError(f"{path}: member {info.filename} is corrupted ({e})") from e
    finally:
        view.release()
    if got != want:
        raise ArtifactError(f"{path}: member {info.filename} is corrupted: it holds {got:,} bytes, its zip "
                            f"directory entry says {want:,}")
    return out


def _json(path: str, name: str, data: bytes | bytearray) -> Any:
    """``data`` parsed as JSON; ArtifactError for bad text or nesting too deep to parse."""
    try:
        return json.loads(bytes(data).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ArtifactError(f"{path}: {name} is not valid JSON ({type(e).__name__}: {str(e)[:200]})") from e


def _parse_manifest(path: str, data: bytes | bytearray, versions: Iterable[int] = (FORMAT_VERSION,)) -> dict[str, Any]:
    """The manifest as a dict, checked for version (one of ``versions``) and structure."""
    manifest = _json(path, MANIFEST, data)
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path}: {MANIFEST} should be a JSON object, found {type(manifest).__name__}")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ArtifactError(f"{path}: {MANIFEST}: format_version should be an int >= 1, found {version!r:.40}")
    if version > FORMAT_VERSION:
        raise ArtifactError(f"{path}: artifact format version {version} is newer than this runtime "
                            f"supports (version {FORMAT_VERSION}, and version {LEGACY_VERSION} with allow_unsigned; "
                            f"kiln {str(manifest.get('kiln_version', '?'))[:40]} wrote it): upgrade kiln (or "
                            f"kiln-runtime) to load it")
    if version not in versions:
        raise ArtifactError(f"{path}: {MANIFEST} says format version {version}, but the file has the members of "
                            f"version {max(versions)}: the file was modified or damaged")
    problems = validate_manifest(manifest)
    if problems:
        raise ArtifactError(f"{path}: {MANIFEST}: {'; '.join(problems)}"[:2000])
    return manifest


def _legacy_manifest(path: str, data: bytearray, allow_unsigned: bool) -> dict[str, Any]:
    """The manifest of a file without signature.json: format 1 (only with ``allow_unsigned``) or a stripped format 2."""
    manifest = _json(path, MANIFEST, data)
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version != LEGACY_VERSION:
        raise ArtifactError(f"{path}: missing members ['{SIGNATURE}']: format version {FORMAT_VERSION} artifacts "
                            f"always carry it (the file was modified or damaged)")
    if not allow_unsigned:
        raise TrustError(f"{path}: artifact format version {LEGACY_VERSION} (written by a kiln before artifacts "
                         f"were signed; nothing authenticates it): this runtime reads version {FORMAT_VERSION}, and "
                         f"version {LEGACY_VERSION} only with --allow-unsigned (allow_unsigned=True): recompile the "
                         f"model with this kiln, or load it with --allow-unsigned if you trust where it came from")
    return _parse_manifest(path, data, versions=(LEGACY_VERSION,))


def _check_hashes(path: str, manifest: Mapping[str, Any], blobs: Mapping[str, bytes | bytearray]) -> None:
    """Each hashed member's sha256 must match the manifest's."""
    recorded = manifest["members"]
    for name in HASHED_MEMBERS:
        want = recorded.get(name)
        if not isinstance(want, str):
            raise ArtifactError(f"{path}: {MANIFEST} members lists no sha256 for {name}")
        have = _sha256(blobs[name])
        if have != want.lower():
            raise ArtifactError(f"{path}: {name}: sha256 mismatch: manifest says {want:.64}, file has {have} "
                                "(the artifact was modified or damaged after it was written)")


class _BufferFile(io.RawIOBase):
    """A read-only, seekable file over a buffer, without copying it (``io.BytesIO`` copies a bytearray)."""

    def __init__(self, data: bytes | bytearray) -> None:
        super().__init__()
        self._view = memoryview(data)
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        chunk = self._view[self._pos:self._pos + len(buffer)]
        n = len(chunk)
        memoryview(buffer).cast("B")[:n] = chunk
        self._pos += n
        return n

    def close(self) -> None:
        self._view.release()
        super().close()


def _read_npy(path: str, member: str, f: Any, size: int, limits: Limits) -> np.ndarray:
    """One .npy array from a stream: header checked against the bytes present and ``tensor_bytes`` before allocating."""
    fmt = np.lib.format
    version = fmt.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = fmt.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran, dtype = fmt.read_array_header_2_0(f)
    else:
        raise ValueError(f"{member}: npy format version {version} is not one kiln writes (1.0, 2.0)")
    if dtype.hasobject:
        raise ValueError(f"{member}: dtype {dtype} holds Python objects, which would need pickle")
    nbytes = math.prod(shape) * dtype.itemsize
    check_limit(limits, "tensor_bytes", nbytes, f"{path}: {WEIGHTS}: {member} ({dtype.str}{list(shape)})")
    present = size - f.tell()
    if nbytes != present:
        raise ValueError(f"{member}: its header claims {dtype.str}{list(shape)} = {nbytes:,} bytes of data, the "
                         f"member holds {present:,}")
    flat = np.empty(math.prod(shape), dtype)
    raw = flat.view(np.uint8) if nbytes else flat
    got = 0
    while got < nbytes:
        chunk = f.read(min(_CHUNK, nbytes - got))
        if not chunk:
            raise ValueError(f"{member}: data ends after {got:,} of {nbytes:,} bytes")
        raw[got:got + len(chunk)] = np.frombuffer(chunk, np.uint8)
        got += len(chunk)
    return flat.reshape(shape[::-1]).transpose() if fortran else flat.reshape(shape)


def _load_weights(path: str, manifest: Mapping[str, Any], data: bytes | bytearray,
                  limits: Limits = DEFAULT_LIMITS) -> dict[str, np.ndarray]:
    """The weights in manifest order, checked against the manifest's names, shapes and dtypes."""
    try:
        with zipfile.ZipFile(_BufferFile(data)) as zf:
            found: dict[str, np.ndarray] = {}
            for info in zf.infolist():
                member = info.filename
                if not member.endswith(".npy"):
                    raise ValueError(f"member {member!r} is not a .npy array")
                if member[:-4] in found:
                    raise ValueError(f"member {member!r} appears twice")
                if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
                    raise ValueError(f"member {member!r} is compressed; kiln stores weights uncompressed")
                with zf.open(info) as f:
                    found[member[:-4]] = _read_npy(path, member, f, info.file_size, limits)
    except (ValueError, OSError, zipfile.BadZipFile, EOFError, zlib.error, SyntaxError, RecursionError,
            NotImplementedError, TypeError, OverflowError) as e:
        raise ArtifactError(f"{path}: {WEIGHTS} is not a readable npz without pickles "
                            f"({type(e).__name__}: {str(e)[:300]})") from e
    names = list(manifest["weights"])
    missing = [n for n in names if n not in found]
    extra = [n for n in found if n not in names]
    if missing or extra:
        raise ArtifactError(f"{path}: {WEIGHTS} does not match the manifest: expected weights {names}, "
                            f"found {list(found)} (missing {missing}, unexpected {extra})")
    for spec in manifest.get("weight_specs") or []:
        name = spec.get("name") if isinstance(spec, dict) else None
        if name not in found:
            raise ArtifactError(f"{path}: manifest weight_specs names {name!r:.80}, which is not a weight")
        got = found[name] = _restored(found[name], spec.get("dtype"))
        if got.dtype.name != spec.get("dtype") or list(got.shape) != list(spec.get("shape", [])):
            raise ArtifactError(f"{path}: weight {name!r}: manifest says {spec.get('dtype')} "
                                f"{spec.get('shape')}, {WEIGHTS} has {got.dtype.name} {list(got.shape)}")
    return {n: found[n] for n in names}


def _read(path: str, trusted_keys: Any, allow_unsigned: bool, limits: Limits) -> ArtifactContents:
    trusted = trusted_public_keys(trusted_keys)
    with _open_zip(path) as zf:
        infos = _directory(path, zf, limits)
        manifest_bytes = _inflate(path, zf, infos[MANIFEST])
        if SIGNATURE in infos:
            trust = verify_record(path, manifest_bytes, _inflate(path, zf, infos[SIGNATURE]), trusted=trusted,
                                  allow_unsigned=allow_unsigned)
            manifest = _parse_manifest(path, manifest_bytes)
        else:
            manifest = _legacy_manifest(path, manifest_bytes, allow_unsigned)
            trust = TrustInfo(signed=False)
        # trusted (or explicitly allowed) from here on: the other members may be inflated
        blobs = {name: _inflate(path, zf, infos[name]) for name in HASHED_MEMBERS}
    _check_hashes(path, manifest, blobs)
    weights = _load_weights(path, manifest, blobs.pop(WEIGHTS), limits)
    try:
        ir_text = blobs[IR].decode("utf-8")
    except UnicodeDecodeError as e:
        raise ArtifactError(f"{path}: {IR} is not utf-8 text ({e})") from e
    return ArtifactContents(manifest, bytes(blobs[LIBRARY]), weights, ir_text, trust=trust)


def read_artifact(path: str | os.PathLike, *, trusted_keys: Any = None, allow_unsigned: bool = False,
                  limits: Limits | None = None) -> ArtifactContents:
    """Read and fully validate an artifact: limits, digest and signature first, then manifest, hashes, weights.

    ``trusted_keys``: public keys (paths, PEM bytes, key objects) trusted beside
    ``KILN_TRUSTED_KEYS`` and the local key; ``allow_unsigned`` accepts an unsigned
    or untrusted (never a wrongly signed) artifact; ``limits`` bounds sizes
    (default :data:`~kiln.runtime.limits.DEFAULT_LIMITS`). Every failure is a
    ``kiln.Error`` (ArtifactError, TrustError, LimitError) naming the file.
    """
    path = os.fspath(path)
    try:
        return _read(path, trusted_keys, allow_unsigned, limits or DEFAULT_LIMITS)
    except Error:
        raise
    except MemoryError as e:
        raise ArtifactError(f"{path}: out of memory while reading the artifact; lower the size limits "
                            "(--max-member-mb, --max-tensor-mb) to refuse it early") from e
    except Exception as e:  # noqa: BLE001 - the API boundary: a bad file is a kiln error, whatever tripped on it
        raise ArtifactError(f"{path}: cannot read the artifact ({type(e).__name__}: {str(e)[:300]})") from e
