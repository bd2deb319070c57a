"""The graph-level oracle: run one (graph, pipeline) case through every stage and judge it.

Stages, in order: the interpreter on the original graph (the reference), each
pass of the pipeline (crash, verifier, interpreter after the pass), code
generation and the runtime (``kiln.compile`` then ``Artifact.load``), and ONNX
Runtime on the lowered ONNX (graph optimizations off, see tvm-0.27.md).  A pass
that refuses with a reason is not a finding; a case whose reference is not
finite everywhere, or moves beyond tolerance when its inputs move by 1e-5, is
not checked numerically (NNSmith's false-positive filters).  A pass that changes
the numbers by design (``Pass.exact`` false: insert-qdq, weight-only,
log2-softmax) is not compared; its output is the reference of what follows.
"""

from __future__ import annotations

import hashlib
import time
import traceback
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from kiln.codegen.tolerance import Tolerance, for_dtype
from kiln.fuzz.coverage import ArcTracer, error_site, normalize_message
from kiln.fuzz.worker import set_stage
from kiln.ir.graph import Graph
from kiln.ir.interpret import interpret
from kiln.ir.text import parse, print_graph
from kiln.ir.verify import VerifyError, verify

__all__ = ["GraphCase", "Outcome", "STAGES", "case_inputs", "compare", "run_graph_case"]

STAGES = ("passes", "compile", "onnxruntime")
# Whole chains of ops compound rounding: a float32 output is compared relative to its magnitude.
CHAIN_F32 = Tolerance(1e-3, 1e-4)
PERTURB = 1e-5


@dataclass
class GraphCase:
    """One graph-level test: IR text, pass pipeline and input seed (text only, so it is its own reproducer)."""

    ir: str
    passes: list[str]
    seed: int = 0
    origin: str = ""

    @property
    def pipeline(self) -> str:
        return ",".join(self.passes)

    def graph(self) -> Graph:
        return parse(self.ir)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> GraphCase:
        return cls(d["ir"], list(d["passes"]), int(d.get("seed", 0)), str(d.get("origin", "")))

    @classmethod
    def of(cls, graph: Graph, passes: list[str], seed: int = 0, origin: str = "") -> GraphCase:
        return cls(print_graph(graph), list(passes), seed, origin)


@dataclass
class Outcome:
    """What one case did.  ``status``: ok, finding, invalid (the case itself is unusable) or unsupported."""

    status: str
    symptom: str = ""  # crash, hang, verify, mismatch, oob, pass-error
    stage: str = ""  # reference, pass, compile, run, onnxruntime, lower-onnx, tir-build, tir-run, worker
    pass_name: str = ""
    message: str = ""
    detail: dict[str, Any] = field(default_factory=dict)
    features: list[str] = field(default_factory=list)
    arcs: list[int] = field(default_factory=list)
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. TIR cases harvested from the compiled kernels

    @property
    def key(self) -> tuple[str, str, str, str]:
        """The deduplication key: (symptom, stage, pass, normalized message)."""
        return (self.symptom, self.stage, self.pass_name, self.message)

    @property
    def key_id(self) -> str:
        return hashlib.sha256("\x1f".join(self.key).encode()).hexdigest()[:10]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Outcome:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def case_inputs(graph: Graph, seed: int) -> dict[str, np.ndarray]:
    """The case's inputs: the generator's safe inputs, seeded by the case."""
    from kiln.fuzz.generate import safe_inputs

    return safe_inputs(graph, np.random.default_rng(seed))


def _tolerance(dtype: np.dtype, chain: bool) -> Tolerance:
    tol = for_dtype(dtype)
    if chain and np.dtype(dtype) == np.float32:
        return CHAIN_F32
    return tol


def compare(want: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray], *, chain: bool = True) -> str | None:
    """None when ``got`` matches ``want`` (same names, shapes, NaN/Inf places; values within the
    dtype's tolerance relative to each output's magnitude), else what differs."""
    for name, w in want.items():
        if name not in got:
            return f"output {name!r} is missing"
        g = np.asarray(got[name])
        w = np.asarray(w)
        if g.shape != w.shape:
            return f"output {name!r} has shape {list(g.shape)}, expected {list(w.shape)}"
        if w.dtype.kind in "fc" or g.dtype.kind in "fc":
            w64, g64 = w.astype(np.float64), g.astype(np.float64)
            finite = np.isfinite(w64)
            if not finite.any():
                continue
            tol = _tolerance(w.dtype if w.dtype.kind == "f" else g.dtype, chain)
            scale = float(np.abs(w64[finite]).max())
            diff = np.abs(g64[finite] - w64[finite])
            bad = ~(diff <= tol.atol + tol.rtol * max(scale, 1.0))
            if bad.any():
                i = int(np.argmax(np.where(bad, diff, -1)))
                return (f"output {name!r} differs: max abs diff {float(diff.max()):.3g} at flat index {i} "
                        f"(scale {scale:.3g}, rtol {tol.rtol:g}, atol {tol.atol:g})")
        elif not np.array_equal(w, g):
            n = int((w != g).sum())
            return f"output {name!r}: {n} of {w.size} elements differ (exact dtype {w.dtype})"
    return None


def _perturbed(feeds: Mapping[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
    out = {}
    for k, a in feeds.items():
        if a.dtype.kind == "f":
            out[k] = (a * (1 + PERTURB * rng.choice([-1.0, 1.0], a.shape))).astype(a.dtype)
        else:
            out[k] = a
    return out


def _outputs(graph: Graph, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    with np.errstate(all="ignore"):
        res = interpret(graph, dict(feeds))
    return {v.name: np.asarray(res[v.name]) for v in graph.outputs}


def _reference_usable(graph: Graph, feeds: Mapping[str, np.ndarray], want: Mapping[str, np.ndarray],
                      seed: int) -> str | None:
    """None when the reference can judge others; else why not (non-finite, or unstable under 1e-5 moves)."""
    if any(np.asarray(w).dtype.kind == "f" and not np.isfinite(w).all() for w in want.values()):
        return "the reference output has NaN/Inf"
    moved = _outputs(graph, _perturbed(feeds, np.random.default_rng(seed + 1)))
    bad = compare(want, moved)
    return None if bad is None else f"the reference is unstable under a {PERTURB:g} input move: {bad}"


def _finding(symptom: str, stage: str, message: str, pass_name: str = "", **detail: Any) -> Outcome:
    return Outcome("finding", symptom, stage, pass_name, normalize_message(message), dict(detail))


def _exception_outcome(symptom: str, stage: str, e: BaseException, pass_name: str = "") -> Outcome:
    out = _finding(symptom, stage, f"{type(e).__name__}: {e}", pass_name,
                   raw=f"{type(e).__name__}: {e}"[:2000],
                   traceback="".join(traceback.format_exception(e))[-4000:])
    out.features.append(f"err:{error_site(e)}")
    return out


def _run_passes(graph: Graph, passes: list[str], feeds: Mapping[str, np.ndarray],
                want: Mapping[str, np.ndarray] | None, features: list[str]
                ) -> tuple[Graph, Outcome | None, Mapping[str, np.ndarray] | None]:
    """Each pass in turn, checked by the verifier and (when ``want``) by the interpreter; the first failure.

    A pass that changes the numbers by design (``Pass.exact`` false: quantization) is not compared; its
    output becomes the reference of the passes and stages after it, which the third result returns.
    """
    from kiln.passes.manager import PassLog, PipelineError, parse_pipeline

    try:
        pipeline = parse_pipeline(",".join(passes))
    except PipelineError as e:  # refused with a reason (e.g. a rewrite after fuse-blocks): not a finding
        return graph, Outcome("invalid", stage="pipeline", message=normalize_message(str(e))), want
    for p in pipeline:
        set_stage("pass", str(p))
        log = PassLog(p.name)
        try:
            graph = p.apply(graph, log)
        except Exception as e:  # noqa: BLE001 - a crashing pass is the finding
            return graph, _exception_outcome("crash", "pass", e, str(p)), want
        features.append(f"pass:{p}:{'rewrote' if log.rewrites else 'idle'}")
        features.extend(f"refuse:{p.name}:{normalize_message(r.reason)[:80]}" for r in log.refusals)
        try:
            verify(graph)
        except VerifyError as e:
            return graph, _exception_outcome("verify", "pass", e, str(p)), want
        if want is None:
            continue
        try:
            got = _outputs(graph, feeds)
        except Exception as e:  # noqa: BLE001
            return graph, _exception_outcome("crash", "interpret-after-pass", e, str(p)), want
        if len(got) != len(want):
            return graph, _finding("mismatch", "pass", f"the graph has {len(got)} outputs, expected {len(want)}",
                                   str(p)), want
        got = dict(zip(want, got.values()))  # outputs are matched by position: a pass may rename them
        if not p.exact:
            want = got
            continue
        bad = compare(want, got)
        if bad:
            return graph, _finding("mismatch", "pass", bad, str(p), expected=_summary(want),
                                   actual=_summary(got)), want
    return graph, None, want


def _summary(arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """A short JSON-able description of outputs (the full arrays go to the finding's npz)."""
    out = {}
    for k, a in arrays.items():
        a = np.asarray(a)
        flat = a.reshape(-1)[:8]
        out[k] = {"shape": list(a.shape), "dtype": str(a.dtype), "head": [float(x) if a.dtype.kind in "fcb"
                                                                          else int(x) for x in flat]}
    return out


def _compile_and_run(graph: Graph, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    import kiln

    artifact = kiln.compile(graph, passes="")
    session = artifact.load(check_cpu=False)
    return {k: np.asarray(v) for k, v in session.run(dict(feeds)).items()}


def _unsupported_codegen(e: BaseException) -> bool:
    """Codegen's documented gaps (an op without a lowering, a lowering that says NotImplementedError
    with its reason, such as int4 tensors) are not findings."""
    return "no TVM lowering" in str(e) or "NotImplementedError" in str(e)


def _onnxruntime(graph: Graph, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    from kiln.frontend import lower_to_onnx

    model = lower_to_onnx(graph)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    res = sess.run(names, {i.name: feeds[i.name] for i in sess.get_inputs()})
    return dict(zip(names, res))


def _stages(graph: Graph, original: Graph, case: GraphCase, stages: tuple[str, ...],
            features: list[str]) -> Outcome:
    """The body of :func:`run_graph_case` (under the tracer)."""
    from kiln.frontend.errors import LoweringError

    feeds = case_inputs(original, case.seed)
    try:
        want = _outputs(original, feeds)
    except Exception as e:  # noqa: BLE001 - the generator made something the interpreter refuses
        out = _exception_outcome("crash", "reference", e)
        out.status = "invalid"
        return out
    unusable = _reference_usable(original, feeds, want, case.seed)
    if unusable:
        features.append("ref:unusable")
    check = None if unusable else want
    graph, bad, check = _run_passes(graph, case.passes if "passes" in stages else [], feeds, check, features)
    if bad:
        return bad
    want = want if check is None else check
    names = [v.name for v in graph.outputs]
    want_by_pos = dict(zip(names, want.values()))  # outputs keep their order through the passes
    if "compile" in stages:
        set_stage("compile")
        try:
            got = _compile_and_run(graph, feeds)
        except Exception as e:  # noqa: BLE001
            if _unsupported_codegen(e):
                return Outcome("unsupported", stage="compile", message=normalize_message(str(e)))
            return _exception_outcome("crash", "compile", e)
        got = dict(zip(names, got.values()))
        bad_msg = None if check is None else compare(want_by_pos, got)
        if bad_msg:
            return _finding("mismatch", "compile", bad_msg, expected=_summary(want_by_pos), actual=_summary(got))
    if "onnxruntime" in stages:
        set_stage("onnxruntime")
        try:
            got = _onnxruntime(graph, feeds)
        except LoweringError as e:
            return Outcome("unsupported", stage="lower-onnx", message=normalize_message(str(e)))
        except Exception as e:  # noqa: BLE001
            if "NOT_IMPLEMENTED" in str(e):  # ORT has no kernel for this op and dtype: its gap, not kiln's
                return Outcome("unsupported", stage="onnxruntime", message=normalize_message(str(e)))
            return _exception_outcome("crash", "onnxruntime", e)
        got = dict(zip(names, got.values()))
        bad_msg = None if check is None else compare(want_by_pos, got)
        if bad_msg:
            return _finding("mismatch", "onnxruntime", bad_msg, expected=_summary(want_by_pos),
                            actual=_summary(got))
    return Outcome("ok")


def run_graph_case(case: GraphCase, stages: tuple[str, ...] = STAGES, *, trace: bool = True) -> Outcome:
    """Judge one case; kiln's arcs (when ``trace``) and structural features are its coverage."""
    from kiln.fuzz.generate import graph_features

    t0 = time.perf_counter()
    try:
        original = case.graph()
        verify(original)
    except Exception as e:  # noqa: BLE001 - a case that does not parse is unusable, not a finding
        return Outcome("invalid", "crash", "parse", message=normalize_message(f"{type(e).__name__}: {e}"))
    features = [f"feat:{f}" for f in sorted(graph_features(original))]
    tracer = ArcTracer() if trace else None
    if tracer is not None:
        with tracer:
            out = _stages(original.clone(), original, case, stages, features)
        out.arcs = sorted(tracer.arcs)
    else:
        out = _stages(original.clone(), original, case, stages, features)
    out.features = features + out.features
    out.seconds = time.perf_counter() - t0
    return out
