"""kiln's runtime: load a compiled artifact (one zip file) and run it, with numpy in and out.

``load(path) -> Session``; ``Session.run({name: array}) -> {name: array}``.
Importing this package imports neither TVM nor torch; ``load`` imports TVM
(with torch blocked) on first use.
"""

from __future__ import annotations

from .artifact import FORMAT_VERSION, ArtifactContents, ArtifactError, read_artifact, write_artifact
from .session import InputError, Session, TensorSpec, configure_threads, load

__all__ = [
    "FORMAT_VERSION",
    "ArtifactContents",
    "ArtifactError",
    "InputError",
    "Session",
    "TensorSpec",
    "configure_threads",
    "load",
    "read_artifact",
    "write_artifact",
]
