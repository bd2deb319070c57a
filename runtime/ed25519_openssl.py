"""Ed25519 signature checks through OpenSSL's libcrypto, for a runtime installed without ``cryptography``.

:mod:`.signing` uses the ``cryptography`` package when it is installed (the full
kiln install always has it).  The slim ``kiln-runtime`` distribution does not
depend on it: ``cryptography`` is 17 MB installed (with cffi), more than the rest
of the runtime together, and a runtime only verifies.  Python itself links
OpenSSL's ``libcrypto`` (``hashlib``, ``ssl``), whose ``EVP_DigestVerify`` does
Ed25519 (OpenSSL 1.1.1 and later); this module calls it with ctypes, so no
cryptography is hand-rolled here, and offers the small part of
``cryptography``'s API that :mod:`.signing` uses (key classes, PEM loading,
``InvalidSignature``).  Key formats are parsed exactly: an Ed25519 key's
SubjectPublicKeyInfo and PKCS#8 encodings are a fixed DER prefix and the 32 key
bytes (RFC 8410), anything else is refused.  Making keys and signing still need
``cryptography`` (``pip install cryptography``); verifying does not.
"""

from __future__ import annotations

import base64
import ctypes
import ctypes.util
import enum
import re
from functools import cache
from typing import Any

__all__ = ["Ed25519PrivateKey", "Ed25519PublicKey", "Encoding", "InvalidSignature", "NoEncryption",
           "PrivateFormat", "PublicFormat", "available", "load_pem_private_key", "load_pem_public_key"]

_NID_ED25519 = 1087  # EVP_PKEY_ED25519 (obj_mac.h), the same in OpenSSL 1.1.1 and 3.x
_SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")  # SEQ{SEQ{OID 1.3.101.112}, BIT STRING(32 bytes)}
_PKCS8_PREFIX = bytes.fromhex("302e020100300506032b657004220420")  # SEQ{0, SEQ{OID}, OCTET{OCTET(32)}}
_PEM = re.compile(rb"-----BEGIN ([A-Z ]+)-----\s*([A-Za-z0-9+/=\s]+?)\s*-----END \1-----")


class InvalidSignature(Exception):
    """The signature does not verify with the key (``cryptography.exceptions.InvalidSignature``)."""


class Encoding(enum.Enum):
    Raw = "Raw"
    PEM = "PEM"


class PublicFormat(enum.Enum):
    Raw = "Raw"
    SubjectPublicKeyInfo = "SubjectPublicKeyInfo"


class PrivateFormat(enum.Enum):
    PKCS8 = "PKCS8"


class NoEncryption:
    """Accepted for API compatibility; this module writes no private keys."""


def _needs_cryptography(what: str) -> Exception:
    from .signing import KeyFileError

    return KeyFileError(f"{what} needs the cryptography package (pip install cryptography); without it this "
                        f"runtime only verifies signatures")


def _find_libcrypto() -> str | None:
    """The libcrypto this Python already loaded for hashlib (so one OpenSSL per process), else the system's."""
    try:
        import _hashlib  # noqa: F401 - maps libcrypto into the process
    except ImportError:
        pass
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.split()[-1]
                if "/libcrypto.so" in path:
                    return path
    except OSError:
        pass
    return ctypes.util.find_library("crypto")


@cache
def _lib() -> ctypes.CDLL | None:
    """libcrypto with the signatures of the functions used here declared, or None if it is not found."""
    path = _find_libcrypto()
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(path)
        p, size, buf = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p
        for name, restype, argtypes in (
                ("EVP_PKEY_new_raw_public_key", p, [ctypes.c_int, p, buf, size]),
                ("EVP_PKEY_new_raw_private_key", p, [ctypes.c_int, p, buf, size]),
                ("EVP_PKEY_get_raw_public_key", ctypes.c_int, [p, ctypes.c_char_p, ctypes.POINTER(size)]),
                ("EVP_PKEY_free", None, [p]),
                ("EVP_MD_CTX_new", p, []),
                ("EVP_MD_CTX_free", None, [p]),
                ("EVP_DigestVerifyInit", ctypes.c_int, [p, p, p, p, p]),
                ("EVP_DigestVerify", ctypes.c_int, [p, buf, size, buf, size]),
                ("ERR_clear_error", None, [])):
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = restype, argtypes
    except (OSError, AttributeError):
        return None
    return lib


def available() -> bool:
    """Whether OpenSSL's libcrypto (1.1.1 or later) was found."""
    return _lib() is not None


def _raw_key(raw: bytes, private: bool) -> int:
    """An ``EVP_PKEY*`` of the 32 raw bytes (caller frees); ValueError if OpenSSL refuses them."""
    lib = _lib()
    if lib is None:
        raise ValueError("OpenSSL's libcrypto was not found")
    make = lib.EVP_PKEY_new_raw_private_key if private else lib.EVP_PKEY_new_raw_public_key
    key = make(_NID_ED25519, None, raw, len(raw))
    if not key:
        lib.ERR_clear_error()
        raise ValueError("OpenSSL refused the Ed25519 key bytes")
    return key


class Ed25519PublicKey:
    """An Ed25519 public key: 32 raw bytes, verified against with OpenSSL."""

    def __init__(self, raw: bytes) -> None:
        if len(raw) != 32:
            raise ValueError(f"an Ed25519 public key is 32 bytes, got {len(raw)}")
        self._raw = bytes(raw)

    @classmethod
    def from_public_bytes(cls, data: bytes) -> Ed25519PublicKey:
        return cls(data)

    def public_bytes(self, encoding: Encoding, format: PublicFormat) -> bytes:  # noqa: A002 - cryptography's name
        if encoding is Encoding.Raw and format is PublicFormat.Raw:
            return self._raw
        if encoding is Encoding.PEM and format is PublicFormat.SubjectPublicKeyInfo:
            return _pem("PUBLIC KEY", _SPKI_PREFIX + self._raw)
        raise ValueError(f"unsupported encoding {encoding} / format {format}")

    def verify(self, signature: bytes, data: bytes) -> None:
        """Return if ``signature`` is this key's over ``data``; raise InvalidSignature otherwise."""
        lib = _lib()
        key = _raw_key(self._raw, private=False)
        ctx = lib.EVP_MD_CTX_new()
        try:
            if not ctx or lib.EVP_DigestVerifyInit(ctx, None, None, None, key) != 1:
                raise InvalidSignature("OpenSSL could not start an Ed25519 verification")
            if len(signature) != 64 or lib.EVP_DigestVerify(ctx, bytes(signature), 64, bytes(data), len(data)) != 1:
                raise InvalidSignature("the signature does not verify")
        finally:
            lib.ERR_clear_error()  # leave OpenSSL's error queue as found: hashlib and ssl read it
            lib.EVP_MD_CTX_free(ctx)
            lib.EVP_PKEY_free(key)


class Ed25519PrivateKey:
    """An Ed25519 private key read from PKCS#8; only its public half is used (signing needs cryptography)."""

    def __init__(self, seed: bytes) -> None:
        self._seed = bytes(seed)

    @classmethod
    def generate(cls) -> Ed25519PrivateKey:
        raise _needs_cryptography("making a signing key")

    def sign(self, data: bytes) -> bytes:
        raise _needs_cryptography("signing")

    def private_bytes(self, encoding: Encoding, format: PrivateFormat, encryption: Any) -> bytes:  # noqa: A002
        raise _needs_cryptography("writing a private key")

    def public_key(self) -> Ed25519PublicKey:
        lib = _lib()
        key = _raw_key(self._seed, private=True)
        try:
            out, size = ctypes.create_string_buffer(32), ctypes.c_size_t(32)
            if lib.EVP_PKEY_get_raw_public_key(key, out, ctypes.byref(size)) != 1 or size.value != 32:
                lib.ERR_clear_error()
                raise ValueError("OpenSSL could not derive the public key")
            return Ed25519PublicKey(out.raw)
        finally:
            lib.EVP_PKEY_free(key)


def _pem(label: str, der: bytes) -> bytes:
    body = base64.encodebytes(der).replace(b"\n", b"")
    lines = [body[i:i + 64] for i in range(0, len(body), 64)]
    return b"\n".join([f"-----BEGIN {label}-----".encode(), *lines, f"-----END {label}-----".encode(), b""])


def _der(data: bytes, label: str) -> bytes:
    """The DER inside the one PEM block labelled ``label``; ValueError otherwise."""
    blocks = _PEM.findall(bytes(data))
    if len(blocks) != 1 or blocks[0][0].decode() != label:
        raise ValueError(f"expected one PEM block labelled {label!r}")
    try:
        return base64.b64decode(re.sub(rb"\s+", b"", blocks[0][1]), validate=True)
    except ValueError as e:
        raise ValueError(f"bad base64 in the PEM block ({e})") from e


def load_pem_public_key(data: bytes) -> Ed25519PublicKey:
    """An Ed25519 public key from PEM SubjectPublicKeyInfo; ValueError for anything else (RSA, EC, damaged)."""
    der = _der(data, "PUBLIC KEY")
    if len(der) != len(_SPKI_PREFIX) + 32 or not der.startswith(_SPKI_PREFIX):
        raise ValueError("not an Ed25519 SubjectPublicKeyInfo (RFC 8410)")
    return Ed25519PublicKey(der[len(_SPKI_PREFIX):])


def load_pem_private_key(data: bytes, password: bytes | None = None) -> Ed25519PrivateKey:
    """An Ed25519 private key from unencrypted PEM PKCS#8; ValueError for anything else."""
    if password is not None:
        raise ValueError("encrypted private keys are not supported")
    der = _der(data, "PRIVATE KEY")
    if len(der) != len(_PKCS8_PREFIX) + 32 or not der.startswith(_PKCS8_PREFIX):
        raise ValueError("not an unencrypted Ed25519 PKCS#8 private key (RFC 8410)")
    return Ed25519PrivateKey(der[len(_PKCS8_PREFIX):])
