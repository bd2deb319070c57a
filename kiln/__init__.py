"""kiln: an ahead-of-time compiler for neural-network graphs.

Stages live in subpackages: ``kiln.frontend`` (torch/ONNX in and out),
``kiln.ir`` (graph IR, registry, verifier, text, interpreter), ``kiln.passes``,
``kiln.codegen``, ``kiln.runtime``, ``kiln.fuzz``; ``kiln.zoo`` holds the example models.
"""

__version__ = "0.1.0"
