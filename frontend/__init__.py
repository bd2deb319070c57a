"""kiln's frontend: ONNX -> kiln IR (``lift``, ``canonicalize``), kiln IR -> ONNX (``lower_to_onnx``)
and torch -> ONNX (``export``, imported on first use so that ``import kiln.frontend`` does not load torch).
"""

from __future__ import annotations

from typing import Any

from .canonicalize import Refusal, canonicalize, canonicalize_with_report
from .errors import (
    DanglingInputError,
    DynamicShapeError,
    FrontendError,
    InvalidModelError,
    LoweringError,
    OpsetError,
    Unsupported,
    UnsupportedOpsError,
)
from .lift import lift, lift_specialized, load_model, supported_ops
from .lower import lower_to_onnx

__all__ = [
    "DanglingInputError", "DynamicShapeError", "FrontendError", "InvalidModelError", "LoweringError",
    "OpsetError", "Refusal", "Unsupported", "UnsupportedOpsError", "canonicalize", "canonicalize_with_report",
    "export", "lift", "lift_specialized", "load_model", "lower_to_onnx", "supported_ops",
]


def __getattr__(name: str) -> Any:
    if name == "export":
        from .torch_export import export
        globals()["export"] = export
        return export
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
