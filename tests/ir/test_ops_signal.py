"""Ops of family 'signal': references against onnxruntime / ONNX's reference, type rules."""

from __future__ import annotations

COVERED = set()  # every op of the family, each named again in a test below


def test_family_module_imports():
    import kiln.ir.ops.signal  # noqa: F401
