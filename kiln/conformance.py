"""ONNX's node conformance suite through kiln: ``lift`` + interpreter, or ``kiln.compile`` + ``kiln.load``.

The cases come from ``onnx.backend.test.case.node.collect_testcases`` (generated
in memory from the installed ``onnx`` package: no files, no network). Each case
ends as one of

* ``pass``: every output within the case's rtol/atol (NaN where NaN is expected);
* ``refused``: a kiln error (lift, type rule, compile) with its reason;
* ``wrong``: kiln produced outputs that differ from the expected ones;
* ``diverges``: the case's expected output follows ``onnx.reference`` where ONNX Runtime computes something
  else, and kiln equals ONNX Runtime (listed, with the reason, in ``FOLLOWS_ONNXRUNTIME``);
* ``crashed``: any other exception (a kiln bug);
* ``out-of-scope``: sequence/optional/map/string values, training ops, ``ai.onnx.ml``,
  ImageDecoder (not counted in the totals).
"""

from __future__ import annotations

import re
import sys
import traceback
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from functools import cache

import numpy as np
import onnx

PATHS = ("interp", "compiled")
TRAINING_OPS = frozenset({"Adam", "Adagrad", "Momentum", "Gradient", "SoftmaxCrossEntropyLoss",
                          "NegativeLogLikelihoodLoss"})
OUT_OF_SCOPE_OPS = TRAINING_OPS | {"ImageDecoder"}
OUT_OF_SCOPE_DOMAINS = frozenset({"ai.onnx.ml", "ai.onnx.preview.training"})
# Compiled float32 kernels use vectorized polynomial exp/tanh/erf (a few ulp) and reassociate sums.
COMPILED_F32_FLOOR = (1e-4, 1e-5)
# The expected outputs were computed in float32 themselves: differences below a few float32 roundings of
# the output's largest value are the generator's noise (test_dft_inverse expects 1.9e-7 where the exact value is 0).
F32_NOISE_ULPS = 4
# Cases whose expected output follows onnx.reference where ONNX Runtime (and PyTorch) compute something else;
# kiln follows ONNX Runtime, and such a case counts as "diverges" only while kiln matches ONNX Runtime on it.
FOLLOWS_ONNXRUNTIME = {
    "test_maxunpool_export_with_output_shape":
        "ONNX Runtime and PyTorch scatter the indices into the output_shape tensor; onnx.reference scatters into "
        "the default-shaped tensor and pads it",
}
# ONNX's reference rounds every f16/bf16 intermediate; kiln computes them in f32 and rounds once,
# so they are compared at kiln's tolerance for those dtypes (codegen/tolerance.py).
LOW_PRECISION_FLOOR = (1e-2, 1e-2)


@dataclass(frozen=True)
class Outcome:
    """What happened to one case on one path."""

    case: str
    op: str
    path: str
    status: str  # pass | refused | wrong | crashed | out-of-scope
    detail: str = ""


def _cases(pattern: str | None = None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from onnx.backend.test.case.node import collect_testcases
        cases = collect_testcases(None)
    if pattern:
        rx = re.compile(pattern)
        cases = [c for c in cases if rx.search(c.name)]
    return cases


def op_of(model: onnx.ModelProto, case_name: str = "") -> str:
    """The op a conformance case tests: its node's op type, or for an expanded case (a function
    body) the standard op whose name starts the case name (``test_celu_expanded`` -> Celu)."""
    types = [n.op_type for n in model.graph.node]
    if len(types) == 1:
        return types[0]
    key = case_name.removeprefix("test_").replace("_", "").lower()
    best = max((s for s in _schema_names() if key.startswith(s.lower())), key=len, default=None)
    return best or (types[-1] if types else "?")


@cache
def _schema_names() -> tuple[str, ...]:
    return tuple({s.name for s in onnx.defs.get_all_schemas_with_history() if s.domain in ("", "ai.onnx")})


def scope_reason(model: onnx.ModelProto) -> str | None:
    """Why a case is out of this suite's scope, or None when it is in scope."""
    for n in model.graph.node:
        if n.domain in OUT_OF_SCOPE_DOMAINS:
            return f"domain {n.domain}"
        if n.op_type in OUT_OF_SCOPE_OPS:
            return f"{n.op_type} (training or image decoding)"
    for vi in list(model.graph.input) + list(model.graph.output):
        kind = vi.type.WhichOneof("value")
        if kind != "tensor_type":
            return f"{kind.replace('_type', '')} value {vi.name!r}"
        if vi.type.tensor_type.elem_type == onnx.TensorProto.STRING:
            return f"string tensor {vi.name!r}"
    return None


def _matches(expected: np.ndarray, got: np.ndarray, rtol: float, atol: float) -> str | None:
    """None when ``got`` matches ``expected`` (dtype, shape, values), else what differs."""
    got = np.asarray(got)
    if expected.dtype != got.dtype:
        return f"dtype {got.dtype}, expected {expected.dtype}"
    if expected.shape != got.shape:
        return f"shape {got.shape}, expected {expected.shape}"
    if expected.dtype.kind in "fc" or "float" in expected.dtype.name:  # ml_dtypes' floats are kind 'V'
        e, g = expected.astype(np.float64), got.astype(np.float64)
        nan_e, nan_g = np.isnan(e), np.isnan(g)
        if (nan_e != nan_g).any():
            return f"NaN at {int((nan_e != nan_g).sum())} positions differs"
        ok = np.isclose(g, e, rtol=rtol, atol=atol) | (nan_e & nan_g) | (e == g)
        if not ok.all():
            err = np.abs(np.where(ok, 0, g - e))
            k = int(np.argmax(err))
            return f"{int((~ok).sum())} of {e.size} values differ (max |err| {err.flat[k]:.3g} at {k})"
        return None
    if not np.array_equal(expected, got):
        diff = int((expected != got).sum()) if expected.shape == got.shape else -1
        return f"{diff} of {expected.size} values differ"
    return None


def _kiln_error_types() -> tuple[type, ...]:
    from kiln.codegen.kernel import CodegenError
    from kiln.compiler import CompileError
    from kiln.frontend.errors import FrontendError
    from kiln.ir.interpret import InputError, InterpretError
    from kiln.ir.registry import OpTypeError
    from kiln.ir.verify import VerifyError
    from kiln.passes.manager import PassError, PipelineError
    from kiln.runtime.artifact import ArtifactError
    return (FrontendError, CompileError, CodegenError, OpTypeError, VerifyError, PipelineError, PassError,
            ArtifactError, InputError, InterpretError, NotImplementedError)


def _array(a) -> np.ndarray:
    """A data set's entry as an array (most are arrays; some cases store TensorProtos)."""
    if isinstance(a, onnx.TensorProto):
        return onnx.numpy_helper.to_array(a)
    return np.asarray(a)


def _feeds(model: onnx.ModelProto, inputs: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    inits = {t.name for t in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in inits]
    return {n: _array(a) for n, a in zip(names, inputs)}


def _input_shapes(feeds: dict[str, np.ndarray]) -> dict[str, list[int]]:
    return {n: list(a.shape) for n, a in feeds.items()}


def run_case(case, path: str = "interp") -> Outcome:
    """Run one conformance case on ``path`` (``interp`` or ``compiled``)."""
    model = case.model
    op = op_of(model, case.name)
    why = scope_reason(model)
    if why:
        return Outcome(case.name, op, path, "out-of-scope", why)
    errors = _kiln_error_types()
    rtol, atol = float(case.rtol), float(case.atol)
    try:
        from kiln.frontend.lift import lift_specialized
        from kiln.ir import interpret
        for k, (inputs, expected) in enumerate(case.data_sets):
            feeds = _feeds(model, inputs)
            with warnings.catch_warnings(), np.errstate(all="ignore"):
                warnings.simplefilter("ignore")
                if path == "interp":
                    # inputs that lift names as deciding a compile-time operand are bound to this data set's
                    # values (as kiln.compile does from its example inputs); every other input stays an input
                    graph = lift_specialized(model, feeds, input_shapes=_input_shapes(feeds))
                    graph_inputs = {v.name for v in graph.inputs}
                    got = interpret(graph, {n: a for n, a in feeds.items() if n in graph_inputs})
                    outs = [got[v.name] for v in graph.outputs]
                else:
                    import kiln
                    art = kiln.compile(model, example_inputs=feeds)
                    sess = _load_via_file(art)
                    got = sess.run(feeds)
                    outs = [got[o.name] for o in model.graph.output]
            r, a = rtol, atol
            for o_name, exp, out in zip([o.name for o in model.graph.output], expected, outs):
                exp = _array(exp)
                if path == "compiled" and exp.dtype == np.float32:
                    r, a = max(rtol, COMPILED_F32_FLOOR[0]), max(atol, COMPILED_F32_FLOOR[1])
                if exp.dtype == np.float32 and exp.size:
                    a = max(a, F32_NOISE_ULPS * float(np.finfo(np.float32).eps) * float(np.nanmax(np.abs(
                        np.where(np.isinf(exp), 0, exp)))))
                if exp.dtype == np.float16 or exp.dtype.name == "bfloat16":
                    r, a = max(rtol, LOW_PRECISION_FLOOR[0]), max(atol, LOW_PRECISION_FLOOR[1])
                bad = _matches(exp, out, r, a)
                if bad and case.name in FOLLOWS_ONNXRUNTIME:
                    ort_out = _onnxruntime(model, feeds)[o_name]
                    if _matches(ort_out, out, r, a) is None:
                        return Outcome(case.name, op, path, "diverges",
                                       f"kiln equals ONNX Runtime: {FOLLOWS_ONNXRUNTIME[case.name]}")
                if bad:
                    return Outcome(case.name, op, path, "wrong", f"data set {k}, output {o_name!r}: {bad}")
        return Outcome(case.name, op, path, "pass")
    except errors as e:
        return Outcome(case.name, op, path, "refused", f"{type(e).__name__}: {_one_line(str(e))}")
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # noqa: BLE001 - a crash is a result here
        tb = traceback.extract_tb(e.__traceback__)
        where = f"{tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno}" if tb else "?"
        return Outcome(case.name, op, path, "crashed", f"{type(e).__name__} at {where}: {_one_line(str(e))}")


def _onnxruntime(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.ir_version = min(m.ir_version, 10)
    sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def _load_via_file(art):
    import os
    import tempfile

    import kiln
    fd, p = tempfile.mkstemp(suffix=".kiln")
    os.close(fd)
    try:
        art.save(p)
        return kiln.load(p)
    finally:
        os.unlink(p)


def _one_line(s: str, limit: int = 300) -> str:
    s = " ".join(s.split())
    return s if len(s) <= limit else s[:limit] + "..."


def _worker(args):
    name, path = args
    case = _BY_NAME[name]
    return run_case(case, path)


_BY_NAME: dict = {}


def run(path: str = "interp", pattern: str | None = None, jobs: int = 1) -> list[Outcome]:
    """Every case (matching ``pattern``) on ``path``; ``jobs`` > 1 runs them in worker processes."""
    cases = _cases(pattern)
    if jobs <= 1:
        return [run_case(c, path) for c in cases]
    import multiprocessing as mp
    _BY_NAME.update({c.name: c for c in cases})
    ctx = mp.get_context("fork")
    with ctx.Pool(jobs, maxtasksperchild=50) as pool:
        return list(pool.imap(_worker, [(c.name, path) for c in cases], chunksize=4))


def summarize(outcomes: Iterable[Outcome]) -> dict:
    """Counts per status and per op (pass/refused/wrong/crashed) for in-scope cases."""
    outcomes = list(outcomes)
    total = Counter(o.status for o in outcomes)
    per_op: dict[str, Counter] = defaultdict(Counter)
    for o in outcomes:
        if o.status != "out-of-scope":
            per_op[o.op][o.status] += 1
    in_scope = sum(v for k, v in total.items() if k != "out-of-scope")
    ops_all_pass = sum(1 for c in per_op.values() if set(c) == {"pass"})
    return {"total": dict(total), "in_scope": in_scope, "ops": len(per_op), "ops_all_pass": ops_all_pass,
            "per_op": {k: dict(v) for k, v in sorted(per_op.items())}}


def add_arguments(ap) -> None:
    """``kiln conformance``'s flags (also ``python -m kiln.conformance``)."""
    ap.add_argument("--path", choices=PATHS, default="interp",
                    help="interp: lift + interpreter; compiled: kiln.compile + kiln.load(...).run")
    ap.add_argument("-k", "--pattern", help="regex over case names (e.g. 'test_resize')")
    ap.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    ap.add_argument("--json", help="write every outcome and the summary here")
    ap.add_argument("--show", default="wrong,crashed,refused,diverges", help="statuses to list case by case")
    ap.add_argument("--table", action="store_true", help="print the per-op table")


def run_cli(args) -> int:
    """Run the suite as ``args`` say; exit 1 when a case is wrong or crashed (a kiln bug)."""
    import json

    outcomes = run(args.path, args.pattern, args.jobs)
    show = set(args.show.split(","))
    for o in outcomes:
        if o.status in show:
            print(f"{o.status:8} {o.case:60} {o.detail}")
    s = summarize(outcomes)
    if args.table:
        _print_table(s)
    print(summary_line(args.path, s))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": s, "outcomes": [asdict(o) for o in outcomes]}, f, indent=1)
    t = s["total"]
    return 1 if t.get("wrong", 0) or t.get("crashed", 0) else 0


def summary_line(path: str, s: dict) -> str:
    t = s["total"]
    return (f"{path}: {t.get('pass', 0)}/{s['in_scope']} pass, {t.get('refused', 0)} refused, "
            f"{t.get('diverges', 0)} diverge (kiln = ONNX Runtime), {t.get('wrong', 0)} wrong, {t.get('crashed', 0)} crashed; {t.get('out-of-scope', 0)} out of "
            f"scope; {s['ops_all_pass']}/{s['ops']} ops pass all cases")


def _print_table(s: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("op", "pass", "refused", "diverges", "wrong", "crashed")
    for op, c in s["per_op"].items():
        table.add_row(op, *(str(c.get(k, 0) or "") for k in ("pass", "refused", "diverges", "wrong", "crashed")))
    Console().print(table)


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser("kiln conformance", description=__doc__.splitlines()[0])
    add_arguments(ap)
    return run_cli(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
