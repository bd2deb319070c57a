"""Scale reparameterization before quantization: RepQ-ViT, SmoothQuant, the log-√2 softmax quantizer.

Formulas from passes-math.md section 3. Linear layers are ``matmul(x, W[K, N])``
with a constant weight, optionally followed by ``add(·, b[N])``; the "input
channels" of a linear are the rows of W (torch's ``W·diag(r)`` on [out, in] is
``diag(r)·W`` here). Weight and vector arithmetic is done in float64 and cast
back to the constant's dtype. Each core function rewrites ``graph`` in place,
returns it with one :class:`ReparamRecord` per rewrite, and sends rewrites and
refusals to ``log`` when given one; ``calib`` is a :class:`CalibrationSet` or a
function returning one (called only when something needs calibrating).

**repq** (RepQ-ViT, post-LN channel-wise -> layer-wise). For each layer_norm
whose output (or ``add(β)`` right after a bias-less norm) is read only by
linears, directly or through ops that move whole rows (the consumers of
:func:`kiln.passes.norm.plan_fold`): the per-channel min/max over the
calibration set, widened to include 0 (so every zero point lies in the integer
range, as ORT's activation formula), gives an unsigned ``bits``-bit scale
s = (max - min)/(2^b - 1) and zero point z = round(-min/s) per channel; then
s~ = mean(s) rounded to float32 (the scale insert-qdq stores), z~ = round(mean(z)),
r1 = s/s~, r2 = z - z~ and

    γ~ = γ / r1,   β~ = (β + s·r2) / r1,   W~ = diag(r1)·W,   b~ = b - (s·r2)·W

(a β and a bias add are created when needed). Exact in float. Because z~ is an
integer so is r2, and round(y~/s~) + z~ = round(y/s + r2) + z~ = round(y/s) + z: the
per-tensor codes of the new activation equal the per-channel codes of the old
one exactly (up to float rounding at exact ties). A channel that is 0 over the
whole calibration set keeps r1 = 1, r2 = 0 (s := s~, z := z~; s~ and z~ are
means over the other channels). ``.fixed`` maps the norm output and every
linear input reading it to (s~, z~ - 2^(b-1)): the zero point in the signed
``bits``-bit range, i.e. int8 for bits=8 (ORT's int8 zero point is the uint8 one
minus 128). Refused (graph left alone, reason logged): a layer_norm not over the
last axis or with a symbolic width, a non-constant γ/β, a consumer that is not a
linear, a non-constant weight, a weight also read outside those linears, an
output that is a graph output, non-finite calibration values, an activation that
is 0 in every channel. A norm output that other ops read directly as well (Post-LN: the
residual add) is reparameterized all the same: those readers get y = ỹ·r1 - s·r2 back through an
inserted ``mul``/``add`` (exact in float; codegen fuses it into the add). Per-channel min/max ranges need enough calibration data:
every channel is clipped at its own calibrated range, so on new inputs a small
set costs more than it gains (zoo ViT d=16, int8 insert-qdq, output SQNR on 16
new inputs without -> with repq: 24.1 -> 17.8 dB calibrated on 8 samples,
29.2 -> 29.1 dB on 64, 29.9 -> 31.0 dB on 256; on the calibration samples
themselves +1.6 to +4.8 dB).

**smoothquant** (SmoothQuant). Linears that read the same activation X form a
group (for a norm, all linears of its ``plan_fold``). Per input channel
s_j = max|X_j|^α / max_i|W_ij|^(1-α), clamped to >= 1e-5 (the weight maximum over
all W of the group, itself clamped to >= 1e-5, as ``smooth.py``); every W gets
``diag(s)·W`` and 1/s is folded into the producer of X: a norm's γ and β (or its
bias add), else a linear whose output only the group reads (its W's columns and
its bias), else ``X.smoothed = mul(X, 1/s)`` is inserted before the group. All
scales are computed on the original graph, then applied. Refused: a weight also
read outside the group, non-finite calibration values.

**log2-softmax** (RepQ-ViT's log-√2 quantizer for post-softmax activations).
After every softmax whose output feeds a matmul, the matmul reads instead

    c = round_half_even(-2·log2(a/Δ)),  q = clip(c, 0, 2^b - 1),
    â = 0 where c >= 2^b (NaN stays NaN), else Δ·2^(-q/2)

as float ops (div, log, mul, round, clip, mul, pow, mul, greater_equal, where),
named ``<a>.log2q.*`` with the codes in ``<a>.log2q.code`` and â in
``<a>.log2q``; other readers keep the float softmax. Δ is the candidate with the
smallest squared error over the calibration values among the 0.999, 0.9999 and
0.99999 quantiles (RepQ-ViT) and 1.0 (softmax outputs are <= 1, so Δ = 1 never
clips, and it is the data-free choice), over at most ``MAX_DELTA_VALUES``
calibration values per softmax (a seeded subset). ``.skip`` names â: insert-qdq
must not quantize it again. Refused: non-finite calibration values. This pass
changes the model's outputs by design.

Measured (tests/passes/test_reparam.py): the log-√2 grid keeps ~19 % relative
precision down to Δ·2^-127, so it wins in squared error only where most weights
are small against a uniform step: 8 bits on 197-token rows of small logit spread
against a uniform grid over [0, 1] (MSE 3.4e-7 vs 1.3e-6), 4 bits on peaked rows
against a uniform grid over [0, calibrated max] (5.5e-6 vs 4.0e-5). At 8 bits a
uniform quantizer over [0, max] had 10-840x lower MSE on every softmax
distribution tried, and on a small random ViT (d=32, 2 layers) adding
log2-softmax to repq + insert-qdq lowered the output SQNR from 26.3 to 21.2 dB:
it is meant for low-bit attention.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from kiln.ir.graph import Graph, Node, Value
from kiln.ir.types import FLOAT_DTYPES

from .calibrate import CalibrationSet, activations, calibration_for
from .manager import Pass, PassLog, register_pass
from .norm import (
    NORMS,
    FoldPlan,
    _add_bias,
    _bias_add,
    _f64,
    _is_output,
    _keeps_rows,
    _norm_vector,
    _rebuild,
    _replace_const,
    plan_fold,
)

__all__ = ["DELTA_QUANTILES", "MAX_DELTA_VALUES", "Log2Softmax", "RepQ", "ReparamRecord", "SmoothQuant",
           "log2_fake_quant", "log2_softmax", "repq", "smooth_quant"]

DELTA_QUANTILES = (0.999, 0.9999, 0.99999)
MAX_DELTA_VALUES = 1 << 21  # softmax values kept per output to choose Δ (quantiles and MSE)
SMOOTH_MIN = 1e-5
Calib = CalibrationSet | Callable[[], CalibrationSet]
Progress = Callable[[int, int], None]
QParams = tuple[float, int]


@dataclass(frozen=True)
class ReparamRecord:
    """One rewrite: which pass, where (a value name), what it did, the linears it touched, and what insert-qdq
    must respect: ``fixed`` per-tensor (scale, zero point) for named activations, ``skip`` values not to quantize."""

    kind: str
    at: str
    what: str
    linears: tuple[str, ...] = ()
    fixed: dict[str, QParams] = field(default_factory=dict)
    skip: tuple[str, ...] = ()

    def __str__(self) -> str:
        return f"{self.kind} at %{self.at}: {self.what}"


# ====================================================================== shared helpers


def _calibration(calib: Calib) -> CalibrationSet:
    """The calibration set itself, or the one the factory makes."""
    return calib if isinstance(calib, CalibrationSet) else calib()


def _channel_stats(graph: Graph, calib: CalibrationSet, names: list[str],
                   progress: Progress | None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-channel (last axis) min and max of each named value over all samples, in float64."""
    stats: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for env in activations(graph, calib, names, progress=progress):
        for n in names:
            a = np.asarray(env[n], np.float64)
            a = a.reshape(-1, a.shape[-1]) if a.ndim else a.reshape(1, 1)
            if a.size == 0:
                continue
            lo, hi = a.min(axis=0), a.max(axis=0)
            if n in stats:
                lo, hi = np.minimum(stats[n][0], lo), np.maximum(stats[n][1], hi)
            stats[n] = (lo, hi)
    return stats


def _non_finite(name: str, stats: dict[str, tuple[np.ndarray, np.ndarray]]) -> str | None:
    """The refusal for a value with no values or a non-finite range on the calibration set."""
    if name not in stats:
        return f"%{name} is empty on every calibration sample: there is nothing to calibrate"
    if np.all(np.isfinite(stats[name][0])) and np.all(np.isfinite(stats[name][1])):
        return None
    return f"%{name} is not finite on the calibration set (NaN or Inf): no scale can be computed from it"


def _report(log: PassLog | None, records: list[ReparamRecord]) -> None:
    if log is not None:
        for r in records:
            log.rewrote(r.at, r.what)


def _refuse(log: PassLog | None, at: str, reason: str) -> None:
    if log is not None:
        log.refuse(at, reason)


def _vector_const(old: Value, vec: np.ndarray) -> np.ndarray:
    """``vec`` ([d], float64) in ``old``'s dtype, and in its shape when it has d entries."""
    arr = vec.reshape(old.const.shape) if old.const.size == vec.size else vec
    return arr.astype(old.const.dtype)


def _weight_refusal(graph: Graph, linears: list[Node], where: str) -> str | None:
    """The reason to refuse when a linear's weight is read by anything outside ``linears`` (or is an output)."""
    ids = {id(n) for n in linears}
    for mm in linears:
        w = mm.inputs[1]
        foreign = [(n, i) for n, i in w.uses if id(n) not in ids or i != 1]
        other = f"{foreign[0][0].op} %{foreign[0][0].outputs[0].name} (operand {foreign[0][1]})" if foreign else \
            ("the graph outputs" if _is_output(graph, w) else None)
        if other is not None:
            return (f"weight %{w.name} of matmul %{mm.output.name} is also read by {other}, outside the linears "
                    f"that read {where}: scaling its rows would change that reader (untie the weight first)")
    return None


def _distinct_weights(linears: list[Node]) -> list[tuple[Value, list[tuple[Node, int]]]]:
    """Each distinct current weight of ``linears`` with its (matmul, 1) uses among them."""
    weights: dict[int, tuple[Value, list[tuple[Node, int]]]] = {}
    for mm in linears:
        weights.setdefault(id(mm.inputs[1]), (mm.inputs[1], []))[1].append((mm, 1))
    return list(weights.values())


def _scale_rows(graph: Graph, linears: list[Node], rows: np.ndarray, tag: str) -> None:
    """Every weight of ``linears`` becomes ``diag(rows)·W``."""
    for w, uses in _distinct_weights(linears):
        _replace_const(graph, w, (rows[:, None] * _f64(w)).astype(w.const.dtype), uses, tag)


def _width(v: Value) -> int | None:
    """The static size of ``v``'s last axis."""
    d = v.type.shape[-1] if v.type.rank else None
    return d if isinstance(d, int) else None


# ====================================================================== RepQ-ViT


@dataclass(frozen=True)
class _RepqParams:
    """Per-channel scale s and zero point z (unsigned), the layer-wise s~, z~, and r1 = s/s~, r2 = z - z~."""

    s: np.ndarray
    z: np.ndarray
    s_t: float
    z_t: int
    bits: int

    @property
    def r1(self) -> np.ndarray:
        return self.s / self.s_t

    @property
    def r2(self) -> np.ndarray:
        return self.z - self.z_t

    @property
    def fixed(self) -> QParams:
        """(s~, z~) with the zero point moved to the signed range (int8 for 8 bits)."""
        return self.s_t, self.z_t - 2 ** (self.bits - 1)


def _repq_params(lo: np.ndarray, hi: np.ndarray, bits: int) -> _RepqParams | None:
    """RepQ-ViT's layer-wise quantizer for per-channel ranges [lo, hi] (widened to include 0); None if all are 0."""
    qmax = 2 ** bits - 1
    lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
    s = (hi - lo) / qmax
    live = s > 0
    if not live.any():
        return None
    z = np.zeros_like(s)
    z[live] = np.clip(np.rint(-lo[live] / s[live]), 0, qmax)
    s_t = float(np.float32(s[live].mean()))
    z_t = int(np.rint(z[live].mean()))
    s, z = np.where(live, s, s_t), np.where(live, z, z_t)
    return _RepqParams(s, z, s_t, z_t, bits)


def _other_readers(graph: Graph, norm: Node) -> list[tuple[Node, int]]:
    """Direct readers of a norm's output that are neither a linear's input nor a row-moving op (Post-LN: the
    residual add); repq gives them the original activation back through a compensating affine."""
    return [(u, i) for u, i in norm.output.uses
            if not (u.op == "matmul" and i == 0) and not _keeps_rows(u, i) and _bias_add(graph, norm.output) is None]


def _repq_candidate(graph: Graph, norm: Node) -> tuple[FoldPlan, list[tuple[Node, int]]] | str:
    """The fold plan of a layer_norm RepQ-ViT can reparameterize and its other readers, or why it cannot."""
    if _width(norm.inputs[0]) is None:
        return f"the normalized width of %{norm.inputs[0].name} {norm.inputs[0].type} is not static"
    others = _other_readers(graph, norm)
    plan = plan_fold(graph, norm, frozenset(id(u) for u, _ in others))
    if isinstance(plan, str):
        return plan
    if not plan.matmuls:
        return "no linear reads it"
    return _weight_refusal(graph, plan.matmuls, f"%{_norm_out(plan).name}") or (plan, others)


def _restore_for(graph: Graph, y: Value, others: list[tuple[Node, int]], r1: np.ndarray, shift: np.ndarray) -> None:
    """Give ``others`` the original activation y = ỹ·r1 - s·r2 of the reparameterized ``y`` (exact in float)."""
    order = {id(n): k for k, n in enumerate(graph.nodes)}
    before = min((n for n, _ in others), key=lambda n: order[id(n)])
    dt = y.type.np_dtype
    r = graph.add_constant(r1.astype(dt), graph.fresh_name(f"{y.name}.repq_r1"))
    t = graph.add_constant((-shift).astype(dt), graph.fresh_name(f"{y.name}.repq_shift"))
    scaled = graph.add_node("mul", [y, r], before=before, out_names=[graph.fresh_name(f"{y.name}.repq_scaled")])
    restored = graph.add_node("add", [scaled.output, t], before=before,
                              out_names=[graph.fresh_name(f"{y.name}.repq_restored")])
    for n, i in others:
        graph.set_input(n, i, restored.output)


def _norm_out(plan: FoldPlan) -> Value:
    """The activation a fold plan's linears see: the norm's output, or its β add's."""
    return plan.beta_add.output if plan.beta_add is not None else plan.norm.output


def _set_beta(graph: Graph, plan: FoldPlan, beta: np.ndarray, tag: str) -> None:
    """Give the plan's norm the bias ``beta`` ([d], float64): its β operand, its β add, or a new β operand."""
    norm = plan.norm
    if plan.beta_add is not None:
        add = plan.beta_add
        i = 1 if add.inputs[0] is norm.output else 0
        _replace_const(graph, add.inputs[i], _vector_const(add.inputs[i], beta), [(add, i)], tag)
    elif len(norm.inputs) > 2 and norm.inputs[2] is not None:
        _replace_const(graph, norm.inputs[2], _vector_const(norm.inputs[2], beta), [(norm, 2)], tag)
    elif np.any(beta):
        b = graph.add_constant(beta.astype(norm.inputs[1].const.dtype), graph.fresh_name(f"{norm.output.name}.bias"))
        _rebuild(graph, norm, inputs=[norm.inputs[0], norm.inputs[1], b])


def _current_beta(plan: FoldPlan, d: int) -> np.ndarray:
    """The norm's β as a float64 [d] vector (zeros when it has none)."""
    if plan.beta_add is not None:
        add = plan.beta_add
        return _norm_vector(add.inputs[1 if add.inputs[0] is plan.norm.output else 0], d)
    b = plan.norm.inputs[2] if len(plan.norm.inputs) > 2 else None
    return np.zeros(d) if b is None else _norm_vector(b, d)


def _apply_repq(graph: Graph, plan: FoldPlan, p: _RepqParams) -> None:
    """γ~ = γ/r1, β~ = (β + s·r2)/r1, W~ = diag(r1)·W, b~ = b - (s·r2)·W for one norm and its linears."""
    norm = plan.norm
    d = norm.inputs[0].type.shape[-1]
    r1, shift = p.r1, p.s * p.r2
    gamma, beta = _norm_vector(norm.inputs[1], d), _current_beta(plan, d)
    deltas = {id(mm): -(shift @ _f64(mm.inputs[1])) for mm in plan.matmuls}
    _scale_rows(graph, plan.matmuls, r1, "repq")
    if np.any(shift):
        for mm, add in zip(plan.matmuls, plan.biases):
            _add_bias(graph, mm, add, deltas[id(mm)])
    _replace_const(graph, norm.inputs[1], _vector_const(norm.inputs[1], gamma / r1), [(norm, 1)], "repq")
    _set_beta(graph, plan, (beta + shift) / r1, "repq")


def repq(graph: Graph, calib: Calib, *, bits: int = 8, log: PassLog | None = None,
         progress: Progress | None = None) -> tuple[Graph, list[ReparamRecord]]:
    """RepQ-ViT: make each post-LN activation per-tensor quantizable by moving its channel scales into γ, β, W, b."""
    if not 2 <= bits <= 8:
        raise ValueError(f"repq: bits must be in 2..8 (the zero point goes to insert-qdq's int8), got {bits}")
    plans: list[FoldPlan] = []
    others: dict[int, list[tuple[Node, int]]] = {}
    for node in graph.nodes:
        if node.op != "layer_norm":
            continue
        cand = _repq_candidate(graph, node)
        if isinstance(cand, str):
            _refuse(log, node.output.name, cand)
        else:
            plans.append(cand[0])
            others[id(cand[0].norm)] = cand[1]
    if not plans:
        return graph, []
    names = [_norm_out(p).name for p in plans]
    stats = _channel_stats(graph, _calibration(calib), names, progress)
    records = []
    for plan, name in zip(plans, names):
        reason = _non_finite(name, stats)
        p = None if reason else _repq_params(*stats[name], bits)
        if p is None:
            _refuse(log, name, reason or f"%{name} is 0 in every channel over the calibration set: there is no "
                                         f"range to quantize")
            continue
        inputs = list(dict.fromkeys(mm.inputs[0].name for mm in plan.matmuls))
        linears = tuple(mm.output.name for mm in plan.matmuls)
        r1 = p.r1
        _apply_repq(graph, plan, p)
        rest = others[id(plan.norm)]
        if rest:
            _restore_for(graph, plan.norm.output, rest, r1, p.s * p.r2)
        records.append(ReparamRecord(
            "repq", name,
            f"{bits}-bit channel-wise -> layer-wise: s~={p.s_t:.4g}, zero point {p.fixed[1]} (z~={p.z_t}); "
            f"r1 in [{r1.min():.3g}, {r1.max():.3g}]; γ, β and {len(plan.matmuls)} linear(s) "
            f"{', '.join('%' + n for n in linears)} rescaled"
            + (f"; {len(rest)} other reader(s) get y = ỹ·r1 - s·r2 back" if rest else ""),
            linears, {n: p.fixed for n in dict.fromkeys([name, *inputs])}))
    _report(log, records)
    return graph, records


# ====================================================================== SmoothQuant


@dataclass
class _Group:
    """Linears reading one activation ``x``, and where 1/s goes: a norm's fold plan, a producing linear, or a mul."""

    x: Value
    linears: list[Node]
    plan: FoldPlan | None = None
    producer: tuple[Node, Node | None] | None = None
    why_mul: str = ""

    def target(self) -> str:
        if self.plan is not None:
            what = "γ, β" if self.plan.beta is not None else "γ"
            return f"{self.plan.norm.op} %{self.plan.norm.output.name}'s {what}"
        if self.producer is not None:
            mm, add = self.producer
            return f"the output columns of %{mm.inputs[1].name}" + (" and the bias" if add is not None else "")
        return f"an inserted mul ({self.why_mul})"


def _is_linear(node: Node) -> bool:
    """A matmul with a constant 2-D weight and a non-constant float input."""
    if node.op != "matmul":
        return False
    x, w = node.inputs
    return w.is_const and w.type.rank == 2 and not x.is_const and x.type.dtype in FLOAT_DTYPES


def _linear_producer(graph: Graph, g: _Group) -> tuple[Node, Node | None] | str:
    """The linear (matmul + optional bias add) whose output only ``g`` reads, or why 1/s cannot go there."""
    x, p = g.x, g.x.producer
    if p is None:
        return f"%{x.name} is a graph input"
    ids = {id(n) for n in g.linears}
    if _is_output(graph, x) or any(id(n) not in ids or i != 0 for n, i in x.uses):
        return f"%{x.name} is also read outside the linears (or is a graph output)"
    mm, add = p, None
    if p.op == "add":
        mm = next((v.producer for v in p.inputs if v is not None and v.producer is not None
                   and v.producer.op == "matmul" and _bias_add(graph, v) is p), None)
        add = p
    if mm is None or mm.op != "matmul" or not _is_linear(mm):
        return f"%{x.name} = {p.op}(...) is not a linear with a constant weight"
    if len(mm.inputs[1].uses) != 1 or _is_output(graph, mm.inputs[1]):
        return f"the producing linear's weight %{mm.inputs[1].name} is shared"
    return mm, add


def _smooth_groups(graph: Graph) -> list[_Group]:
    """Every group of linears sharing an input: a norm's fold plan first, then the remaining linears by input."""
    groups: list[_Group] = []
    claimed: set[int] = set()
    unfoldable: dict[int, str] = {}
    for node in graph.nodes:
        if node.op in NORMS and _width(node.inputs[0]) is not None:
            plan = plan_fold(graph, node)
            if isinstance(plan, FoldPlan) and plan.matmuls and all(_is_linear(mm) for mm in plan.matmuls):
                groups.append(_Group(_norm_out(plan), list(plan.matmuls), plan=plan))
                claimed.update(id(mm) for mm in plan.matmuls)
            elif isinstance(plan, str):
                unfoldable[id(node.output)] = f"{node.op} %{node.output.name} cannot absorb 1/s: {plan}"
    by_input: dict[int, _Group] = {}
    for node in graph.nodes:
        if _is_linear(node) and id(node) not in claimed and _width(node.inputs[0]) is not None:
            g = by_input.get(id(node.inputs[0]))
            if g is None:
                g = by_input[id(node.inputs[0])] = _Group(node.inputs[0], [])
                groups.append(g)
            g.linears.append(node)
    for g in groups:
        if g.plan is None:
            prod = unfoldable.get(id(g.x)) or _linear_producer(graph, g)
            g.producer, g.why_mul = (None, prod) if isinstance(prod, str) else (prod, "")
    return groups


def _smooth_scales(absmax: np.ndarray, weights: list[np.ndarray], alpha: float) -> np.ndarray:
    """s_j = max|X_j|^α / max_i|W_ij|^(1-α), clamped to >= 1e-5 (weight maxima over all W, clamped too)."""
    wmax = np.maximum(np.max([np.abs(w).max(axis=1) for w in weights], axis=0), SMOOTH_MIN)
    return np.maximum(absmax ** alpha / wmax ** (1.0 - alpha), SMOOTH_MIN)


def _flatness(m: np.ndarray) -> float:
    """max/min of per-channel maxima (inf when a channel is 0)."""
    return float(m.max() / m.min()) if m.min() > 0 else math.inf


def _apply_smooth(graph: Graph, g: _Group, s: np.ndarray) -> None:
    """diag(s)·W for the group's weights, 1/s into the norm, the producing linear, or a new mul."""
    _scale_rows(graph, g.linears, s, "smooth")
    if g.plan is not None:
        norm, d = g.plan.norm, len(s)
        _replace_const(graph, norm.inputs[1], _vector_const(norm.inputs[1], _norm_vector(norm.inputs[1], d) / s),
                       [(norm, 1)], "smooth")
        if g.plan.beta is not None:
            _set_beta(graph, g.plan, _current_beta(g.plan, d) / s, "smooth")
    elif g.producer is not None:
        mm, add = g.producer
        w = mm.inputs[1]
        _replace_const(graph, w, (_f64(w) / s[None, :]).astype(w.const.dtype), [(mm, 1)], "smooth")
        if add is not None:
            j = 1 if add.inputs[0] is mm.output else 0
            b = add.inputs[j]
            _replace_const(graph, b, (_f64(b) / s.reshape(b.const.shape)).astype(b.const.dtype), [(add, j)], "smooth")
    else:
        order = {id(n): k for k, n in enumerate(graph.nodes)}
        first = min(g.linears, key=lambda n: order[id(n)])
        inv = graph.add_constant((1.0 / s).astype(g.x.type.np_dtype), graph.fresh_name(f"{g.x.name}.smooth_scale"))
        xs = graph.add_node("mul", [g.x, inv], {}, before=first,
                            out_names=[graph.fresh_name(f"{g.x.name}.smoothed")]).output
        for mm in g.linears:
            graph.set_input(mm, 0, xs)


def smooth_quant(graph: Graph, calib: Calib, *, alpha: float = 0.5, log: PassLog | None = None,
                 progress: Progress | None = None) -> tuple[Graph, list[ReparamRecord]]:
    """SmoothQuant: move activation outliers into the weights, s_j = max|X_j|^α / max|W_j|^(1-α) per channel."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smoothquant: alpha must be in [0, 1], got {alpha}")
    groups = []
    for g in _smooth_groups(graph):
        reason = _weight_refusal(graph, g.linears, f"%{g.x.name}")
        if reason is not None:
            _refuse(log, g.x.name, reason)
        else:
            groups.append(g)
    if not groups:
        return graph, []
    names = list(dict.fromkeys(g.x.name for g in groups))
    stats = _channel_stats(graph, _calibration(calib), names, progress)
    plans = []
    for g in groups:
        reason = _non_finite(g.x.name, stats)
        if reason is not None:
            _refuse(log, g.x.name, reason)
            continue
        lo, hi = stats[g.x.name]
        absmax = np.maximum(np.abs(lo), np.abs(hi))
        weights = [_f64(w) for w, _ in _distinct_weights(g.linears)]
        plans.append((g, absmax, _smooth_scales(absmax, weights, alpha)))
    records = []
    for g, absmax, s in plans:
        linears = tuple(mm.output.name for mm in g.linears)
        target = g.target()
        _apply_smooth(graph, g, s)
        records.append(ReparamRecord(
            "smoothquant", g.x.name,
            f"α={alpha:g}: {len(linears)} linear(s) {', '.join('%' + n for n in linears)} take diag(s)·W, 1/s goes "
            f"into {target}; max/min of per-channel max|x| {_flatness(absmax):.3g} -> {_flatness(absmax / s):.3g}",
            linears))
    _report(log, records)
    return graph, records


# ====================================================================== log-√2 softmax quantizer


def log2_fake_quant(a: np.ndarray, delta: float, bits: int) -> np.ndarray:
    """â = Δ·2^(-q/2), q = clip(round(-2·log2(a/Δ)), 0, 2^b - 1); 0 where the unclamped code is >= 2^b."""
    with np.errstate(divide="ignore", invalid="ignore"):
        c = np.rint(-2.0 * np.log2(a / delta))
        q = np.clip(c, 0, 2 ** bits - 1)
        return np.where(c >= 2 ** bits, 0.0, delta * np.power(2.0, -q / 2))


def _choose_delta(values: np.ndarray, bits: int) -> tuple[float, str, float]:
    """The Δ (and its name, its MSE) with the least squared error among the positive quantiles and 1.0."""
    qs = np.quantile(values, DELTA_QUANTILES)
    cands = [(float(q), f"the {p:g} quantile") for p, q in zip(DELTA_QUANTILES, qs) if q > 0] + [(1.0, "1.0")]
    scored = [(float(np.mean((log2_fake_quant(values, d, bits) - values) ** 2)), i, d, label)
              for i, (d, label) in enumerate(cands)]
    mse, _, delta, label = min(scored)
    return delta, label, mse


def _softmax_values(graph: Graph, calib: CalibrationSet, names: list[str],
                    progress: Progress | None) -> dict[str, np.ndarray]:
    """The calibration values of each named softmax output, flat, in float64 (a seeded subset of at most
    ``MAX_DELTA_VALUES`` per output, drawn evenly over the samples)."""
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    per_sample = max(MAX_DELTA_VALUES // max(len(calib), 1), 1)
    rng = np.random.default_rng(0)
    for env in activations(graph, calib, names, progress=progress):
        for n in names:
            a = np.asarray(env[n], np.float64).reshape(-1)
            parts[n].append(a if a.size <= per_sample else rng.choice(a, per_sample, replace=False))
    return {n: np.concatenate(p) for n, p in parts.items()}


def _insert_log2(graph: Graph, a: Value, readers: list[tuple[Node, int]], delta: float, bits: int) -> Value:
    """The log-√2 quantizer of ``a`` as float ops before its first matmul reader; the readers now read â."""
    order = {id(n): k for k, n in enumerate(graph.nodes)}
    before = min((n for n, _ in readers), key=lambda n: order[id(n)])
    dt, base = a.type.np_dtype, a.name + ".log2q"

    def const(tag: str, x: float) -> Value:
        return graph.add_constant(np.asarray(x, dt), graph.fresh_name(f"{base}.{tag}"))

    def op(tag: str, name: str, *ins: Value, **attrs: object) -> Value:
        out = graph.fresh_name(f"{base}.{tag}" if tag else base)
        return graph.add_node(name, list(ins), dict(attrs), before=before, out_names=[out]).output

    c = op("rounded", "round", op("exponent", "mul", op("ln", "log", op("ratio", "div", a, const("delta", delta))),
                                  const("neg2_over_ln2", -2.0 / math.log(2.0))))
    q = op("code", "clip", c, min=0.0, max=float(2 ** bits - 1))
    v = op("value", "mul", op("pow", "pow", const("two", 2.0), op("half", "mul", q, const("neg_half", -0.5))),
           const("scale", delta))
    under = op("underflow", "greater_equal", c, const("levels", float(2 ** bits)))
    out = op("", "where", under, const("zero", 0.0), v)
    for n, i in readers:
        graph.set_input(n, i, out)
    return out


def log2_softmax(graph: Graph, calib: Calib, *, bits: int = 8, log: PassLog | None = None,
                 progress: Progress | None = None) -> tuple[Graph, list[ReparamRecord]]:
    """RepQ-ViT's log-√2 quantizer (as float ops) on every softmax output that a matmul reads."""
    if not 1 <= bits <= 16:
        raise ValueError(f"log2-softmax: bits must be in 1..16, got {bits}")
    sites = []
    for node in graph.nodes:
        if node.op == "softmax":
            readers = [(n, i) for n, i in node.output.uses if n.op == "matmul"]
            if readers:
                sites.append((node.output, readers))
    if not sites:
        return graph, []
    values = _softmax_values(graph, _calibration(calib), [a.name for a, _ in sites], progress)
    records = []
    for a, readers in sites:
        vals = values[a.name]
        reason = _non_finite(a.name, {a.name: (vals, vals)} if vals.size else {})
        if reason is not None:
            _refuse(log, a.name, reason)
            continue
        delta, label, mse = _choose_delta(vals, bits)
        out = _insert_log2(graph, a, readers, delta, bits)
        names = tuple(n.outputs[0].name for n, _ in readers)
        records.append(ReparamRecord(
            "log2-softmax", a.name,
            f"log-√2 {bits}-bit quantizer %{out.name} (Δ={delta:.4g}, {label}; calibration MSE {mse:.3g}) read by "
            f"{', '.join('%' + n for n in names)}", names, skip=(out.name,)))
    _report(log, records)
    return graph, records


# ====================================================================== registered passes


@dataclass(frozen=True)
class _CalibratedPass(Pass):
    """Options shared by the data-driven passes: a calibration path (empty: synthetic inputs), samples, seed."""

    calib: str = ""
    samples: int = 16
    seed: int = 0

    def calibration(self, graph: Graph) -> Callable[[], CalibrationSet]:
        """A factory of the calibration set (made only when there is something to calibrate)."""
        return lambda: calibration_for(graph, self.calib, self.samples, self.seed)


@register_pass
@dataclass(frozen=True)
class RepQ(_CalibratedPass):
    """RepQ-ViT: post-LN activations channel-wise -> layer-wise (``repq``); records the fixed qparams."""

    name: ClassVar[str] = "repq"
    bits: int = 8

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be in 2..8, got {self.bits}")

    def apply(self, graph: Graph, log: PassLog) -> Graph:
        return repq(graph, self.calibration(graph), bits=self.bits, log=log)[0]


@register_pass
@dataclass(frozen=True)
class SmoothQuant(_CalibratedPass):
    """SmoothQuant: per-channel smoothing of linear inputs into their weights (``smooth_quant``)."""

    name: ClassVar[str] = "smoothquant"
    alpha: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")

    def apply(self, graph: Graph, log: PassLog) -> Graph:
        return smooth_quant(graph, self.calibration(graph), alpha=self.alpha, log=log)[0]


@register_pass
@dataclass(frozen=True)
class Log2Softmax(_CalibratedPass):
    """The log-√2 quantizer on softmax outputs read by matmuls (``log2_softmax``); changes outputs by design."""

    name: ClassVar[str] = "log2-softmax"
    exact: ClassVar[bool] = False  # quantizes: changes the outputs by design
    bits: int = 8

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 16:
            raise ValueError(f"bits must be in 1..16, got {self.bits}")

    def apply(self, graph: Graph, log: PassLog) -> Graph:
        return log2_softmax(graph, self.calibration(graph), bits=self.bits, log=log)[0]
