"""ONNX converters for the ops of family 'math' that the generic registry lifting cannot express.

None are needed: IsNaN, IsInf, Acos ... Tan, Celu, Selu, Mish, Softsign, Shrink, ThresholdedRelu,
Swish (opset 24), Xor, BitShift (BitShift-28 semantics, which contain BitShift-11's) and
BitwiseAnd/Or/Xor/Not map 1:1, attributes by name, from their registry OnnxSpecs (ir/ops/math.py).
"""

from __future__ import annotations
