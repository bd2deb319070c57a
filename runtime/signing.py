"""Ed25519 signatures over kiln artifacts: keys, signing, and the trust decision at load time.

A ``.kiln`` holds native code that runs when it is loaded, so the runtime loads
only artifacts signed by a key it trusts (as pip/apt check a package's signature,
and as ``torch.load`` defaults to ``weights_only``).  What is signed is the
sha256 of the exact ``manifest.json`` bytes; the manifest carries the sha256 of
every other member, so one signature covers the whole artifact.  The record is
the ``signature.json`` member::

    {"digest": "<sha256 hex of manifest.json>", "algorithm": "ed25519",
     "key_id": "<16 hex>", "public_key": "<32 bytes hex>", "signature": "<64 bytes hex>"}

An unsigned artifact carries only ``digest``, so a flipped byte anywhere is still
caught.  Trusted keys: those passed to ``load(trusted_keys=...)``, the files listed
in ``KILN_TRUSTED_KEYS`` (``os.pathsep``-separated) and this user's local key
(``$KILN_HOME/signing.key``, ``KILN_HOME`` defaulting to ``~/.config/kiln``), which
``kiln compile`` creates on first use and signs with by default.  All
cryptography is the ``cryptography`` package's when it is installed (the full
kiln install always has it), else, for verifying only, OpenSSL's libcrypto
through :mod:`.ed25519_openssl` (the slim ``kiln-runtime`` does not depend on
``cryptography``); nothing here is hand-rolled.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ArtifactError, Error, TrustError

__all__ = [
    "ALGORITHM",
    "SIGNATURE",
    "KeyFileError",
    "TrustInfo",
    "generate_keypair",
    "key_id",
    "kiln_home",
    "load_private_key",
    "load_public_key",
    "local_key_path",
    "local_private_key",
    "signature_record",
    "trusted_public_keys",
    "verify_record",
]

SIGNATURE = "signature.json"
ALGORITHM = "ed25519"
TRUST_ENV = "KILN_TRUSTED_KEYS"
HOME_ENV = "KILN_HOME"
_CONTEXT = b"kiln-artifact-signature-v1\n"  # domain separation: this key signs nothing else by accident
_KEY_FILE_MAX = 64 * 1024
RECORD_MAX = 64 * 1024
HOW_TO_TRUST = (f"pass its public key with --trust KEY.pub (CLI) or trusted_keys=[...] (Python), or list it in "
                f"{TRUST_ENV}; or load it untrusted with --allow-unsigned (allow_unsigned=True)")


class KeyFileError(Error):
    """A key file that cannot be read or is not an Ed25519 key; the message names the file."""


@dataclass(frozen=True)
class TrustInfo:
    """What the signature check found: signed or not, by which key, and why it is trusted (if it is)."""

    signed: bool
    key_id: str | None = None
    trusted_by: str | None = None  # "local key ~/.config/kiln/signing.pub", "KILN_TRUSTED_KEYS: a.pub", ...

    @property
    def trusted(self) -> bool:
        return self.trusted_by is not None

    def describe(self) -> str:
        """One line for humans: ``signed by key 1a2b... (trusted: local key ...)`` or ``unsigned``."""
        if not self.signed:
            return "unsigned (loaded with --allow-unsigned)"
        how = f"trusted: {self.trusted_by}" if self.trusted else "NOT trusted, loaded with --allow-unsigned"
        return f"ed25519, key {self.key_id} ({how})"


def _crypto() -> Any:
    """(ed25519, serialization, InvalidSignature): ``cryptography``'s, else OpenSSL's through ctypes.

    Imported on first use (the runtime's import stays light); TrustError when neither is there.
    """
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        from . import ed25519_openssl

        if not ed25519_openssl.available():
            raise TrustError("checking artifact signatures needs the cryptography package or OpenSSL's "
                             "libcrypto, and neither was found: pip install cryptography") from None
        return ed25519_openssl, ed25519_openssl, ed25519_openssl.InvalidSignature
    return ed25519, serialization, InvalidSignature


def kiln_home() -> Path:
    """kiln's per-user folder: ``$KILN_HOME``, else ``~/.config/kiln``."""
    env = os.environ.get(HOME_ENV)
    return Path(env).expanduser() if env else Path.home() / ".config" / "kiln"


def local_key_path() -> Path:
    """This user's signing key, ``$KILN_HOME/signing.key`` (public half beside it as ``signing.pub``)."""
    return kiln_home() / "signing.key"


def raw_public(key: Any) -> bytes:
    """The 32 raw bytes of an Ed25519 public key (or of a private key's public half)."""
    ed25519, serialization, _ = _crypto()
    if isinstance(key, ed25519.Ed25519PrivateKey):
        key = key.public_key()
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _fingerprint(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()[:16]


def key_id(key: Any) -> str:
    """A short fingerprint of a key: the first 16 hex digits of the sha256 of its raw public bytes."""
    return _fingerprint(raw_public(key))


def _read_key_file(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(_KEY_FILE_MAX + 1)
    except OSError as e:
        raise KeyFileError(f"{path}: cannot read key file ({e.strerror or e})") from e
    if len(data) > _KEY_FILE_MAX:
        raise KeyFileError(f"{path}: not a key file (larger than {_KEY_FILE_MAX} bytes)")
    return data


def load_private_key(spec: Any) -> Any:
    """An Ed25519 private key from a PEM file path, PEM bytes or a key object."""
    ed25519, serialization, _ = _crypto()
    if isinstance(spec, ed25519.Ed25519PrivateKey):
        return spec
    where = "private key"
    if isinstance(spec, (str, os.PathLike)):
        where = os.fspath(spec)
        spec = _read_key_file(Path(spec))
    if not isinstance(spec, (bytes, bytearray)):
        raise KeyFileError(f"signing key: expected a PEM file path, PEM bytes or an Ed25519PrivateKey, "
                           f"got {type(spec).__name__}")
    try:
        key = serialization.load_pem_private_key(bytes(spec), password=None)
    except (ValueError, TypeError) as e:
        raise KeyFileError(f"{where}: not an unencrypted PEM private key ({e}); make one with kiln keygen") from e
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise KeyFileError(f"{where}: a {type(key).__name__}, expected an Ed25519 private key (kiln keygen)")
    return key


def load_public_key(spec: Any) -> Any:
    """An Ed25519 public key from a path or bytes (PEM public or private key, or 32 raw bytes) or a key object."""
    ed25519, serialization, _ = _crypto()
    if isinstance(spec, ed25519.Ed25519PublicKey):
        return spec
    if isinstance(spec, ed25519.Ed25519PrivateKey):
        return spec.public_key()
    where = "public key"
    if isinstance(spec, (str, os.PathLike)):
        where = os.fspath(spec)
        spec = _read_key_file(Path(spec))
    if not isinstance(spec, (bytes, bytearray)):
        raise KeyFileError(f"trusted key: expected a path, PEM bytes or an Ed25519 key object, "
                           f"got {type(spec).__name__}")
    data = bytes(spec)
    if len(data) == 32:
        return ed25519.Ed25519PublicKey.from_public_bytes(data)
    if b"PRIVATE KEY" in data:
        return load_private_key(data).public_key()
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as e:
        raise KeyFileError(f"{where}: not a PEM public key ({e}); kiln keygen writes one as PREFIX.pub") from e
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise KeyFileError(f"{where}: a {type(key).__name__}, expected an Ed25519 public key (kiln keygen)")
    return key


def _private_pem(key: Any) -> bytes:
    _, serialization, _ = _crypto()
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _public_pem(key: Any) -> bytes:
    ed25519, serialization, _ = _crypto()
    if isinstance(key, ed25519.Ed25519PrivateKey):
        key = key.public_key()
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` with ``data`` (refusing to overwrite): a temp file then ``os.link``, so nobody sees it half-written."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(6)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)  # FileExistsError when another process (or an earlier run) made it first
    finally:
        tmp.unlink(missing_ok=True)


def _replace_file(path: Path, data: bytes, mode: int) -> None:
    """Write ``path`` atomically (temp file in the same folder, then ``os.replace``)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(6)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def local_private_key(create: bool = True) -> Any:
    """This user's signing key, created on first use (mode 0600; ``signing.pub`` beside it).

    Creation is race-free across processes: each writes a private temp file and
    ``os.link``s it into place; the loser of a race reads the winner's key.
    Returns None when the key does not exist and ``create`` is False.
    """
    ed25519, _, _ = _crypto()
    path = local_key_path()
    if not path.exists():
        if not create:
            return None
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            _write_new(path, _private_pem(ed25519.Ed25519PrivateKey.generate()), 0o600)
        except FileExistsError:
            pass
        except OSError as e:
            raise KeyFileError(f"{path}: cannot create the local signing key ({e.strerror or e}); set "
                               f"{HOME_ENV} to a writable folder or pass --sign KEY") from e
    key = load_private_key(path)
    pub = path.with_name("signing.pub")
    want = _public_pem(key)
    try:
        if not pub.exists() or pub.read_bytes() != want:
            _replace_file(pub, want, 0o644)
    except OSError:
        pass  # the public file is a convenience for sharing; the key itself is what signs
    return key


def generate_keypair(prefix: str | os.PathLike) -> tuple[Path, Path, str]:
    """Write a new key pair as PREFIX.key (0600) and PREFIX.pub; refuses to overwrite either. Returns both paths and the key id."""
    ed25519, _, _ = _crypto()
    prefix = os.fspath(prefix)
    key_path, pub_path = Path(prefix + ".key"), Path(prefix + ".pub")
    existing = [str(p) for p in (key_path, pub_path) if p.exists()]
    if existing:
        raise KeyFileError(f"refusing to overwrite {', '.join(existing)}: choose another prefix (-o) or remove "
                           f"the old key pair first")
    key = ed25519.Ed25519PrivateKey.generate()
    try:
        _write_new(key_path, _private_pem(key), 0o600)
    except FileExistsError as e:
        raise KeyFileError(f"refusing to overwrite {key_path}: it appeared while writing") from e
    except OSError as e:
        raise KeyFileError(f"{key_path}: cannot write ({e.strerror or e})") from e
    try:
        _write_new(pub_path, _public_pem(key), 0o644)
    except OSError as e:
        key_path.unlink(missing_ok=True)
        raise KeyFileError(f"{pub_path}: cannot write ({e.strerror or e})") from e
    return key_path, pub_path, key_id(key)


def _message(digest: str) -> bytes:
    return _CONTEXT + digest.encode("ascii")


def signature_record(manifest_bytes: bytes, key: Any = None) -> dict[str, str]:
    """The ``signature.json`` record for these manifest bytes: the digest, plus a signature when ``key`` is given."""
    digest = hashlib.sha256(manifest_bytes).hexdigest()
    if key is None:
        return {"digest": digest}
    key = load_private_key(key)
    return {"digest": digest, "algorithm": ALGORITHM, "key_id": key_id(key),
            "public_key": raw_public(key).hex(), "signature": key.sign(_message(digest)).hex()}


def trusted_public_keys(trusted_keys: Iterable[Any] | None = None) -> dict[bytes, str]:
    """Every trusted public key (raw bytes) with where it came from: ``trusted_keys``, ``KILN_TRUSTED_KEYS``, the local key."""
    out: dict[bytes, str] = {}
    if isinstance(trusted_keys, (str, bytes, os.PathLike)):
        trusted_keys = [trusted_keys]
    for i, spec in enumerate(trusted_keys or ()):
        label = os.fspath(spec) if isinstance(spec, (str, os.PathLike)) else f"trusted_keys[{i}]"
        out.setdefault(raw_public(load_public_key(spec)), label)
    for entry in os.environ.get(TRUST_ENV, "").split(os.pathsep):
        if entry.strip():
            try:
                key = load_public_key(entry.strip())
            except KeyFileError as e:
                raise KeyFileError(f"{TRUST_ENV}: {e}") from e
            out.setdefault(raw_public(key), f"{TRUST_ENV}: {entry.strip()}")
    local = local_key_path()
    for path in (local, local.with_name("signing.pub")):
        if path.is_file():
            try:
                out.setdefault(raw_public(load_public_key(path)), f"local key {local.with_name('signing.pub')}")
            except KeyFileError:
                continue  # a damaged local key trusts nothing; signing with it reports the problem
    return out


def _parse_record(path: str, data: bytes) -> dict[str, Any]:
    if len(data) > RECORD_MAX:
        raise ArtifactError(f"{path}: {SIGNATURE} is {len(data)} bytes, more than a signature record can be "
                            f"({RECORD_MAX})")
    try:
        record = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ArtifactError(f"{path}: {SIGNATURE} is not valid JSON ({type(e).__name__}: {e})") from e
    if not isinstance(record, dict) or not isinstance(record.get("digest"), str):
        raise ArtifactError(f"{path}: {SIGNATURE} should be an object with a \"digest\", found {record!r:.200}")
    return record


def _unhex(path: str, record: dict[str, Any], field: str, size: int) -> bytes:
    value = record.get(field)
    try:
        raw = bytes.fromhex(value) if isinstance(value, str) else b""
    except ValueError:
        raw = b""
    if len(raw) != size:
        raise TrustError(f"{path}: {SIGNATURE}: {field} should be {size} bytes as hex, found {value!r:.100}")
    return raw


def verify_record(path: str, manifest_bytes: bytes, record_bytes: bytes, *, trusted: dict[bytes, str],
                  allow_unsigned: bool) -> TrustInfo:
    """Check the digest and the signature of an artifact; TrustError unless it is trusted or ``allow_unsigned``.

    The digest must always match (ArtifactError: the manifest was changed). A
    signature that does not verify is refused even with ``allow_unsigned``: it is
    evidence of tampering, not merely a missing signature.
    """
    record = _parse_record(path, record_bytes)
    digest = hashlib.sha256(manifest_bytes).hexdigest()
    if record["digest"].lower() != digest:
        raise ArtifactError(f"{path}: manifest.json: sha256 {digest} does not match the digest in {SIGNATURE} "
                            f"({record['digest']:.64}): the manifest was modified or damaged after it was written")
    if "signature" not in record:
        if allow_unsigned:
            return TrustInfo(signed=False)
        raise TrustError(f"{path}: the artifact is not signed, and a .kiln holds native code that runs when it is "
                         f"loaded: recompile it with kiln compile (which signs with your local key, or --sign KEY), "
                         f"or, if you trust where it came from, load it with --allow-unsigned / "
                         f"allow_unsigned=True")
    if record.get("algorithm") != ALGORITHM:
        raise TrustError(f"{path}: {SIGNATURE}: unsupported signature algorithm {record.get('algorithm')!r:.40} "
                         f"(this runtime verifies {ALGORITHM})")
    public = _unhex(path, record, "public_key", 32)
    signature = _unhex(path, record, "signature", 64)
    kid = _fingerprint(public)
    ed25519, _, invalid_signature = _crypto()
    try:
        ed25519.Ed25519PublicKey.from_public_bytes(public).verify(signature, _message(digest))
    except (invalid_signature, ValueError) as e:
        raise TrustError(f"{path}: the signature does not verify with the key it names ({kid}): the artifact "
                         "was modified after it was signed, or the signature is forged") from e
    if record.get("key_id") not in (None, kid):
        raise TrustError(f"{path}: {SIGNATURE}: key_id {record.get('key_id')!r:.40} is not the fingerprint of its "
                         f"public key ({kid})")
    source = trusted.get(public)
    if source is None and not allow_unsigned:
        known = ", ".join(sorted(f"{_fingerprint(k)} ({s})" for k, s in trusted.items())) or "none"
        raise TrustError(f"{path}: signed by key {kid}, which is not trusted here (trusted keys: {known}); "
                         f"if you trust that signer, {HOW_TO_TRUST}")
    return TrustInfo(signed=True, key_id=kid, trusted_by=source)

