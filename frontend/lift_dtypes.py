"""ONNX converters for Cast/CastLike/BitCast and other element-type ops."""

from __future__ import annotations
