"""kiln's runtime: load a compiled artifact (one zip file) and run it, with numpy in and out.

``load(path) -> Session``; ``Session.run({name: array}) -> {name: array}``.
An artifact holds native code, so ``load`` runs only artifacts signed by a
trusted key (:mod:`kiln.runtime.signing`) unless told ``allow_unsigned=True``,
and bounds what a file may make it allocate (:class:`Limits`).
Importing this package imports neither TVM nor torch; ``load`` loads the TVM
runtime library through ``tvm_ffi`` (with torch blocked) on first use and never
imports the ``tvm`` Python package.  The same files are the ``kiln-runtime``
distribution (import name ``kiln_runtime``, ``make runtime-wheel``), so they import
each other relatively and nothing from the rest of kiln.
"""

from __future__ import annotations

from .artifact import FORMAT_VERSION, ArtifactContents, ArtifactError, read_artifact, write_artifact
from .errors import Error, LimitError, TrustError
from .limits import DEFAULT_LIMITS, Limits
from .session import InputError, Session, TensorSpec, configure_threads, load
from .signing import TrustInfo

__all__ = [
    "DEFAULT_LIMITS",
    "FORMAT_VERSION",
    "ArtifactContents",
    "ArtifactError",
    "Error",
    "InputError",
    "LimitError",
    "Limits",
    "Session",
    "TensorSpec",
    "TrustError",
    "TrustInfo",
    "configure_threads",
    "load",
    "read_artifact",
    "write_artifact",
]
