"""kiln: an ahead-of-time compiler for neural-network graphs.

Stages live in subpackages: ``kiln.frontend`` (torch/ONNX in and out),
``kiln.ir`` (graph IR, registry, verifier, text, interpreter), ``kiln.passes``,
``kiln.codegen``, ``kiln.runtime``, ``kiln.fuzz``; ``kiln.zoo`` holds the example models.

``kiln.compile(model, ...) -> Artifact``, ``kiln.load(path) -> Session`` and
``kiln.quantize(model, calibration, ...) -> QuantizeResult`` (post-training
quantization with an error report, :mod:`kiln.passes.quantize`) are imported on
first use, so that ``import kiln`` (and the runtime) stays light. Every error kiln raises
for bad input is a ``kiln.Error`` (:mod:`kiln.runtime.errors`).
"""

from __future__ import annotations

from typing import Any

from kiln.runtime.errors import ArtifactError, Error, InputError, LimitError, TrustError

__version__ = "0.1.0"
__all__ = [
    "Artifact", "ArtifactError", "Error", "InputError", "LimitError", "QuantizeOptions", "TrustError",
    "compile", "load", "quantize",
]


def __getattr__(name: str) -> Any:
    if name in ("compile", "Artifact"):
        from . import compiler

        return getattr(compiler, name)
    if name in ("quantize", "QuantizeOptions"):
        from kiln.passes import quantize as quantize_module

        return getattr(quantize_module, name)
    if name == "load":
        from kiln.runtime import load

        return load
    raise AttributeError(f"module 'kiln' has no attribute {name!r}")
