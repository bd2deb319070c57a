"""Ops of family 'transformer': references against onnxruntime / ONNX's reference, type rules."""

from __future__ import annotations

COVERED: set[str] = set()
