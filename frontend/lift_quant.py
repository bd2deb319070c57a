"""ONNX converters for ONNX's quantized operators (QLinear*, *Integer, DynamicQuantizeLinear)."""

from __future__ import annotations
