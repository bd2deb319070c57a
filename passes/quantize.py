"""``kiln.quantize``: post-training quantization of a whole model, with a per-layer error report and fallback.

The flow (each step a plain function of the pass families it names):

* lift the model (Graph, ONNX path/proto, torch module) and run
  ``canonicalize,fold-conv-bn,dce``: BatchNorm is folded into its conv/linear
  *before* the weights are quantized, so the int8 weights carry BN's scale
  (what ONNX Runtime's ``quant_pre_process`` does too);
* draw ``samples`` calibration samples with ``seed`` (the ids are kept for the
  artifact manifest) and check every one against the graph's inputs;
* ``w8a8``: optional reparameterization (``repq``: RepQ-ViT post-LN
  reparameterization; ``smoothquant``) and, with ``softmax="log2"``, RepQ-ViT's
  log-sqrt2 quantizer on softmax outputs (off by default: at 8 bits a uniform
  grid over [0, 1] measured lower error on every softmax we tried),
  then ``insert_qdq`` (activations per tensor asymmetric, weights per channel
  symmetric, int32 bias), then dce;
* ``w4a16`` / ``w8a16``: ``quantize_weights`` (RTN, GPTQ or AWQ, grouped).

The report measures, on the calibration data, every quantized layer's output
(the matmul/conv output, or its bias ``add``) against the float model: the
SQNR in the quantized model (error accumulated from every layer before it) and
the SQNR of the layer *alone* (its own quantization applied to the float
model's inputs), plus the SQNR of each model output.  SQNR is
``10 log10(sum ref^2 / sum (q - ref)^2)`` over all samples; relative MSE is
``sum (q - ref)^2 / sum ref^2``.

With ``error_budget`` (a minimum SQNR in dB for every model output), layers are
kept in float one at a time, the worst *alone* SQNR first (a layer's SQNR in the
model mostly reflects the layers before it; alone, it measures what that layer
itself costs), re-quantizing and re-measuring after each, until the outputs
meet the budget; the report lists every layer kept and why.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kiln.ir.graph import Graph, Node, Value
from kiln.ir.interpret import run_node
from kiln.ir.registry import get_op
from kiln.passes.calibrate import (
    METHODS,
    CalibrationSet,
    activations,
    as_calibration,
    check_calibration,
    draw,
)
from kiln.passes.manager import PassLog
from kiln.passes.weight_only import METHODS as WEIGHT_METHODS

from ..runtime.errors import Error

__all__ = ["KeptFloat", "LayerError", "OutputError", "QuantReport", "QuantizeError", "QuantizeOptions",
           "QuantizeResult", "check_calibration", "expand_exclude", "lift_torch", "quantize", "quantize_graph",
           "quantized_layers", "sqnr_db"]

SCHEMES = ("w8a8", "w4a16", "w8a16")
REPARAMS = ("none", "repq", "smoothquant")
SOFTMAX_QUANTIZERS = ("uniform", "log2")
QUANT_OPS = frozenset({"quantize", "dequantize"})
PREPARE_PIPELINE = "canonicalize,fold-conv-bn,dce"
WORST = 5

Progress = Callable[[str, int, int], None]


class QuantizeError(Error, ValueError):
    """Options that do not make sense together, or a model kiln cannot quantize; the message says which."""


def _choice(what: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise QuantizeError(f"quantize option {what}={value!r}: expected one of {', '.join(allowed)}")


@dataclass(frozen=True)
class QuantizeOptions:
    """What to quantize and how; see the module docstring (validated on construction)."""

    scheme: str = "w8a8"
    method: str = "minmax"
    reparam: str = "none"
    weights: str = "rtn"
    exclude: tuple[str, ...] = ()
    error_budget: float | None = None
    samples: int = 64
    seed: int = 0
    group_size: int = 128
    alpha: float = 0.5
    softmax: str = "uniform"

    def __post_init__(self) -> None:
        if isinstance(self.exclude, str):
            object.__setattr__(self, "exclude", (self.exclude,))
        object.__setattr__(self, "exclude", tuple(str(e) for e in self.exclude))
        _choice("scheme", self.scheme, SCHEMES)
        _choice("method", self.method, METHODS)
        _choice("reparam", self.reparam, REPARAMS)
        _choice("weights", self.weights, WEIGHT_METHODS)
        _choice("softmax", self.softmax, SOFTMAX_QUANTIZERS)
        if self.softmax == "log2" and self.scheme != "w8a8":
            raise QuantizeError(f"quantize option softmax='log2' quantizes softmax outputs; scheme={self.scheme!r} "
                                f"keeps activations in float")
        if self.scheme == "w8a8" and self.weights != "rtn":
            raise QuantizeError(f"quantize option weights={self.weights!r} applies to the weight-only schemes "
                                f"(w4a16, w8a16), not to scheme='w8a8' (whose weights are rounded per channel)")
        if self.weight_only and self.reparam != "none":
            raise QuantizeError(f"quantize option reparam={self.reparam!r} reparameterizes activations for "
                                f"w8a8; scheme={self.scheme!r} keeps activations in float (use weights='awq')")
        if self.weight_only and self.method != "minmax":
            raise QuantizeError(f"quantize option method={self.method!r} calibrates activation ranges; "
                                f"scheme={self.scheme!r} does not quantize activations")
        for name in ("samples", "seed", "group_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise QuantizeError(f"quantize option {name}: expected an int, got {v!r}")
        if self.samples < 0:
            raise QuantizeError(f"quantize option samples: expected >= 0 (0 = all), got {self.samples}")
        if self.group_size < 0:
            raise QuantizeError(f"quantize option group_size: expected >= 0 (0 = per output channel), "
                                f"got {self.group_size}")
        if not 0.0 <= float(self.alpha) <= 1.0:
            raise QuantizeError(f"quantize option alpha: expected a float in [0, 1], got {self.alpha}")
        if self.error_budget is not None and not math.isfinite(float(self.error_budget)):
            raise QuantizeError(f"quantize option error_budget: expected a finite SQNR in dB, "
                                f"got {self.error_budget}")

    @property
    def weight_only(self) -> bool:
        return self.scheme != "w8a8"

    @property
    def bits(self) -> int:
        return {"w8a8": 8, "w4a16": 4, "w8a16": 8}[self.scheme]


# ====================================================================== errors and the report

def sqnr_db(signal: float, noise: float) -> float:
    """Signal-to-quantization-noise ratio in dB from sums of squares (inf when there is no noise)."""
    if noise == 0.0:
        return math.inf
    if signal == 0.0 or not math.isfinite(noise):
        return -math.inf
    return 10.0 * math.log10(signal / noise)


@dataclass
class _Acc:
    """Sums of squares of a reference and of the error, accumulated over samples (float64)."""

    signal: float = 0.0
    noise: float = 0.0

    def add(self, ref: np.ndarray, got: np.ndarray) -> None:
        r, g = np.asarray(ref, np.float64), np.asarray(got, np.float64)
        self.signal += float(np.sum(r * r))
        self.noise += float(np.sum((g - r) ** 2)) if np.all(np.isfinite(g)) else math.inf

    @property
    def sqnr(self) -> float:
        return sqnr_db(self.signal, self.noise)

    @property
    def rel_mse(self) -> float:
        if self.signal == 0.0:
            return 0.0 if self.noise == 0.0 else math.inf
        return self.noise / self.signal


def _json_float(x: float | None) -> float | None:
    """A float for JSON: infinities and NaN (exact, or undefined) as null."""
    return None if x is None or not math.isfinite(x) else float(x)


@dataclass(frozen=True)
class LayerError:
    """One quantized layer: its float node name, its output (``key``, what ``exclude`` takes) and the value
    compared (``output``: the bias add's when there is one), scheme, reparameterization, and errors."""

    node: str
    key: str
    output: str
    op: str
    scheme: str
    sqnr_db: float
    rel_mse: float
    alone_sqnr_db: float | None
    reparam: str = ""

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(sqnr_db=_json_float(self.sqnr_db), rel_mse=_json_float(self.rel_mse),
                 alone_sqnr_db=_json_float(self.alone_sqnr_db))
        return d


@dataclass(frozen=True)
class OutputError:
    """One model output's error against the float model on the calibration data."""

    name: str
    sqnr_db: float
    rel_mse: float

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "sqnr_db": _json_float(self.sqnr_db), "rel_mse": _json_float(self.rel_mse)}


@dataclass(frozen=True)
class KeptFloat:
    """A layer the sensitivity fallback kept in float, and why."""

    layer: str
    node: str
    alone_sqnr_db: float | None
    output_sqnr_before: float
    output_sqnr_after: float
    reason: str

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update({k: _json_float(d[k]) for k in ("alone_sqnr_db", "output_sqnr_before", "output_sqnr_after")})
        return d


@dataclass
class QuantReport:
    """What ``kiln.quantize`` did and what it cost, per layer and per model output."""

    options: QuantizeOptions
    layers: list[LayerError]
    outputs: list[OutputError]
    calibration_seed: int
    sample_ids: tuple[str, ...]
    reparam: list[str] = field(default_factory=list)
    kept_float: list[KeptFloat] = field(default_factory=list)
    budget_met: bool | None = None
    notes: list[str] = field(default_factory=list)

    def worst(self, k: int = WORST) -> list[LayerError]:
        """The ``k`` layers with the lowest SQNR in the quantized model."""
        return sorted(self.layers, key=lambda e: e.sqnr_db)[:k]

    @property
    def output_sqnr_db(self) -> float:
        """The lowest SQNR over the model outputs (what ``error_budget`` bounds)."""
        return min((o.sqnr_db for o in self.outputs), default=math.inf)

    def to_json(self) -> dict[str, Any]:
        """The report as JSON-ready data (``--report``); infinite SQNR (no error at all) is null."""
        worst = {e.key for e in self.worst()}
        return {
            "options": {**dataclasses.asdict(self.options), "exclude": list(self.options.exclude)},
            "calibration": {"seed": self.calibration_seed, "samples": list(self.sample_ids)},
            "outputs": [o.to_json() for o in self.outputs],
            "output_sqnr_db": _json_float(self.output_sqnr_db),
            "layers": [{**e.to_json(), "worst": e.key in worst} for e in self.layers],
            "worst": [e.key for e in self.worst()],
            "reparam": list(self.reparam),
            "kept_float": [k.to_json() for k in self.kept_float],
            "error_budget_db": self.options.error_budget,
            "budget_met": self.budget_met,
            "notes": list(self.notes),
        }

    def tables(self) -> list[Any]:
        """rich renderables: the per-layer table (five worst in red), the outputs, the fallback; names from the
        model are escaped (a node named ``[bold]x`` is shown as is, not read as markup)."""
        from rich.markup import escape
        from rich.table import Table

        o = self.options
        title = (f"kiln quantize: {o.scheme}, {o.method if not o.weight_only else o.weights}, "
                 f"reparam {o.reparam}, {len(self.sample_ids)} calibration samples (seed {self.calibration_seed})")
        layers = Table(title=title, title_justify="left")
        for col in ("#", "layer", "output", "op", "scheme", "SQNR dB", "rel MSE", "alone dB", "reparam"):
            layers.add_column(col, justify="right" if col in ("#", "SQNR dB", "rel MSE", "alone dB") else "left")
        worst = {e.key for e in self.worst()}
        for i, e in enumerate(self.layers):
            style = "bold red" if e.key in worst else None
            shown = e.key if e.key == e.output else f"{e.key} (+bias: {e.output})"
            layers.add_row(str(i), escape(e.node), escape(shown), e.op, e.scheme, _fmt_db(e.sqnr_db), f"{e.rel_mse:.2e}",
                           _fmt_db(e.alone_sqnr_db), e.reparam or "-", style=style)
        budget = "" if o.error_budget is None else \
            f" (error budget {o.error_budget:g} dB: {'met' if self.budget_met else 'NOT met'})"
        outs = Table(title="model outputs vs the float model" + budget, title_justify="left")
        for col in ("output", "SQNR dB", "rel MSE"):
            outs.add_column(col, justify="left" if col == "output" else "right")
        for out in self.outputs:
            outs.add_row(escape(out.name), _fmt_db(out.sqnr_db), f"{out.rel_mse:.2e}")
        found: list[Any] = [layers, outs]
        if self.kept_float:
            kept = Table(title=f"kept in float to meet the error budget of {o.error_budget:g} dB",
                         title_justify="left")
            for col in ("layer", "output", "alone dB", "outputs dB before", "after", "why"):
                kept.add_column(col)
            for k in self.kept_float:
                kept.add_row(escape(k.node), escape(k.layer), _fmt_db(k.alone_sqnr_db),
                             _fmt_db(k.output_sqnr_before), _fmt_db(k.output_sqnr_after), escape(k.reason))
            found.append(kept)
        return found


def _fmt_db(x: float | None) -> str:
    if x is None:
        return "-"
    return "exact" if x == math.inf else f"{x:.1f}"


@dataclass
class QuantizeResult:
    """The quantized graph, its report, and the calibration seed and sample ids it was calibrated on."""

    graph: Graph
    report: QuantReport
    seed: int
    sample_ids: tuple[str, ...]

    def manifest(self) -> dict[str, Any]:
        """What an artifact manifest records about the quantization (``calibration``)."""
        o = self.report.options
        return {"scheme": o.scheme, "method": o.method, "reparam": o.reparam,
                "weights": o.weights if o.weight_only else None,
                "group_size": o.group_size if o.weight_only else None,
                "seed": self.seed, "samples": list(self.sample_ids),
                "exclude": list(o.exclude), "kept_float": [k.layer for k in self.report.kept_float],
                "output_sqnr_db": _json_float(self.report.output_sqnr_db)}


# ====================================================================== calibration checks

# ====================================================================== layers of a quantized graph

def _producer(v: Value | None) -> Node | None:
    return None if v is None else v.producer


def quantized_layers(graph: Graph) -> list[Node]:
    """The matmul/conv nodes that read at least one dequantized operand, in graph order."""
    return [n for n in graph.nodes if get_op(n.op).layer
            and any((p := _producer(v)) is not None and p.op == "dequantize" for v in n.inputs)]


def _bias_add(node: Node) -> Node | None:
    """The ``add`` right after a layer whose other operand is a dequantized int32 constant bias, if any."""
    users = node.output.users
    if len(users) != 1 or users[0].op != "add" or len(node.output.uses) != 1:
        return None
    add = users[0]
    other = [v for v in add.inputs if v is not node.output]
    p = _producer(other[0]) if len(other) == 1 else None
    if p is None or p.op != "dequantize" or not p.inputs[0].is_const or p.inputs[0].type.dtype != "i32":
        return None
    return add


def _layer_output(node: Node) -> Value:
    add = _bias_add(node)
    return add.output if add is not None else node.output


def _quant_chain(v: Value, stop: Callable[[Value], bool]) -> tuple[list[Node], set[str]] | None:
    """The quantize/dequantize nodes computing ``v`` back to non-quant values (leaves), or None."""
    nodes: list[Node] = []
    leaves: set[str] = set()
    seen: set[int] = set()

    def walk(x: Value | None) -> bool:
        if x is None or x.is_const or id(x) in seen:
            return True
        seen.add(id(x))
        p = x.producer
        if p is not None and p.op in QUANT_OPS:
            if not all(walk(i) for i in p.inputs):
                return False
            nodes.append(p)
            return True
        if not stop(x):
            return False
        leaves.add(x.name)
        return True

    return (nodes, leaves) if walk(v) else None


@dataclass
class _Layer:
    """A quantized layer and how to recompute it alone from the float model's values."""

    node: Node
    out: Value
    scheme: str
    chain: list[Node] | None
    leaves: set[str]


def _bits(dtype: str) -> int:
    return int(dtype[1:])


def _describe_dq(dq: Node) -> str:
    """``per-tensor asym``, ``per-channel sym``, ``g128 asym`` for a dequantize node.

    An activation with a zero point is asymmetric whatever its calibrated value; a constant weight is
    symmetric when its zero points are absent or all 0.
    """
    scale, zp = dq.inputs[1], (dq.inputs[2] if len(dq.inputs) > 2 else None)
    block = int(dq.attrs.get("block_size", 0) or 0)
    gran = f"g{block}" if block else ("per-tensor" if scale.type.rank == 0 or scale.type.shape == (1,)
                                       else "per-channel")
    sym = zp is None or (dq.inputs[0].is_const and zp.is_const and not np.any(zp.const.astype(np.int64)))
    return f"{gran} {'sym' if sym else 'asym'}"


def _scheme(node: Node, options: QuantizeOptions, skip: set[str]) -> str:
    """The scheme of one layer, read from the dequantize nodes that feed it (``skip``: log-sqrt2 quantized)."""
    dqs = [p if p is not None and p.op == "dequantize" else None for p in map(_producer, node.inputs[:2])]
    weights = [p for p in dqs if p is not None and p.inputs[0].is_const]
    if weights:
        w = weights[0]
        acts = [p for p in dqs if p is not None and p is not w]
        if acts:
            return (f"w{_bits(w.inputs[0].type.dtype)}a{_bits(acts[0].inputs[0].type.dtype)} act "
                    f"{_describe_dq(acts[0])} / weight {_describe_dq(w)}")
        return f"w{_bits(w.inputs[0].type.dtype)} {_describe_dq(w)} {options.weights if options.weight_only else 'rtn'}"
    if all(p is not None for p in dqs) and len({_describe_dq(p) for p in dqs}) == 1:
        return f"a{_bits(dqs[0].inputs[0].type.dtype)}a{_bits(dqs[1].inputs[0].type.dtype)} act x act " \
               f"{_describe_dq(dqs[0])}"
    return "act x act: " + " x ".join(
        f"a{_bits(p.inputs[0].type.dtype)} {_describe_dq(p)}" if p else
        f"log-sqrt2 a{options.bits}" if v is not None and v.name in skip else "float"
        for p, v in zip(dqs, node.inputs[:2]))


def _plan(graph: Graph, known: set[str], options: QuantizeOptions, skip: set[str]) -> list[_Layer]:
    """Each quantized layer, with the quant chains that recompute it from values the float model has."""
    plans = []
    for node in quantized_layers(graph):
        out = _layer_output(node)
        ops = [node] + ([out.producer] if out is not node.output else [])
        chain: list[Node] | None = []
        leaves: set[str] = set()
        for op_node in ops:
            for v in op_node.inputs:
                if v is node.output:
                    continue
                got = _quant_chain(v, lambda x: x.name in known)
                if got is None:
                    chain = None
                    break
                chain.extend(n for n in got[0] if n not in chain)
                leaves |= got[1]
            if chain is None:
                break
        plans.append(_Layer(node, out, _scheme(node, options, skip), None if chain is None else chain + ops, leaves))
    return plans


def _run_alone(layer: _Layer, env: Mapping[str, np.ndarray]) -> np.ndarray:
    """The layer's output computed by its own quantized ops from the float model's values."""
    vals: dict[int, np.ndarray] = {}

    def get(v: Value | None) -> np.ndarray | None:
        if v is None:
            return None
        if v.is_const:
            return v.const
        return vals[id(v)] if id(v) in vals else env[v.name]

    for n in layer.chain or ():
        for o, a in zip(n.outputs, run_node(n, [get(v) for v in n.inputs])):
            vals[id(o)] = a
    return vals[id(layer.out)]


# ====================================================================== the flow

def _stage(progress: Progress | None, name: str) -> Callable[[int, int], None] | None:
    if progress is None:
        return None
    return lambda done, total: progress(name, done, total)


@dataclass
class _Prepared:
    """The float graph right before QDQ insertion (after reparameterization) and what reparam did."""

    graph: Graph
    fixed: dict[str, Any]
    skip: set[str]
    records: list[Any]
    refusals: list[str]


def _reparameterize(graph: Graph, calib: CalibrationSet, o: QuantizeOptions,
                    progress: Progress | None) -> _Prepared:
    """RepQ-ViT or SmoothQuant (and the log-sqrt2 softmax quantizer) on a copy of the float graph."""
    if o.reparam == "none" and o.softmax == "uniform":
        return _Prepared(graph, {}, set(), [], [])
    from kiln.passes.reparam import log2_softmax, repq, smooth_quant

    graph = graph.clone()
    log = PassLog(o.reparam if o.reparam != "none" else "log2-softmax")
    records: list[Any] = []
    if o.reparam == "repq":
        graph, recs = repq(graph, calib, bits=o.bits, log=log, progress=_stage(progress, "repq"))
        records += recs
    elif o.reparam == "smoothquant":
        graph, recs = smooth_quant(graph, calib, alpha=float(o.alpha), log=log,
                                   progress=_stage(progress, "smoothquant"))
        records += recs
    if o.softmax == "log2":
        graph, recs = log2_softmax(graph, calib, bits=o.bits, log=log, progress=_stage(progress, "log2-softmax"))
        records += recs
    fixed: dict[str, Any] = {}
    skip: set[str] = set()
    for r in records:
        fixed.update(r.fixed)
        skip.update(r.skip)
    return _Prepared(graph, fixed, skip, records, [f"{o.reparam} refused at {r.at}: {r.reason}"
                                                   for r in log.refusals])


def _quantize_prepared(prep: _Prepared, calib: CalibrationSet, o: QuantizeOptions, exclude: Sequence[str],
                       progress: Progress | None) -> tuple[Graph, list[Any], PassLog]:
    """The QDQ (w8a8) or weight-only graph of a prepared float graph (left untouched), records and log."""
    from kiln.passes.manager import run_pipeline

    if o.weight_only:
        from kiln.passes.weight_only import quantize_weights

        log = PassLog("weight-only")
        graph, recs = quantize_weights(prep.graph, calib, bits=o.bits, method=o.weights, group_size=o.group_size,
                                       exclude=tuple(exclude), log=log)
    else:
        from kiln.passes.qdq import insert_qdq

        log = PassLog("insert-qdq")
        graph, recs = insert_qdq(prep.graph, calib, method=o.method, exclude=tuple(exclude),
                                 fixed=dict(prep.fixed), skip=frozenset(prep.skip),
                                 progress=_stage(progress, "calibrating ranges"), log=log)
    return run_pipeline(graph, "dce"), list(recs), log


def _prepare(graph: Graph) -> Graph:
    from kiln.passes.manager import run_pipeline

    return run_pipeline(graph, PREPARE_PIPELINE)


def _outputs_sqnr(qgraph: Graph, calib: CalibrationSet, want: Sequence[Mapping[str, np.ndarray]],
                  progress: Progress | None) -> list[OutputError]:
    names = [v.name for v in qgraph.outputs]
    accs = {n: _Acc() for n in names}
    for ref, got in zip(want, activations(qgraph, calib, names, progress=_stage(progress, "measuring"))):
        for n in names:
            accs[n].add(ref[n], got[n])
    return [OutputError(n, accs[n].sqnr, accs[n].rel_mse) for n in names]


def _source(v: Value) -> Value:
    """The float value a (de)quantize chain starts from."""
    while v.producer is not None and v.producer.op in QUANT_OPS:
        v = v.producer.inputs[0]
    return v


def _layer_reparam(layer: _Layer, records: Sequence[Any]) -> str:
    """What reparameterization did to this layer: records that list it as a linear, or fix or skip its inputs."""
    own = {layer.node.output.name, layer.out.name}
    inputs = {_source(v).name for v in layer.node.inputs if v is not None and not _source(v).is_const}
    return "; ".join(str(r) for r in records
                     if own & set(r.linears) or inputs & ({r.at} | set(r.fixed) | set(r.skip)))


def _record_of(layer: _Layer, records: Sequence[Any]) -> Any | None:
    """The quantizer's record of this layer (weight-only records list the matmul outputs they feed)."""
    return next((r for r in records if layer.node.output.name in (getattr(r, "outputs", None) or ())), None)


def _record_alone(layer: _Layer, records: Sequence[Any]) -> float | None:
    """A weight-only layer's SQNR alone from its record's relative output error ||X(W^ - W)|| / ||XW||."""
    err = getattr(_record_of(layer, records), "output_error", None)
    if err is None:
        return None
    return math.inf if err == 0 else -20.0 * math.log10(err)


def _awq_note(layer: _Layer, records: Sequence[Any]) -> str:
    note = getattr(_record_of(layer, records), "awq", "")
    return f"AWQ scales {note}" if note else ""


def _layer_scheme(layer: _Layer, records: Sequence[Any]) -> str:
    """The layer's scheme, with the weight quantizer its record names (AWQ falls back to RTN on shared weights)."""
    method = getattr(_record_of(layer, records), "method", None)
    if not method or not layer.scheme.startswith("w") or "act" in layer.scheme:
        return layer.scheme
    return " ".join(layer.scheme.split(" ")[:-1] + [str(method)])


def _measure(float_graph: Graph, prep: _Prepared, qgraph: Graph, records: Sequence[Any], calib: CalibrationSet,
             o: QuantizeOptions, progress: Progress | None) -> tuple[list[LayerError], list[OutputError]]:
    """Per-layer and per-output errors of ``qgraph`` against the float model on ``calib``.

    A layer's SQNR alone is recomputed from the prepared float graph's values (w8a8); weight-only
    layers take it from their quantizer's record, since AWQ rescales the layer's input in place.
    """
    float_names = {v.name for v in float_graph.values()}
    prep_names = {v.name for v in prep.graph.values()}
    plans = _plan(qgraph, prep_names if not o.weight_only else set(), o, prep.skip)
    outs = [v.name for v in qgraph.outputs]
    ref_names = set(outs) | {p.out.name for p in plans if p.out.name in float_names}
    prep_need = {n for p in plans if p.chain is not None for n in p.leaves | {p.out.name}} & prep_names
    shared = prep.graph is float_graph
    f_iter = activations(float_graph, calib, sorted(ref_names | (prep_need if shared else set())),
                         progress=_stage(progress, "float model"))
    p_iter = None if shared else activations(prep.graph, calib, sorted(prep_need))
    q_iter = activations(qgraph, calib, sorted(set(outs) | {p.out.name for p in plans}),
                         progress=_stage(progress, "quantized model"))
    acc = {id(p.node): _Acc() for p in plans}
    alone = {id(p.node): _Acc() for p in plans}
    out_acc = {n: _Acc() for n in outs}
    for fenv, qenv in zip(f_iter, q_iter):
        penv = fenv if p_iter is None else next(p_iter)
        for n in outs:
            out_acc[n].add(fenv[n], qenv[n])
        for p in plans:
            ref = fenv.get(p.out.name, penv.get(p.out.name))
            if ref is None:
                continue
            acc[id(p.node)].add(ref, qenv[p.out.name])
            if p.chain is not None:
                alone[id(p.node)].add(penv.get(p.out.name, ref), _run_alone(p, penv))
    layers = [LayerError(p.node.name or p.node.output.name, p.node.output.name, p.out.name, p.node.op,
                         _layer_scheme(p, records), acc[id(p.node)].sqnr, acc[id(p.node)].rel_mse,
                         alone[id(p.node)].sqnr if p.chain is not None else _record_alone(p, records),
                         _layer_reparam(p, prep.records) or _awq_note(p, records))
              for p in plans]
    return layers, [OutputError(n, out_acc[n].sqnr, out_acc[n].rel_mse) for n in outs]


def _calibrated(prep: _Prepared, records: Sequence[Any]) -> _Prepared:
    """``prep`` with the activation parameters insert-qdq calibrated fixed, so re-quantizing skips calibration."""
    fixed = dict(prep.fixed)
    for r in records:
        for name, qp in zip(getattr(r, "inputs", ()), getattr(r, "act_qparams", ())):
            if qp is not None:
                fixed.setdefault(name, qp)
    return dataclasses.replace(prep, fixed=fixed)


def _fallback(float_graph: Graph, prep: _Prepared, calib: CalibrationSet, o: QuantizeOptions,
              excluded: Sequence[str], layers: list[LayerError], out_sqnr: float, progress: Progress | None
              ) -> tuple[tuple[Graph, list[Any]] | None, list[KeptFloat], bool]:
    """Keep layers in float, worst alone-SQNR first, until every output meets ``o.error_budget`` dB.

    ``prep`` carries the activation ranges of the first quantization (:func:`_calibrated`): keeping a
    layer in float does not change the float activations the ranges were calibrated on.
    """
    budget = float(o.error_budget)
    if out_sqnr >= budget:
        return None, [], True
    want = list(activations(float_graph, calib, [v.name for v in float_graph.outputs]))
    ranked = sorted(layers, key=lambda e: (e.alone_sqnr_db if e.alone_sqnr_db is not None else e.sqnr_db))
    exclude = list(excluded)
    kept: list[KeptFloat] = []
    found = None
    for e in ranked:
        exclude.append(e.key)
        qgraph, records, _ = _quantize_prepared(prep, calib, o, exclude, progress)
        found = (qgraph, records)
        after = min((x.sqnr_db for x in _outputs_sqnr(qgraph, calib, want, progress)), default=math.inf)
        alone = e.alone_sqnr_db if e.alone_sqnr_db is not None else e.sqnr_db
        kept.append(KeptFloat(e.key, e.node, e.alone_sqnr_db, out_sqnr, after,
                              f"worst remaining layer ({_fmt_db(alone)} dB "
                              f"{'alone' if e.alone_sqnr_db is not None else 'in the model'}) while the outputs "
                              f"were at {_fmt_db(out_sqnr)} dB < budget {budget:g} dB"))
        out_sqnr = after
        if after >= budget:
            return found, kept, True
    return found, kept, False


def _layer_names(node: Node) -> list[str]:
    """A layer's node name, output, and the output of the bias ``add`` that alone reads it (reparam may add one)."""
    names = [node.name, node.outputs[0].name]
    users = node.outputs[0].users
    if len(users) == 1 and users[0].op == "add" and any(v is not None and v.is_const for v in users[0].inputs):
        names.append(users[0].outputs[0].name)
    return names


def expand_exclude(graph: Graph, patterns: Sequence[str]) -> tuple[str, ...]:
    """The output names of the matmul/conv layers whose node or output name matches a pattern (fnmatch).

    A pattern that matches no layer is an error listing the layers, so a typo does not quantize a layer
    the user meant to keep in float. A layer's bias-add output counts as its name too.
    """
    layers = [n for n in graph.nodes if get_op(n.op).layer]
    found: list[str] = []
    for p in patterns:
        hits = [n.outputs[0].name for n in layers if any(x and fnmatch.fnmatchcase(x, p) for x in _layer_names(n))]
        if not hits:
            names = ", ".join(f"{n.name} ({n.outputs[0].name})" if n.name else n.outputs[0].name for n in layers[:30])
            raise QuantizeError(f"exclude {p!r} matches no matmul/conv layer of @{graph.name}; its layers: "
                                f"{names or 'none'}{' ...' if len(layers) > 30 else ''}")
        found.extend(h for h in hits if h not in found)
    return tuple(found)


def quantize_graph(graph: Graph, calibration: Any, options: QuantizeOptions | None = None, *,
                   progress: Progress | None = None) -> QuantizeResult:
    """Quantize a kiln Graph (left unmodified) on ``calibration``; see the module docstring."""
    o = options or QuantizeOptions()
    float_graph = _prepare(graph.clone())
    if not float_graph.inputs:
        raise QuantizeError(f"graph @{float_graph.name} has no inputs: there is nothing to calibrate")
    calib = draw(as_calibration(calibration), o.samples, o.seed)
    check_calibration(float_graph, calib)
    if o.reparam == "none":
        expand_exclude(float_graph, o.exclude)  # fail before calibrating (reparam may add layer names)
    prep = _reparameterize(float_graph, calib, o, progress)
    exclude = expand_exclude(prep.graph, o.exclude)
    qgraph, records, log = _quantize_prepared(prep, calib, o, exclude, progress)
    layers, outputs = _measure(float_graph, prep, qgraph, records, calib, o, progress)
    notes = prep.refusals + [f"left in float: {r.at}: {r.reason}" for r in log.refusals]
    if not layers:
        notes.append("no layer was quantized (no matmul/conv with a constant weight or quantizable inputs)")
    report = QuantReport(o, layers, outputs, o.seed, calib.ids, [str(r) for r in prep.records],
                         notes=notes)
    if o.error_budget is not None:
        fb, kept, met = _fallback(float_graph, _calibrated(prep, records), calib, o, exclude, layers,
                                  report.output_sqnr_db, progress)
        report.budget_met = met
        if not met and prep.skip:
            report.notes.append(f"the outputs miss the error budget even with every layer in float: the "
                                f"values {sorted(prep.skip)} stay quantized by the log-sqrt2 softmax quantizer")
        if fb is not None:
            qgraph, records = fb
            report.layers, report.outputs = _measure(float_graph, prep, qgraph, records, calib, o, progress)
            report.kept_float = kept
    return QuantizeResult(qgraph, report, o.seed, calib.ids)


def quantize(model: Any, calibration: Any, options: QuantizeOptions | None = None, *,
             example_inputs: Any = None, progress: Progress | None = None, limits: Any = None,
             **overrides: Any) -> QuantizeResult:
    """Quantize ``model`` (Graph, ONNX path or proto, zoo name, torch module) after ``calibration``.

    ``calibration`` is anything :func:`kiln.passes.calibrate.as_calibration` takes (a
    directory of ``.npz``, one stacked ``.npz``, a list of ``{input: array}``);
    ``overrides`` replace fields of ``options`` (``quantize(m, data, scheme="w4a16")``).
    A torch module is exported with the calibration arrays' names as its input
    names (in sample order), on ``example_inputs`` or else the first sample.
    ``progress(stage, done, total)`` follows each pass over the calibration samples.
    ``limits`` (a :class:`kiln.runtime.limits.Limits`) bounds the constants lifting materializes.
    """
    from kiln.compiler import _is_torch_module, resolve_model

    try:
        o = dataclasses.replace(options or QuantizeOptions(), **overrides)
    except TypeError as e:
        names = ", ".join(f.name for f in dataclasses.fields(QuantizeOptions))
        raise QuantizeError(f"kiln.quantize: {e}; options are {names}") from None
    calib = as_calibration(calibration)
    if isinstance(model, Graph):
        graph = model
    elif _is_torch_module(model) and len(calib):
        graph = lift_torch(model, calib, example_inputs)
    else:
        graph = resolve_model(model, example_inputs, limits=limits).graph
    return quantize_graph(graph, calib, o, progress=progress)


def lift_torch(module: Any, calib: CalibrationSet, example_inputs: Any) -> Graph:
    """Export a torch module with the calibration samples' array names as its input names, and lift it."""
    import torch

    from kiln import frontend

    names = list(calib.samples[0])
    if example_inputs is None:
        example_inputs = tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in calib.samples[0].values())
    args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    if len(args) != len(names):
        raise QuantizeError(f"{type(module).__name__}: {len(args)} example inputs but the calibration samples "
                            f"hold {len(names)} arrays {names}")
    return frontend.lift(frontend.export(module, args, input_names=names))
