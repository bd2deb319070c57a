"""ONNX converters for the ops of family 'math' that the generic registry lifting cannot express."""

from __future__ import annotations
