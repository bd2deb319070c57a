"""ONNX converters for the ops of family 'recurrent' that the generic registry lifting cannot express."""

from __future__ import annotations
