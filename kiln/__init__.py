"""kiln: an ahead-of-time compiler for neural-network graphs.

Stages live in subpackages: ``kiln.frontend`` (torch/ONNX in and out),
``kiln.ir`` (graph IR, registry, verifier, text, interpreter), ``kiln.passes``,
``kiln.codegen``, ``kiln.runtime``, ``kiln.fuzz``; ``kiln.zoo`` holds the example models.

``kiln.compile(model, ...) -> Artifact`` and ``kiln.load(path) -> Session`` are
imported on first use, so that ``import kiln`` (and the runtime) stays light.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Artifact", "compile", "load"]


def __getattr__(name: str) -> Any:
    if name in ("compile", "Artifact"):
        from . import compiler

        return getattr(compiler, name)
    if name == "load":
        from kiln.runtime import load

        return load
    raise AttributeError(f"module 'kiln' has no attribute {name!r}")
