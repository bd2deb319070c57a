"""Errors the frontend raises for bad or unsupported input.

Every error is a ``FrontendError`` (a ``ValueError``) whose message says what is
wrong, where (file, node, value) and, when there is one, how to avoid it. The
CLI prints the message as one line; tests check the message, not just the type.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ..runtime.errors import Error


class FrontendError(Error, ValueError):
    """Base class: the model cannot be lifted (or lowered); the message says why."""


class InvalidModelError(FrontendError):
    """The input is not a well-formed ONNX model (not protobuf, truncated, no graph, broken wiring)."""


class DanglingInputError(InvalidModelError):
    """A node reads a value that no node, initializer or graph input defines."""

    def __init__(self, message: str, node: str, value: str):
        super().__init__(message)
        self.node = node
        self.value = value


class OpsetError(FrontendError):
    """The model's default-domain opset is outside what kiln supports."""


class LoweringError(FrontendError):
    """A kiln graph cannot be written as ONNX at the requested opset."""


@dataclass
class Unsupported:
    """One refusal: an op kiln does not have, or a use of an op kiln cannot express."""

    op_type: str
    domain: str
    opset: int
    node_names: list[str] = field(default_factory=list)
    reason: str = ""
    dynamic: bool = False  # refused because a compile-time operand is computed at run time
    version: bool = False  # refused because the model's opset defines a version of the op kiln lacks
    nearest: str | None = None  # the supported op closest to an unknown one (FusedMatMul -> MatMul)
    inputs: list[str] = field(default_factory=list)  # graph inputs whose values decide a dynamic operand

    @property
    def count(self) -> int:
        return len(self.node_names)

    @property
    def is_custom(self) -> bool:
        return self.domain not in ("", "ai.onnx")


_HINT_STANDARD = (
    "How to avoid: kiln implements these standard ops at no opset, so re-exporting will not help; rewrite the "
    "module so that the op is decomposed into supported ops before export (the nearest supported op is named "
    "where there is one), or file an issue with the model attached if kiln should support it. "
    "kiln.frontend.supported_ops() lists what kiln lifts."
)
_HINT_CUSTOM = (
    "Custom-domain ops are not standard ONNX: they come from a runtime-specific optimizer (e.g. "
    "onnxruntime's transformer fusions) or a custom exporter; export the plain model without them."
)
_HINT_DYNAMIC = (
    "kiln needs shapes, axes and pads as compile-time constants: give the graph inputs static shapes "
    "(kiln.frontend.lift(model, input_shapes={name: [dims]})) or export the model with static shapes."
)
_HINT_SPECIALIZE = (
    "The value of graph input(s) {names} decides a compile-time operand: specialize it with "
    "kiln.frontend.lift(model, input_values={{name: array}}) or kiln.compile(model, example_inputs=...), "
    "which binds it to that value (the compiled artifact then refuses any other value at run time)."
)
_HINT_VERSION = (
    "These ops exist in kiln at an older version only: re-export the model with the opset named per op, "
    "or convert it (onnx.version_converter.convert_version(model, N))."
)
_HINT_FEATURE = (
    "These nodes use an ONNX op in a way kiln cannot express (the reason is given per node); "
    "export the model in inference mode (module.eval()) with static shapes, or file an issue."
)


def _names(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


class UnsupportedOpsError(FrontendError):
    """Every unsupported op of the model, listed at once (op type, domain, opset, node names, count)."""

    def __init__(self, items: Sequence[Unsupported], source: str = "the model"):
        self.items = list(items)
        n_nodes = sum(i.count for i in self.items)
        lines = [f"{source} cannot be lifted: {n_nodes} node(s) use ops or features kiln does not "
                 f"support ({len(self.items)} kind(s)):"]
        for it in self.items:
            domain = it.domain or "ai.onnx"
            what = f"{it.op_type} (domain {domain}, opset {it.opset})"
            if it.reason:
                what += f" - {it.reason}"
            elif it.nearest:
                what += f" - not supported; nearest supported op: {it.nearest}"
            lines.append(f"  - {what}: {it.count} node(s): {_names(it.node_names)}")
        hints = []
        if any(not i.is_custom and not i.reason for i in self.items):
            hints.append(_HINT_STANDARD)
        if any(i.is_custom for i in self.items):
            hints.append(_HINT_CUSTOM)
        if any(i.dynamic for i in self.items):
            hints.append(_HINT_DYNAMIC)
        if self.specializable:
            hints.append(_HINT_SPECIALIZE.format(names=_names(self.specializable)))
        if any(i.version for i in self.items):
            hints.append(_HINT_VERSION)
        if any(i.reason and not i.dynamic and not i.version and not i.is_custom for i in self.items):
            hints.append(_HINT_FEATURE)
        lines.extend(hints)
        super().__init__("\n".join(lines))

    @property
    def op_types(self) -> list[str]:
        return sorted({i.op_type for i in self.items})

    @property
    def specializable(self) -> list[str]:
        """Graph inputs whose values decide refused dynamic operands (in first-seen order)."""
        return list(dict.fromkeys(n for i in self.items if i.dynamic for n in i.inputs))


class DynamicShapeError(UnsupportedOpsError):
    """Every refusal is a compile-time operand (shape, axes, pads...) that the model computes at run time."""
