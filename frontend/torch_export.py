"""torch.nn.Module -> onnx.ModelProto, with torch's dynamo exporter (TorchScript only as a fallback).

The dynamo exporter runs with its own optimizer switched off; its output (or the
TorchScript fallback's) then goes through onnxscript's default optimizer
(constant folding, dead-code removal, the cleanup rewrites that turn
SplitToSequence/SequenceAt into Split and drop CastLike, ...) *minus* the rules
that fold BatchNormalization into Conv/Gemm: folding norms is kiln's own pass
(``fold-conv-bn``), so the exported graph keeps the model's BatchNormalization
nodes. The optimizer costs under 0.3 s on every zoo model. The result is
self-contained (every initializer inline), has an IR version ONNX Runtime 1.31
accepts, uses only the default ONNX domain for the zoo, and passes
``onnx.checker``.

Set ``KILN_DEBUG=1`` to see the exporter's own progress lines, logs and warnings.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import os
import re
import signal
import threading
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import onnx
import torch

from ..runtime.errors import Error, caused_by_interrupt

if TYPE_CHECKING:
    import onnx_ir

__all__ = ["MAX_IR_VERSION", "MIN_OPSET", "ExportError", "ExportFallbackWarning", "export"]

MIN_OPSET = 18
"""Lowest opset kiln exports at: at opset 17 the exporter's Split carries an attribute ORT rejects."""

MAX_IR_VERSION = 10
"""IR version kiln writes: onnx 1.23 writes 14, ONNX Runtime 1.31 reads at most 13."""

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class ExportError(Error, RuntimeError):
    """A module could not be exported to ONNX; the message names the module class and the exporter's error."""


class ExportFallbackWarning(UserWarning):
    """The dynamo exporter failed and the TorchScript exporter was used instead."""


def export(
    module: torch.nn.Module,
    example_inputs: tuple[Any, ...] | torch.Tensor,
    *,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    opset: int = MIN_OPSET,
    dynamic_shapes: Mapping[str, Any] | Sequence[Any] | None = None,
) -> onnx.ModelProto:
    """Export ``module`` (in eval mode, without grad) to a checked, self-contained ONNX model."""
    if opset < MIN_OPSET:
        raise ValueError(f"kiln exports at opset {MIN_OPSET} or newer, not {opset}")
    args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    names_in = list(input_names) if input_names is not None else None
    names_out = list(output_names) if output_names is not None else None
    with _eval_mode(module), torch.no_grad():
        sigint = _Sigint()
        try:
            with _quiet(), _watch_sigint(sigint):
                model = _export_dynamo(module, args, names_in, names_out, opset, dynamic_shapes)
        except Exception as dynamo_error:
            if sigint.hit or caused_by_interrupt(dynamo_error):
                raise KeyboardInterrupt("interrupted during the dynamo export") from dynamo_error
            reason = _summary(dynamo_error)
            try:
                with _quiet(), _watch_sigint(sigint):
                    model = _export_torchscript(module, args, names_in, names_out, opset, dynamic_shapes)
            except Exception as ts_error:
                if sigint.hit or caused_by_interrupt(ts_error):
                    raise KeyboardInterrupt("interrupted during the TorchScript export") from ts_error
                raise ExportError(
                    f"cannot export {_class_name(module)} to ONNX: the dynamo exporter failed with {reason}; "
                    f"the TorchScript fallback failed with {_summary(ts_error)} (KILN_DEBUG=1 shows the exporter log)"
                ) from ts_error
            warnings.warn(
                f"the dynamo exporter failed on {_class_name(module)} ({reason}); "
                "exported with the TorchScript exporter instead",
                ExportFallbackWarning,
                stacklevel=2,
            )
    return _finish(model, module)


# ------------------------------------------------------------------ the two exporters


def _export_dynamo(
    module: torch.nn.Module,
    args: tuple[Any, ...],
    input_names: list[str] | None,
    output_names: list[str] | None,
    opset: int,
    dynamic_shapes: Mapping[str, Any] | Sequence[Any] | None,
) -> onnx.ModelProto:
    """Export with ``torch.onnx.export(dynamo=True)`` and kiln's choice of optimizer rules."""
    program = torch.onnx.export(
        module,
        args,
        dynamo=True,
        opset_version=opset,
        input_names=input_names,
        output_names=output_names,
        dynamic_shapes=dynamic_shapes,
        optimize=False,
        verify=False,
        report=False,
        verbose=None if _debug() else False,
    )
    _optimize(program.model)
    return program.model_proto


def _optimize(model: onnx_ir.Model) -> None:
    """onnxscript's default ``optimize`` (fold, rewrite, clean up) in place, minus BatchNorm folding."""
    import onnx_ir.passes.common as common
    from onnxscript import rewriter
    from onnxscript.optimizer import fold_constants_ir
    from onnxscript.rewriter.rules.common import (
        fuse_batchnorm_into_conv_rule,
        fuse_batchnorm_into_conv_transpose_rule,
        fuse_batchnorm_into_gemm_rule,
    )

    kept_norms = (fuse_batchnorm_into_conv_rule, fuse_batchnorm_into_conv_transpose_rule,
                  fuse_batchnorm_into_gemm_rule)
    # onnxscript 0.7.2 (pinned) exposes its default rule list only under this private name.
    rules = [r for r in rewriter._DEFAULT_REWRITE_RULES if not any(r is k for k in kept_norms)]
    common.InlinePass()(model)
    rewrite = rewriter.RewritePass(rules)
    for _ in range(2):
        changed = fold_constants_ir(model, onnx_shape_inference=True).modified
        changed = rewrite(model).modified or changed
        for cleanup in (common.RemoveUnusedNodesPass(), common.RemoveUnusedFunctionsPass(),
                        common.RemoveUnusedOpsetsPass()):
            cleanup(model)
        if not changed:
            break
    for final in (
        common.RemoveUnusedNodesPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.LiftSubgraphInitializersToMainGraphPass(),
        common.DeduplicateInitializersPass(),
        common.CommonSubexpressionEliminationPass(),
        common.OutputFixPass(),
        common.NameFixPass(),
    ):
        final(model)


def _export_torchscript(
    module: torch.nn.Module,
    args: tuple[Any, ...],
    input_names: list[str] | None,
    output_names: list[str] | None,
    opset: int,
    dynamic_shapes: Mapping[str, Any] | Sequence[Any] | None,
) -> onnx.ModelProto:
    """Export with the legacy TorchScript exporter (BatchNorm kept: mode PRESERVE), then kiln's optimizer."""
    buffer = io.BytesIO()
    torch.onnx.export(
        module,
        args,
        buffer,
        dynamo=False,
        opset_version=opset,
        input_names=input_names,
        output_names=output_names,
        dynamic_axes=_dynamic_axes(module, args, input_names, dynamic_shapes),
        training=torch.onnx.TrainingMode.PRESERVE,
        external_data=False,
    )
    import onnx_ir

    model = onnx_ir.serde.deserialize_model(onnx.load_from_string(buffer.getvalue()))
    _optimize(model)
    return onnx_ir.serde.serialize_model(model)


def _dynamic_axes(
    module: torch.nn.Module,
    args: tuple[Any, ...],
    input_names: list[str] | None,
    dynamic_shapes: Mapping[str, Any] | Sequence[Any] | None,
) -> dict[str, dict[int, str]] | None:
    """``dynamic_shapes`` (per-input ``{axis: Dim}``, by position or forward-argument name) as ``dynamic_axes``."""
    if dynamic_shapes is None:
        return None
    names = input_names or [f"input_{i}" for i in range(len(args))]
    if isinstance(dynamic_shapes, Mapping):
        params = list(inspect.signature(module.forward).parameters)
        per_input = [dynamic_shapes.get(p) for p in params[: len(args)]]
    else:
        per_input = list(dynamic_shapes)
    axes: dict[str, dict[int, str]] = {}
    for name, spec in zip(names, per_input):
        if spec is None:
            continue
        if not isinstance(spec, Mapping):
            raise ValueError(f"dynamic shape spec for {name!r} must be a {{axis: Dim}} mapping, not {spec!r}")
        axes[name] = {int(a): getattr(d, "__name__", None) or f"{name}_dim{a}" for a, d in spec.items()}
    return axes


# ------------------------------------------------------------------ post-processing


def _finish(model: onnx.ModelProto, module: torch.nn.Module) -> onnx.ModelProto:
    """Cap the IR version, insist that every initializer is inline, and run onnx.checker."""
    model.ir_version = min(model.ir_version, MAX_IR_VERSION)
    external = [t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        raise ExportError(f"export of {_class_name(module)} left initializers in external data: {external[:5]}")
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"export of {_class_name(module)} produced an invalid ONNX model: {e}") from e
    return model


# ------------------------------------------------------------------ helpers


@contextlib.contextmanager
def _eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """Put ``module`` in eval mode for the block and restore every submodule's training flag afterwards."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporter's prints, torch log lines and warnings, unless KILN_DEBUG is set."""
    if _debug():
        yield
        return
    torch_logger = logging.getLogger("torch")
    old_level = torch_logger.level
    torch_logger.setLevel(logging.ERROR)
    sink = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        torch_logger.setLevel(old_level)


class _Sigint:
    """Whether a SIGINT arrived while :func:`_watch_sigint` was active."""

    hit = False


@contextlib.contextmanager
def _watch_sigint(seen: _Sigint) -> Iterator[None]:
    """Record a SIGINT during the block (then handle it as before: KeyboardInterrupt by default).

    The dynamo exporter catches the KeyboardInterrupt deep inside and re-raises an unrelated error
    (an AttributeError), which must not be mistaken for an export failure and trigger the fallback.
    """
    previous = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
    if previous is None or previous == signal.SIG_IGN:  # another thread, or SIGINT ignored (nohup, `cmd &`)
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        seen.hit = True
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _debug() -> bool:
    """Whether KILN_DEBUG asks for the exporter's own output."""
    return bool(os.environ.get("KILN_DEBUG"))


def _summary(error: BaseException, limit: int = 300) -> str:
    """``Type (RootType: first line of the root cause)``: short enough for a one-line error or warning."""
    root = error
    while root.__cause__ is not None:
        root = root.__cause__
    first = next((line.strip() for line in _ANSI.sub("", str(root)).splitlines() if line.strip()), "")
    if len(first) > limit:
        first = first[: limit - 3] + "..."
    text = f"{type(root).__name__}: {first}" if first else type(root).__name__
    return text if root is error else f"{type(error).__name__} ({text})"


def _class_name(module: torch.nn.Module) -> str:
    """The module's class, qualified by its Python module, e.g. ``kiln.zoo.GPT``."""
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"
