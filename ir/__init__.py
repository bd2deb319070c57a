"""kiln's graph IR: types, values, nodes, graphs, the op registry, verifier, text format and interpreter."""

from .graph import Graph, Node, Value, structurally_equal
from .interpret import InputError, InterpretError, interpret
from .registry import Attr, FusionKind, OnnxSpec, OpDef, OpTypeError, all_ops, get_op, infer_types
from .text import ParseError, parse, print_graph
from .types import TensorType
from .verify import VerifyError, verify

__all__ = [
    "Attr", "FusionKind", "Graph", "InputError", "InterpretError", "Node", "OnnxSpec", "OpDef",
    "OpTypeError", "ParseError", "TensorType", "Value", "VerifyError", "all_ops", "get_op",
    "infer_types", "interpret", "parse", "print_graph", "structurally_equal", "verify",
]
