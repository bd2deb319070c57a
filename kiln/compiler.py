"""``kiln.compile``: a model (torch module, ONNX path or proto, zoo name, kiln Graph) -> an :class:`Artifact`.

The flow: export/lift to kiln IR, run the pass pipeline, bind symbolic dims
(from the example inputs, ``shapes``, else 1), lower every block to a
scheduled TVM kernel, build the Relax VM executable, and pack library,
weights, IR text and manifest into one artifact (``art.save(path)``).
"""

from __future__ import annotations

import datetime
import functools
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kiln import __version__
from kiln.ir.graph import Graph
from kiln.ir.text import print_graph
from kiln.ir.types import bind_shape, is_static_dim
from kiln.runtime.artifact import ArtifactContents, write_artifact
from kiln.runtime.errors import Error, caused_by_interrupt
from kiln.runtime.limits import DEFAULT_LIMITS, Limits

QUANTIZED_PIPELINE = "dce,fuse-qlinear,dce,fuse-blocks"
"""Default passes after :func:`kiln.quantize` (which already canonicalized and folded BatchNorm): integer
kernels for the QDQ layers, and no ``canonicalize``, whose constant folding would turn the int8 weights'
``dequantize`` back into float."""

__all__ = ["QUANTIZED_PIPELINE", "Artifact", "CompileError", "Resolved", "compile", "initial_params", "model_inputs", "resolve_model"]


class CompileError(Error):
    """A model kiln cannot compile; the message names the stage and the cause."""


@dataclass
class Artifact(ArtifactContents):
    """A compiled model in memory (the artifact's members, plus compile statistics): :meth:`save` writes it."""

    stats: dict[str, Any] = field(default_factory=dict)
    params: dict[str, np.ndarray] = field(default_factory=dict)
    sign: Any = field(default=True, kw_only=True)  # True: the local key; a key (path, PEM, object); False: unsigned
    graph: Graph | None = field(default=None, kw_only=True, repr=False)  # the final IR with its constants

    def save(self, path: str | os.PathLike) -> str:
        """Write the artifact (atomically), signed as ``self.sign`` says, and return its path."""
        path = os.fspath(path)
        write_artifact(path, library=self.library, weights=self.weights, ir_text=self.ir_text,
                       manifest=self.manifest, sign=self.sign)
        self.stats["artifact_bytes"] = os.path.getsize(path)
        return path

    def load(self, **kwargs: Any):
        """A runtime Session for this artifact (saved to a temporary file and loaded from it; built here, so trusted)."""
        from kiln.runtime import load

        if self.sign is False or self.sign is None:
            kwargs.setdefault("allow_unsigned", True)
        elif self.sign is not True:
            kwargs.setdefault("trusted_keys", [self.sign])
        with tempfile.TemporaryDirectory(prefix="kiln-") as d:
            return load(self.save(os.path.join(d, "model.kiln")), **kwargs)


def _is_torch_module(model: Any) -> bool:
    mod = type(model).__module__
    return mod.startswith("torch") or any(c.__module__.startswith("torch.nn") for c in type(model).__mro__)


@dataclass
class Resolved:
    """A model lifted into kiln IR, with its label, example inputs and (params as inputs) initial weights."""

    graph: Graph
    label: str
    example_inputs: Any
    params: dict[str, np.ndarray] = field(default_factory=dict)
    examples: dict[str, np.ndarray] = field(default_factory=dict)  # example inputs by ONNX input name
    specialized: dict[str, np.ndarray] = field(default_factory=dict)  # inputs bound to a value by lift


def resolve_model(model: Any, example_inputs: Any = None, *, params_as_inputs: bool = False,
                  limits: Limits | None = None) -> Resolved:
    """Lift any accepted model form into kiln IR (with ``params_as_inputs``, weights become inputs).

    With example inputs, a graph input that lift names as deciding a compile-time operand (a Reshape's
    shape, reduction axes, Pad's pads...) is specialized to its example value
    (:func:`kiln.frontend.lift.lift_specialized`); ``graph.meta["specialized"]`` lists those inputs.
    """
    from kiln import frontend
    from kiln.frontend.lift import lift_specialized

    if isinstance(model, Graph):
        return Resolved(model.clone(), model.name, example_inputs)
    if isinstance(model, (str, os.PathLike)) and not os.path.exists(model):
        from kiln import zoo  # imported only here: it loads torch

        if str(model) not in zoo.names():
            raise CompileError(f"{os.fspath(model)!r}: no such file, and not a zoo model ({', '.join(zoo.names())})")
        label = str(model)
        if example_inputs is None:
            _, example_inputs = zoo.get(label)
        proto = zoo.onnx_model(label)
    elif _is_torch_module(model):
        if example_inputs is None:
            raise CompileError("compiling a torch module needs example_inputs (a tuple of tensors)")
        proto, label = frontend.export(model, example_inputs), type(model).__name__
    else:
        proto = model  # lifted from the path itself, so that errors name the file
        label = os.fspath(model) if isinstance(model, (str, os.PathLike)) else "model"
    examples = _onnx_examples(proto, example_inputs)
    if examples:
        graph = lift_specialized(proto, examples, params_as_inputs=params_as_inputs, limits=limits)
    else:
        graph = frontend.lift(proto, params_as_inputs=params_as_inputs, limits=limits)
    params = initial_params(frontend.load_model(proto), graph) if params_as_inputs else {}
    return Resolved(graph, label, example_inputs, params, examples, _specialized(proto, graph))


def _specialized(proto: Any, graph: Graph) -> dict[str, np.ndarray]:
    """The inputs lift specialized, as arrays of the ONNX input's dtype."""
    values = graph.meta.get("specialized") or {}
    if not values:
        return {}
    from kiln import frontend
    from kiln.frontend.dtypes import kiln_dtype
    from kiln.ir.types import to_numpy_dtype

    types = {i.name: i.type.tensor_type.elem_type for i in frontend.load_model(proto).graph.input}
    return {n: np.asarray(v, dtype=to_numpy_dtype(kiln_dtype(types[n]))) for n, v in values.items()}


def _onnx_examples(proto: Any, example_inputs: Any) -> dict[str, np.ndarray]:
    """Example inputs by the ONNX model's graph-input names (positional ones in the model's order)."""
    if example_inputs is None:
        return {}
    if isinstance(example_inputs, Mapping):
        return {k: _numpy(v) for k, v in example_inputs.items()}
    from kiln import frontend

    gp = frontend.load_model(proto).graph
    inits = {t.name for t in gp.initializer}
    names = [i.name for i in gp.input if i.name not in inits]
    items = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    if len(items) != len(names):
        raise CompileError(f"got {len(items)} example inputs, the model takes {len(names)}: {names}")
    return {n: _numpy(a) for n, a in zip(names, items)}


def _numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def initial_params(proto: Any, graph: Graph) -> dict[str, np.ndarray]:
    """The ONNX initializer values of the graph's parameter inputs (``graph.meta["params"]``)."""
    from onnx import numpy_helper

    names = set(graph.meta.get("params", ()))
    return {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer if t.name in names}


def model_inputs(graph: Graph) -> list:
    """The graph inputs that are the model's own (not parameters lifted as inputs)."""
    params = set(graph.meta.get("params", ()))
    return [v for v in graph.inputs if v.name not in params]


def _as_arrays(graph: Graph, example_inputs: Any) -> dict[str, np.ndarray]:
    if example_inputs is None:
        return {}
    if isinstance(example_inputs, Mapping):
        return {k: np.asarray(v) for k, v in example_inputs.items()}
    items = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    arrays = [x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x) for x in items]
    own = model_inputs(graph)
    if len(arrays) != len(own):
        raise CompileError(f"got {len(arrays)} example inputs, the model takes {len(own)}: "
                           f"{[v.name for v in own]}")
    return {v.name: a for v, a in zip(own, arrays)}


def bind_symbols(graph: Graph, example: Mapping[str, np.ndarray],
                 shapes: Mapping[str, int] | None = None) -> dict[str, int]:
    """Values of the graph's symbolic dims: ``shapes`` first, then the example inputs, then 1 (with a warning).

    A ``shapes`` key that is no symbol of the graph (a typo, or any key for a static model) or a negative
    value is an error: silently ignoring it would compile something other than what was asked for."""
    known = sorted({s for v in graph.values() for d in v.type.shape if not is_static_dim(d) for s in _symbols(d)})
    for k, val in (shapes or {}).items():
        if k not in known:
            has = f"its symbolic dims are {known}" if known else "it has no symbolic dims (every shape is static)"
            raise CompileError(f"shapes: {k!r} is not a symbolic dim of graph @{graph.name}; {has}")
        if isinstance(val, bool) or int(val) != val or int(val) < 0:
            raise CompileError(f"shapes: {k}={val!r}: a dim is an integer >= 0")
    env: dict[str, int] = {k: int(v) for k, v in (shapes or {}).items()}
    for v in graph.inputs:
        if v.name in example:
            err = bind_shape(v.type.shape, tuple(np.asarray(example[v.name]).shape), env)
            if err:
                raise CompileError(f"example input {v.name!r}: expected shape {v.type}, "
                                   f"got {list(np.asarray(example[v.name]).shape)}: {err}")
    free = sorted({d for v in graph.values() for d in v.type.shape if not is_static_dim(d)
                   for d in _symbols(d)} - set(env))
    if free:
        warnings.warn(f"symbolic dims {free} have no value (no example inputs or --shape): compiling for 1",
                      stacklevel=4)  # bind_symbols < compile < its error wrapper < the caller
        env.update({s: 1 for s in free})
    return env


def _symbols(dim: Any) -> list[str]:
    import re

    return re.findall(r"[A-Za-z_][A-Za-z0-9_]*", str(dim))


def _output_aliases(graph: Graph) -> list[bool]:
    """Per output: may its memory be an input's, a weight's or an earlier output's (so the runtime copies it)?"""
    from kiln.ir.registry import is_view

    producer = {id(v): n for n in graph.nodes for v in n.outputs}
    inputs = {id(v) for v in graph.inputs}
    seen: set[int] = set()
    out = []
    for v in graph.outputs:
        root = v
        while id(root) in producer and is_view(producer[id(root)].op):
            root = producer[id(root)].inputs[0]
        out.append(id(root) in inputs or root.const is not None or id(root) in seen)
        seen.add(id(root))
    return out


def _specialized_signature(values: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
    """Manifest entries of the specialized inputs: name, dtype, shape and the value they were bound to."""
    return [{"name": n, "dtype": str(a.dtype), "shape": list(a.shape), "value": a.tolist()}
            for n, a in values.items()]


def _signature(values: Sequence[Any]) -> list[dict[str, Any]]:
    from kiln.codegen.lowering import tvm_dtype

    return [{"name": v.name, "dtype": tvm_dtype(v.type.dtype), "shape": list(v.type.shape)} for v in values]


INDEX_LIMIT = (1 << 31) - 1
"""Most elements one tensor may have: TVM's kernels index with int32 (past it: TVM check failures)."""


def _compile_errors(fn: Callable[..., Artifact]) -> Callable[..., Artifact]:
    """Make everything ``compile`` raises on bad input a ``kiln.Error``: TVM's errors, RecursionError and
    MemoryError become a CompileError naming the model; an interrupt that TVM wrapped in its own error
    type (its message names KeyboardInterrupt) is a KeyboardInterrupt again."""

    @functools.wraps(fn)
    def wrapper(model: Any, *args: Any, **kwargs: Any) -> Artifact:
        try:
            return fn(model, *args, **kwargs)
        except Error:
            raise
        except Exception as e:  # noqa: BLE001 - the API boundary
            if caused_by_interrupt(e):
                raise KeyboardInterrupt("interrupted while compiling") from e
            label = _model_label(model)
            if isinstance(e, RecursionError):
                raise CompileError(f"{label}: the model is nested too deeply to compile (Python's recursion "
                                   f"limit)") from None
            if isinstance(e, MemoryError):
                raise CompileError(f"{label}: out of memory while compiling; a constant or tensor of the model "
                                   f"is too large") from None
            first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")[:300]
            raise CompileError(f"{label}: compiling failed: {type(e).__name__}"
                               + (f": {first}" if first else "")) from e

    return wrapper


def _model_label(model: Any) -> str:
    if isinstance(model, (str, os.PathLike)):
        return os.fspath(model)
    return getattr(model, "name", None) or type(model).__name__


def check_sizes(graph: Graph, limits: Limits = DEFAULT_LIMITS) -> None:
    """Refuse a (specialized) graph before codegen when a value has more elements than TVM can index or a
    constant is past ``limits.constant_bytes`` (codegen materializes every constant as a weight)."""
    from kiln.runtime.limits import check_limit

    for v in graph.values():
        if not v.type.is_static:
            continue
        n = int(np.prod([int(d) for d in v.type.shape], dtype=object))
        if n > INDEX_LIMIT:
            raise CompileError(f"@{graph.name}: value {v.name!r} has shape {v.type} = {n:,} elements; TVM "
                               f"indexes tensors with 32-bit integers (at most {INDEX_LIMIT:,} elements)")
        if v.const is not None:
            check_limit(limits, "constant_bytes", n * v.const.dtype.itemsize,
                        f"@{graph.name}: constant {v.name!r} ({v.type})")


@_compile_errors
def compile(model: Any, example_inputs: Any = None, *, passes: str | None = None, target: Any = None,
            shapes: Mapping[str, int] | None = None, tune: int = 0, tune_db: str | None = None,
            params_as_inputs: bool = False, instruments: Any = None,
            progress: Callable[[str, int, int], None] | None = None,
            quantize: Any = None, calibration: Any = None, limits: Limits | None = None,
            sign: Any = True) -> Artifact:
    """Compile ``model`` ahead of time for ``target`` (default: this machine's CPU).

    With ``quantize`` (a :class:`kiln.passes.quantize.QuantizeOptions`, or True for
    the defaults) the lifted model is first quantized by :func:`kiln.quantize` on
    ``calibration``; the default pipeline is then :data:`QUANTIZED_PIPELINE`, the
    manifest's ``calibration`` records scheme, method, seed and sample ids, and
    ``stats["quantize"]`` holds the report.

    With ``params_as_inputs`` the weights are named inputs of the artifact (listed
    in its manifest under ``params``); their initial values are ``artifact.params``.
    ``instruments`` (:class:`kiln.passes.manager.Instruments`) sets IR dumps and
    the per-pass interpreter check; the per-pass records are ``stats["passes"]``.
    ``limits`` (default :data:`kiln.runtime.limits.DEFAULT_LIMITS`) bounds the constants lift and
    codegen materialize (``constant_bytes``).

    Everything raised for bad input is a ``kiln.Error``; a target whose code kiln's runtime cannot
    load (not ``llvm``, another architecture) is refused before any work.

    ``sign`` is how :meth:`Artifact.save` signs: True (default) with this user's local key
    (``$KILN_HOME/signing.key``, created on first use), a PEM private key path, PEM bytes or an
    Ed25519PrivateKey, or False for unsigned (loadable only with ``allow_unsigned``); a bad key
    is refused here, before the compile.
    """
    if sign is not True and sign is not False and sign is not None:
        from kiln.runtime.signing import load_private_key

        sign = load_private_key(sign)
    quantized = _quantize_options(quantize, calibration, params_as_inputs)
    from kiln.codegen.build import build_graph, specialize
    from kiln.codegen.kernel import CodegenError
    from kiln.codegen.target import check_runnable, host_target, parse_target, target_summary

    limits = limits or DEFAULT_LIMITS
    tgt = parse_target(target) if target is not None else host_target()
    check_runnable(tgt)
    from kiln.passes.manager import (
        DEFAULT_PIPELINE,
        format_pipeline,
        parse_pipeline,
        run_pipeline_report,
    )

    t0 = time.perf_counter()
    default = DEFAULT_PIPELINE if quantized is None else QUANTIZED_PIPELINE
    pipeline = parse_pipeline(passes if passes is not None else default)
    if quantized is not None and _is_torch_module(model):
        from kiln.passes.calibrate import as_calibration
        from kiln.passes.quantize import lift_torch

        calibration = as_calibration(calibration)
        resolved = Resolved(lift_torch(model, calibration, example_inputs), type(model).__name__, example_inputs)
    else:
        resolved = resolve_model(model, example_inputs, params_as_inputs=params_as_inputs, limits=limits)
    graph, label, example_inputs = resolved.graph, resolved.label, resolved.example_inputs
    t_lift = time.perf_counter() - t0
    qresult = None
    if quantized is not None:
        from kiln.passes.quantize import quantize_graph

        qresult = quantize_graph(graph, calibration, quantized,
                                 progress=None if progress is None else lambda s, d, n: progress(f"calibrate:{s}", d, n))
        graph = qresult.graph
    passed = run_pipeline_report(graph, pipeline, instruments)
    graph = passed.graph
    declared = graph.clone()
    symbols = bind_symbols(graph, resolved.examples or _as_arrays(graph, example_inputs), shapes)
    try:
        from kiln.codegen.tune import TuneOptions

        opts = TuneOptions(tune, Path(tune_db) if tune_db else None) if tune else None
        concrete = specialize(graph, symbols)
        check_sizes(concrete, limits)
        compiled = build_graph(concrete, tgt, tune=opts, progress=progress, limits=limits)
    except CodegenError as e:
        raise CompileError(f"{label}: code generation failed: {e}") from e
    with tempfile.TemporaryDirectory(prefix="kiln-") as d:
        lib_path = os.path.join(d, "lib.so")
        compiled.executable.export_library(lib_path)
        with open(lib_path, "rb") as f:
            library = f.read()
    total = time.perf_counter() - t0
    manifest = _manifest(declared, compiled, tgt, format_pipeline(pipeline), symbols, label)
    manifest["specialized"] = _specialized_signature(resolved.specialized)
    if qresult is not None:
        manifest["calibration"] = qresult.manifest()
    stats = {"model": label, "nodes": len(graph.nodes), "kernels": len(compiled.kernels),
             "unique_kernels": compiled.unique_kernels, "compile_s": total, "lift_s": t_lift,
             **{f"{k}_s": v for k, v in compiled.timings.items()},
             "weights_bytes": int(sum(a.nbytes for a in compiled.weights.values())),
             "library_bytes": len(library), "target": target_summary(tgt),
             "notes": [f"{k.name}: {n}" for k in compiled.kernels for n in k.notes],
             "passes": passed.records, "quantize": qresult.report if qresult is not None else None}
    return Artifact(manifest, library, compiled.weights, _ir_text(declared), stats, resolved.params, sign=sign,
                    graph=declared)


def _ir_text(graph: Graph) -> str:
    """The graph as IR text for people and tools, big constants elided (their data is weights.npz: printed
    again they made GPT's model.ir 18 MB, the largest member and most of the load time); the
    ``specialized`` map (in the manifest) is left out of its attributes."""
    if "specialized" not in graph.meta:
        return print_graph(graph, elide_constants=True)
    g = graph.clone()
    g.meta.pop("specialized")
    return print_graph(g, elide_constants=True)


def _quantize_options(quantize: Any, calibration: Any, params_as_inputs: bool) -> Any:
    """The QuantizeOptions ``compile`` was asked for (None: no quantization); bad combinations are errors."""
    if quantize is None or quantize is False:
        if calibration is not None:
            raise CompileError("calibration data was given but quantize is off: pass quantize=True or "
                               "QuantizeOptions(...)")
        return None
    from kiln.passes.quantize import QuantizeOptions

    if calibration is None:
        raise CompileError("quantizing needs calibration data (a directory of .npz, one .npz, or a list of "
                           "{input: array}); got none")
    if params_as_inputs:
        raise CompileError("cannot quantize with params_as_inputs: quantization needs the weights as constants")
    if quantize is True:
        return QuantizeOptions()
    if not isinstance(quantize, QuantizeOptions):
        raise CompileError(f"quantize: expected QuantizeOptions or True, got {type(quantize).__name__}")
    return quantize


def _manifest(graph: Graph, compiled: Any, target: Any, pipeline: str, symbols: Mapping[str, int],
              label: str) -> dict[str, Any]:
    import tvm

    from kiln.codegen.target import target_summary

    summary = target_summary(target)
    target_dict = {k: summary[k] for k in ("kind", "mcpu", "mtriple", "num-cores") if summary.get(k)}
    if target.attrs.get("mattr"):
        target_dict["mattr"] = [str(a) for a in target.attrs["mattr"]]
    features = _cpu_features(target, target_dict)
    return {
        "kiln_version": __version__,
        "tvm_version": tvm.__version__,
        "model": label,
        "target": target_dict,
        "cpu_features": features,
        "pipeline": pipeline,
        "inputs": _signature(graph.inputs),
        "params": list(graph.meta.get("params", [])),
        "outputs": [{**sig, "aliases": alias} for sig, alias in zip(_signature(graph.outputs), _output_aliases(graph))],
        "symbols": dict(symbols),
        "weights": list(compiled.weights),
        "entry": "main",
        "kernels": [{"name": k.name, "op": k.node.op, "ops": [n.op for n in k.nodes], "kind": k.kind,
                     **({"tuning": k.tuning} if k.tuning else {})}
                    for k in compiled.kernels],
        "calibration": None,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _cpu_features(target: Any, target_dict: Mapping[str, Any]) -> list[str]:
    """The CPU flags the code may use: LLVM's own feature set of the target's mcpu + mattr (with everything
    they imply), plus the runtime's table for them; the runtime refuses the artifact on a CPU lacking any."""
    from kiln.runtime.cpu import flags_of_llvm_features, required_cpu_features, target_arch

    features = set(required_cpu_features(target_dict))
    if target_dict.get("kind") == "llvm" and target_arch(target_dict) in (None, "x86_64"):
        from tvm.target.codegen import llvm_get_cpu_features

        features |= set(flags_of_llvm_features(str(f) for f in llvm_get_cpu_features(target)))
    return sorted(features)
