"""ONNX converters for the ops of family 'nn_extra' that the generic registry lifting cannot express."""

from __future__ import annotations
