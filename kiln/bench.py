"""``kiln bench``: kiln's latency next to ONNX Runtime's, PyTorch's and TVM's own, in one run.

For each model every engine runs the same inputs in the same process, with
the same thread count (2 by default), ``warmup`` runs first and then
``repeat`` timed runs; the table reports medians.  kiln's latency is
``Session.run`` from a saved-and-loaded artifact (numpy in, numpy out), as a
user sees it; ORT's is ``InferenceSession.run`` (ORT_ENABLE_ALL), torch's is
eager ``module(*inputs)`` under ``inference_mode``, and TVM's is
``relax.frontend.onnx.from_onnx`` + ``tvm.compile`` (its default pipeline) on
the Relax VM.  ``--kernels`` adds GFLOP/s of kiln's matmul kernels.

``--contention`` runs the zoo and the corpus with 0, 1 and 2 busy-loop processes
beside it (kiln, ORT and OpenVINO alternating in one process, as above) and then
two processes of kiln, and of ORT, at once: what kiln's thread pool
(:mod:`kiln.runtime.threads`) is for.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

__all__ = ["BenchResult", "ContentionRow", "PairRow", "bench_contention", "bench_model", "bench_matmul_kernels",
           "bench_pairs", "busy_loops", "main", "median_latency"]


def median_latency(fn: Callable[[], Any], repeat: int, warmup: int = 3, min_time: float = 0.0,
                   min_sample: float = 2e-4) -> float:
    """Median seconds per call of ``fn`` over ``repeat`` samples (at least ``min_time`` in total).

    A sample times enough back-to-back calls to last ``min_sample`` seconds
    (as ``timeit`` does), so that microsecond models are not measured by the
    clock's own overhead; slow models get one call per sample.
    """
    for _ in range(warmup):
        fn()
    return statistics.median(_samples(fn, _calls_per_sample(fn, min_sample), repeat, min_time))


def _calls_per_sample(fn: Callable[[], Any], min_sample: float) -> int:
    """How many back-to-back calls of ``fn`` last about ``min_sample`` seconds (at least one)."""
    t0 = time.perf_counter()
    fn()
    return max(1, int(min_sample / max(time.perf_counter() - t0, 1e-9)))


def _samples(fn: Callable[[], Any], number: int, count: int, min_time: float) -> list[float]:
    """Seconds per call, one value per ``number`` calls: ``count`` samples or ``min_time`` seconds (capped)."""
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < count or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        times.append((time.perf_counter() - t0) / number)
        if len(times) >= 20 * count:
            break
    return times


@dataclass
class BenchResult:
    """One model's row: latencies in milliseconds (None: engine not run or failed) and compile facts."""

    model: str
    kiln_ms: float | None = None
    ort_ms: float | None = None
    torch_ms: float | None = None
    tvm_ms: float | None = None
    kernels: int | None = None
    compile_s: float | None = None
    tvm_compile_s: float | None = None
    rel_err_vs_ort: float | None = None  # max |kiln - ORT| / max |ORT| over the outputs
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def kiln_over_ort(self) -> float | None:
        return self.kiln_ms / self.ort_ms if self.kiln_ms and self.ort_ms else None

    @property
    def kiln_over_torch(self) -> float | None:
        return self.kiln_ms / self.torch_ms if self.kiln_ms and self.torch_ms else None

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "kiln_over_ort": self.kiln_over_ort, "kiln_over_torch": self.kiln_over_torch}


def _ort_session(proto: Any, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _tvm_default(proto: Any, feeds: dict[str, np.ndarray], target: Any) -> tuple[Callable[[], Any], float]:
    """TVM's own path: from_onnx + tvm.compile default pipeline; returns (run, compile seconds)."""
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    t0 = time.perf_counter()
    mod = from_onnx(proto, shape_dict={k: list(v.shape) for k, v in feeds.items()})
    mod, params = relax.frontend.detach_params(mod)
    ex = tvm.compile(mod, target=target)
    compile_s = time.perf_counter() - t0
    vm = relax.VirtualMachine(ex, tvm.cpu())
    args = [tvm.runtime.tensor(feeds[i.name]) for i in proto.graph.input if i.name in feeds]
    args += [p for p in params.get("main", [])]
    return (lambda: vm["main"](*args)), compile_s


def _rel_err(ours: np.ndarray, theirs: np.ndarray) -> float:
    """max |ours - theirs| relative to the output's magnitude (random-weight CNN logits reach 1e6)."""
    a, b = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    return float(np.max(np.abs(a - b), initial=0.0) / max(float(np.max(np.abs(b), initial=0.0)), 1e-30))


def block_medians(fns: Mapping[str, Callable[[], Any]], repeat: int, rounds: int = 3,
                  block: float = 0.2, settle: float = 0.05, min_sample: float = 2e-4) -> dict[str, float]:
    """Median seconds per call of each engine, timed in ``rounds`` blocks per engine, taken in turn.

    On a shared machine load comes in bursts: timing each engine once, one after
    the other, lets a burst land on one engine only.  Alternating blocks spreads
    the bursts over all of them.  Each block first runs ``settle`` seconds
    untimed, so that the previous engine's spinning worker threads (ORT's and
    OpenMP's spin after a run) have gone idle; alternating single calls would
    time every engine against the others' spinning threads.
    """
    for fn in fns.values():
        fn()
    number = {name: _calls_per_sample(fn, min_sample) for name, fn in fns.items()}
    times: dict[str, list[float]] = {name: [] for name in fns}
    per_block = max(1, -(-repeat // rounds))
    for _ in range(rounds):
        for name, fn in fns.items():
            t_end = time.perf_counter() + settle
            while time.perf_counter() < t_end:
                fn()
            times[name] += _samples(fn, number[name], per_block, block)
    return {name: statistics.median(t) for name, t in times.items()}


def bench_model(name: str, proto: Any, feeds: dict[str, np.ndarray], *, torch_fn: Callable[[], Any] | None,
                repeat: int, threads: int, run_tvm: bool, passes: str | None = None) -> BenchResult:
    """Compile ``proto`` with kiln, then time kiln, ORT and torch on ``feeds`` in alternating blocks; TVM's apart."""
    import kiln
    from kiln.codegen.target import host_target

    res = BenchResult(name)
    engines: dict[str, Callable[[], Any]] = {}
    ours = None
    try:
        t0 = time.perf_counter()
        art = kiln.compile(proto, feeds, passes=passes, progress=None)
        res.compile_s = time.perf_counter() - t0
        res.kernels = art.stats["kernels"]
        sess = art.load()
        ours = sess.run(feeds)
        engines["kiln"] = lambda: sess.run(feeds)
    except Exception as e:  # noqa: BLE001 - a benchmark row records the failure and goes on
        res.errors["kiln"] = f"{type(e).__name__}: {e}"
    try:
        ort_sess = _ort_session(proto, threads)
        theirs = ort_sess.run(None, feeds)
        engines["ort"] = lambda: ort_sess.run(None, feeds)
        if ours is not None:
            res.rel_err_vs_ort = max(_rel_err(a, b) for a, b in zip(ours.values(), theirs))
    except Exception as e:  # noqa: BLE001
        res.errors["ort"] = f"{type(e).__name__}: {e}"
    if torch_fn is not None:
        try:
            torch_fn()
            engines["torch"] = torch_fn
        except Exception as e:  # noqa: BLE001
            res.errors["torch"] = f"{type(e).__name__}: {e}"
    medians = block_medians(engines, repeat)
    res.kiln_ms, res.ort_ms, res.torch_ms = (1e3 * medians[k] if k in medians else None
                                             for k in ("kiln", "ort", "torch"))
    if run_tvm:
        try:
            fn, res.tvm_compile_s = _tvm_default(proto, feeds, host_target())
            res.tvm_ms = 1e3 * median_latency(fn, max(3, repeat // 5), warmup=1)
        except Exception as e:  # noqa: BLE001
            res.errors["tvm"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return res


def zoo_feeds(name: str) -> dict[str, np.ndarray]:
    """Zoo model ``name``'s example inputs by input name."""
    from kiln import zoo

    _, example = zoo.get(name)
    return {n: t.numpy() for n, t in zip(zoo.input_names(name), example)}


def _zoo_case(name: str, threads: int) -> tuple[Any, dict[str, np.ndarray], Callable[[], Any]]:
    import torch

    from kiln import zoo

    torch.set_num_threads(threads)
    module, example = zoo.get(name)
    module.eval()
    feeds = {n: t.numpy() for n, t in zip(zoo.input_names(name), example)}

    def run_torch() -> Any:
        with torch.inference_mode():
            return module(*example)

    return zoo.onnx_model(name), feeds, run_torch


def light_models() -> dict[str, str]:
    """onnx's packaged light CNNs (name -> path)."""
    import onnx

    d = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")
    return {f[len("light_"):-len(".onnx")]: os.path.join(d, f) for f in sorted(os.listdir(d)) if f.endswith(".onnx")}


def randomized_weights(model: Any, seed: int = 0) -> Any:
    """The light model with every ConstantOfShape weight replaced by a seeded random initializer.

    The stored outputs come from constant 0.02 weights, so every class gets the same
    score (the expected output is one repeated value); random weights (He-scaled, BN
    variances and scales in [0.5, 1.5]) make the output depend on every conv, pool and
    norm: what a comparison between engines needs.
    """
    import onnx
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(seed)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    shapes = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    positive = {n.input[i] for n in model.graph.node if n.op_type == "BatchNormalization" for i in (1, 4)}
    del out.graph.node[:]
    for node in model.graph.node:
        if node.op_type == "Softmax" and node.output[0] == model.graph.output[0].name:
            # stop before the final softmax: random logits would saturate it to one-hot
            out.graph.output[0].CopyFrom(helper.make_value_info(node.input[0], onnx.TypeProto()))
            continue
        if node.op_type != "ConstantOfShape":
            out.graph.node.append(node)
            continue
        shape = tuple(int(d) for d in shapes[node.input[0]])
        name = node.output[0]
        if name in positive:
            w = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        else:
            std = np.sqrt(2.0 / np.prod(shape[1:])) if len(shape) >= 2 else 0.1
            w = rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
        out.graph.initializer.append(numpy_helper.from_array(w, name))
    return out


def _light_case(path: str) -> tuple[Any, dict[str, np.ndarray]]:
    """A light model with random weights (its stored ones give a constant output) and a random input."""
    import onnx

    proto = randomized_weights(onnx.load(path))
    inits = {i.name for i in proto.graph.initializer}
    rng = np.random.default_rng(0)
    feeds = {}
    for vi in proto.graph.input:
        if vi.name in inits:
            continue
        shape = [d.dim_value or 1 for d in vi.type.tensor_type.shape.dim]
        feeds[vi.name] = rng.standard_normal(shape).astype(np.float32)
    return proto, feeds


def bench_matmul_kernels(shapes: Sequence[tuple[int, int, int]], threads: int, repeat: int = 20) -> list[dict[str, Any]]:
    """GFLOP/s of kiln's matmul kernel (constant packed weight) per (M, K, N), with ORT's MatMul and numpy's."""
    import onnx
    import tvm
    from onnx import TensorProto, helper

    from kiln import ir
    from kiln.codegen.kernel import build_kernel, lower_node
    from kiln.codegen.target import host_target

    target = host_target()
    rows = []
    for m, k, n in shapes:
        rng = np.random.default_rng(0)
        a = rng.standard_normal((m, k)).astype(np.float32)
        b = rng.standard_normal((k, n)).astype(np.float32)
        g = ir.Graph("mm")
        x = g.add_input("a", ir.TensorType("f32", (m, k)))
        w = g.add_constant(b, "b")
        g.set_outputs([g.add_node("matmul", [x, w], out_names=["c"]).output])
        kern = lower_node(g.nodes[0], target, name="matmul")
        mod = build_kernel(kern, target)
        dev = tvm.cpu()
        args = [tvm.runtime.tensor(a, dev)] + [tvm.runtime.tensor(ka.const if ka.value is None else b, dev)
                                               for ka in kern.args[1:]]
        out = tvm.runtime.empty((m, n), "float32", dev)
        evaluator = mod.time_evaluator("matmul", dev, number=5, repeat=repeat)
        t_kiln = float(np.median(evaluator(*args, out).results))
        err = float(np.max(np.abs(out.numpy() - a @ b)))
        model = helper.make_model(helper.make_graph(
            [helper.make_node("MatMul", ["a", "b"], ["c"])], "mm",
            [helper.make_tensor_value_info("a", TensorProto.FLOAT, [m, k])],
            [helper.make_tensor_value_info("c", TensorProto.FLOAT, [m, n])],
            [onnx.numpy_helper.from_array(b, "b")]), opset_imports=[helper.make_opsetid("", 18)])
        model.ir_version = 10
        ort_sess = _ort_session(model, threads)
        t_ort = median_latency(lambda s=ort_sess, a=a: s.run(None, {"a": a}), repeat, min_time=0.3)
        t_np = median_latency(lambda a=a, b=b: a @ b, repeat, min_time=0.3)
        flop = 2.0 * m * k * n
        rows.append({"shape": f"{m}x{k}x{n}", "kiln_gflops": flop / t_kiln / 1e9, "ort_gflops": flop / t_ort / 1e9,
                     "numpy_gflops": flop / t_np / 1e9, "max_abs_err": err})
    return rows


def qdq_model(proto: Any, samples: Sequence[dict[str, np.ndarray]]) -> Any:
    """onnxruntime's static QDQ quantization of ``proto`` (QInt8 activations and weights, per channel, MinMax)."""
    import tempfile

    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(samples)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.it, None)

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "float.onnx"), os.path.join(tmp, "qdq.onnx")
        onnx.save(proto, src)
        quantize_static(src, dst, Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8,
                        weight_type=QuantType.QInt8, per_channel=True)
        return onnx.load(dst)


def calibration_samples(feeds: Mapping[str, np.ndarray], n: int = 8, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """``n`` inputs like ``feeds``: float inputs perturbed by noise of their own scale, integer inputs (token
    ids) permuted, so the calibration ranges are not those of the one timed input."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        s = {}
        for k, v in feeds.items():
            if v.dtype.kind == "f":
                s[k] = (v + rng.standard_normal(v.shape) * (float(np.std(v)) or 1.0)).astype(v.dtype)
            else:
                s[k] = rng.permutation(v.reshape(-1)).reshape(v.shape)
        out.append(s)
    return out


@dataclass
class Int8Row:
    """One model: kiln float / kiln int8 / ORT float / ORT int8 median latencies (ms) and accuracy facts."""

    model: str
    kiln_f32_ms: float | None = None
    kiln_int8_ms: float | None = None
    ort_f32_ms: float | None = None
    ort_int8_ms: float | None = None
    int8_layers: str = "-"  # integer kernels / matmul+conv layers in the compiled int8 graph
    int8_source: str = "-"  # "kiln.quantize", or "ORT QDQ" (onnxruntime's QDQ model, lifted)
    err_int8_vs_ort_int8: float | None = None
    err_int8_vs_f32: float | None = None
    errors: dict[str, str] = field(default_factory=dict)


def bench_int8(name: str, proto: Any, feeds: dict[str, np.ndarray], *, repeat: int, threads: int) -> Int8Row:
    """The four engines on one model in alternating blocks, on the same calibration samples.

    ORT int8 runs onnxruntime's QDQ model (``quantize_static``, default optimizations). kiln int8 compiles
    ``kiln.quantize``'s QDQ graph (w8a8, per channel) where that module exists and quantizes the model, else
    onnxruntime's QDQ model lifted; fuse-qlinear turns the QDQ matmuls/convs into integer kernels.
    """
    import kiln
    from kiln.frontend import lift

    row = Int8Row(name)
    engines: dict[str, Callable[[], Any]] = {}
    outs: dict[str, list[np.ndarray]] = {}

    def add(key: str, make: Callable[[], Callable[[], Any]]) -> None:
        try:
            fn = make()
            outs[key] = _as_list(fn())
            engines[key] = fn
        except Exception as e:  # noqa: BLE001 - a benchmark row records the failure and goes on
            row.errors[key] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"

    def kiln_fn(model: Any) -> Callable[[], Any]:
        sess = kiln.compile(model, feeds).load()
        return lambda: sess.run(feeds)

    qdq = None
    try:
        qdq = qdq_model(proto, calibration_samples(feeds))
    except Exception as e:  # noqa: BLE001
        row.errors["quantize_static"] = f"{type(e).__name__}: {e}"

    samples = calibration_samples(feeds)

    def int8_graph() -> Any:
        try:
            from kiln.passes.quantize import quantize

            g = quantize(proto, samples).graph
            row.int8_source = "kiln.quantize"
            return g
        except Exception as e:  # noqa: BLE001 - not there yet, or refused: onnxruntime's QDQ model instead
            row.errors["kiln.quantize"] = f"{type(e).__name__}: {str(e)[:200]}"
        row.int8_source = "ORT QDQ"
        return lift(qdq, canonicalize=False)  # canonicalize would fold the weight dequantizes to floats

    def kiln_int8() -> Callable[[], Any]:
        art = kiln.compile(int8_graph(), feeds)
        ops = art.ir_text
        fused = ops.count("= qmatmul(") + ops.count("= qconv(") + ops.count("= dq_matmul(")
        row.int8_layers = f"{fused}/{fused + ops.count('= matmul(') + ops.count('= conv(')}"
        sess = art.load()
        return lambda: sess.run(feeds)

    add("kiln_f32", lambda: kiln_fn(proto))
    def ort_fn(model: Any) -> Callable[[], Any]:
        sess = _ort_session(model, threads)
        return lambda: sess.run(None, feeds)

    add("ort_f32", lambda: ort_fn(proto))
    if qdq is not None:
        add("kiln_int8", kiln_int8)
        add("ort_int8", lambda: ort_fn(qdq))
    if "kiln_int8" in outs and "ort_int8" in outs:
        row.err_int8_vs_ort_int8 = max(_rel_err(a, b) for a, b in zip(outs["kiln_int8"], outs["ort_int8"]))
    if "kiln_int8" in outs and "ort_f32" in outs:
        row.err_int8_vs_f32 = max(_rel_err(a, b) for a, b in zip(outs["kiln_int8"], outs["ort_f32"]))
    medians = block_medians(engines, repeat)
    for key in ("kiln_f32", "kiln_int8", "ort_f32", "ort_int8"):
        setattr(row, f"{key}_ms", 1e3 * medians[key] if key in medians else None)
    return row


def int8_cases(names: Sequence[str], threads: int) -> list[tuple[str, Any, dict[str, np.ndarray]]]:
    """(name, float ONNX model, feeds) for the zoo models in ``names`` and, when "minilm" is one of them and
    kiln.minilm can load it, MiniLM."""
    cases = []
    for name in names:
        if name != "minilm":
            proto, feeds, _ = _zoo_case(name, threads)
            cases.append((name, proto, feeds))
    if "minilm" not in names:
        return cases
    try:
        from kiln import minilm

        feeds = minilm.encode(minilm.load_tokenizer(), minilm.sentences(1, 0))
        cases.append(("minilm", minilm.minilm_onnx(batch=1), feeds))
    except Exception as e:  # noqa: BLE001 - MiniLM needs its weights on disk; the zoo rows stand without it
        print(f"MiniLM skipped: {type(e).__name__}: {e}")
    return cases


def print_int8_table(rows: Sequence[Int8Row], title: str) -> None:
    from rich.table import Table

    from kiln.cli import console

    t = Table(title=title, title_justify="left")
    for col in ("model", "kiln f32", "kiln int8", "ORT f32", "ORT int8", "kiln int8/f32", "kiln int8/ORT int8",
                "int8 layers", "int8 from", "err vs ORT int8", "err vs f32"):
        t.add_column(col, justify="right")
    for r in rows:
        ratio = lambda a, b: f"{a / b:.2f}" if a and b else "-"  # noqa: E731
        t.add_row(r.model, _ms(r.kiln_f32_ms), _ms(r.kiln_int8_ms), _ms(r.ort_f32_ms), _ms(r.ort_int8_ms),
                  ratio(r.kiln_int8_ms, r.kiln_f32_ms), ratio(r.kiln_int8_ms, r.ort_int8_ms), r.int8_layers, r.int8_source,
                  _fmt(r.err_int8_vs_ort_int8, ".1e"), _fmt(r.err_int8_vs_f32, ".1e"))
    console.print(t)
    for r in rows:
        for k, v in r.errors.items():
            console.print(f"  {r.model} {k}: {v}")


@dataclass
class Variant:
    """One way to build a model for the pass-variant table: a label, the ONNX model, the kiln pipeline."""

    model: str
    label: str
    proto: Any
    passes: str
    engine: str = "kiln"  # or "ort": ONNX Runtime on ``proto``, timed beside kiln's variants


def _without_batch_norm(module: Any) -> Any:
    """A copy of ``module`` with every BatchNorm replaced by Identity: the CNN as if built without BN."""
    import copy

    import torch

    bare = copy.deepcopy(module)
    for child in list(bare.modules()):
        for attr, sub in list(child.named_children()):
            if isinstance(sub, torch.nn.modules.batchnorm._BatchNorm):
                setattr(child, attr, torch.nn.Identity())
    return bare.eval()


def norm_variants() -> tuple[list[Variant], dict[str, dict[str, np.ndarray]]]:
    """GPT and ViT as Pre-LN (γ/β kept or folded), Pre-RMSNorm, Pre-CRMSNorm; ResNet with BN, BN folded, without BN.

    Pre-RMSNorm folds γ/β into the next linear layers as Pre-CRMSNorm does, so
    the two differ from "Pre-LN, affine folded" only by the norm itself.
    """
    from kiln import zoo
    from kiln.frontend import export

    base = "canonicalize,dce,fuse-blocks"
    variants, feeds = [], {}
    for name in ("gpt", "vit"):
        proto = zoo.onnx_model(name)
        variants += [Variant(name, "Pre-LN", proto, base),
                     Variant(name, "Pre-LN, affine folded", proto, "canonicalize,fold-ln-affine,dce,fuse-blocks"),
                     Variant(name, "Pre-RMSNorm", proto, "canonicalize,ln-to-rmsnorm,fold-ln-affine,dce,fuse-blocks"),
                     Variant(name, "Pre-CRMSNorm", proto, "canonicalize,ln-to-crmsnorm,dce,fuse-blocks")]
        feeds[name] = zoo_feeds(name)
    module, example = zoo.get("resnet")
    bare = export(_without_batch_norm(module), example, input_names=zoo.input_names("resnet"),
                  output_names=zoo.output_names("resnet"))
    proto = zoo.onnx_model("resnet")
    variants += [Variant("resnet", "BN kept", proto, base),
                 Variant("resnet", "BN folded", proto, "canonicalize,fold-conv-bn,dce,fuse-blocks"),
                 Variant("resnet", "built without BN", bare, base)]
    feeds["resnet"] = zoo_feeds("resnet")
    return variants, feeds


FUSION_OFF = "canonicalize,fold-conv-bn,dce"
FUSION_ON = "canonicalize,fold-conv-bn,dce,fuse-blocks"


def fusion_variants(names: Sequence[str]) -> tuple[list[Variant], dict[str, dict[str, np.ndarray]]]:
    """Each zoo model with block fusion off (anchor + epilogue kernels only) and on, and ONNX Runtime."""
    from kiln import zoo

    variants, feeds = [], {}
    for name in names:
        proto, feeds[name] = zoo.onnx_model(name), zoo_feeds(name)
        variants += [Variant(name, "fusion off", proto, FUSION_OFF), Variant(name, "fusion on", proto, FUSION_ON),
                     Variant(name, "ONNX Runtime", proto, "", engine="ort")]
    return variants, feeds


def _variant_runner(v: Variant, feeds: dict[str, np.ndarray], threads: int) -> tuple[Callable[[], Any], dict[str, Any]]:
    """A callable running variant ``v`` on ``feeds`` and its compile facts (kernels, nodes, ops)."""
    import kiln

    if v.engine == "ort":
        sess = _ort_session(v.proto, threads)
        return (lambda: sess.run(None, feeds)), {}
    art = kiln.compile(v.proto, feeds, passes=v.passes)
    ksess = art.load()
    return (lambda: ksess.run(feeds)), {"kernels": art.stats["kernels"], "nodes": art.stats["nodes"],
                                        "ops": dict(sorted(Counter(re.findall(r"= (\w+)\(", art.ir_text)).items()))}


def _as_list(out: Any) -> list[np.ndarray]:
    return list(out.values()) if isinstance(out, Mapping) else list(out)


def bench_variants(variants: Sequence[Variant], feeds: Mapping[str, dict[str, np.ndarray]],
                   repeat: int, threads: int = 2) -> list[dict[str, Any]]:
    """Compile every variant, then time each model's variants together in alternating blocks (one run)."""
    rows: list[dict[str, Any]] = []
    for model in dict.fromkeys(v.model for v in variants):
        group = [v for v in variants if v.model == model]
        runs: dict[str, Callable[[], Any]] = {}
        outs: dict[str, list[np.ndarray]] = {}
        info: dict[str, dict[str, Any]] = {}
        for v in group:
            row = {"model": model, "variant": v.label, "passes": v.passes if v.engine == "kiln" else v.engine}
            try:
                runs[v.label], facts = _variant_runner(v, feeds[model], threads)
                outs[v.label] = _as_list(runs[v.label]())
                row.update(facts)
            except Exception as e:  # noqa: BLE001 - a row records the failure and goes on
                row["error"] = f"{type(e).__name__}: {e}"
            info[v.label] = row
        medians = block_medians(runs, repeat)
        base = group[0].label
        for v in group:
            row = info[v.label]
            if v.label in medians:
                row["ms"] = 1e3 * medians[v.label]
                if base in medians:
                    row["vs_first"] = medians[v.label] / medians[base]
                    if v.label != base and base in outs and v.proto is group[0].proto:
                        row["rel_err_vs_first"] = max(_rel_err(a, b) for a, b in zip(outs[v.label], outs[base]))
            rows.append(row)
    return rows


def print_variant_table(rows: Sequence[Mapping[str, Any]], title: str) -> None:
    from rich.table import Table

    from kiln.cli import console

    table = Table(title=title, title_justify="left")
    for col in ("model", "variant", "kiln ms", "vs first", "kernels", "rel err vs first", "pipeline"):
        table.add_column(col, justify="left" if col in ("model", "variant", "pipeline") else "right")
    for r in rows:
        table.add_row(r["model"], r["variant"], _ms(r.get("ms")), _fmt(r.get("vs_first"), ".3f"),
                      _fmt(r.get("kernels"), "d"), _fmt(r.get("rel_err_vs_first"), ".1e"), r["passes"])
    console.print(table)
    for r in rows:
        if "error" in r:
            console.print(f"[red]{r['model']} / {r['variant']}[/]: {r['error']}", soft_wrap=True)


# ------------------------------------------------------------------ contention: a shared CPU

BUSY_LOOP = "while True: pass"


@contextmanager
def busy_loops(n: int) -> Iterator[list[subprocess.Popen]]:
    """``n`` processes spinning in a busy loop (the CPU's other tenants) for the duration."""
    procs = [subprocess.Popen([sys.executable, "-S", "-c", BUSY_LOOP]) for _ in range(n)]
    try:
        if procs:
            time.sleep(0.3)  # interpreter start-up done: they spin from here on
        yield procs
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


class _OverOrt:
    """A row's kiln/ORT ratio (None unless both ran) and its JSON form with the ratio in it."""

    @property
    def kiln_over_ort(self) -> float | None:
        return self.kiln_ms / self.ort_ms if self.kiln_ms and self.ort_ms else None

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "kiln_over_ort": self.kiln_over_ort}


@dataclass
class ContentionRow(_OverOrt):
    """One model beside ``busy`` busy loops: medians in ms (None: engine not run or failed)."""

    model: str
    busy: int
    kiln_ms: float | None = None
    ort_ms: float | None = None
    openvino_ms: float | None = None
    tvm_pool_ms: float | None = None  # kiln's kernels on TVM's own thread pool (--tvm-pool)
    drift: float | None = None  # kiln/ORT here over kiln/ORT with no busy loop
    errors: dict[str, str] = field(default_factory=dict)


@dataclass
class PairRow(_OverOrt):
    """Two processes of one engine running at once: each process's median ms (the slower one reported)."""

    model: str
    kiln_ms: float | None = None
    ort_ms: float | None = None
    single_kiln_ms: float | None = None  # one kiln process, no busy loop (from the contention rows)
    errors: dict[str, str] = field(default_factory=dict)


def contention_cases(names: Sequence[str], threads: int) -> Iterator[tuple[str, Any, dict[str, np.ndarray]]]:
    """(label, ONNX model, feeds) per name: a zoo model, or ``corpus/NAME`` for a corpus entry."""
    for name in names:
        if name.startswith("corpus/"):
            from kiln import corpus

            cm = corpus.build(name[len("corpus/"):])
            yield name, cm.model, cm.feeds
        else:
            proto, feeds, _ = _zoo_case(name, threads)
            yield name, proto, feeds


def _openvino_fn(proto: Any, feeds: dict[str, np.ndarray], threads: int) -> Callable[[], Any]:
    """OpenVINO's CPU plugin on ``proto`` (ImportError when OpenVINO is not installed)."""
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(core.read_model(proto.SerializeToString()), "CPU",
                                  {"INFERENCE_NUM_THREADS": threads})
    request = compiled.create_infer_request()
    return lambda: request.infer(feeds)


def _kiln_fn(art: Any, feeds: dict[str, np.ndarray], threads: int, pool: str | None = None) -> Callable[[], Any]:
    """``art`` loaded with ``threads`` threads on kiln's pool, or on TVM's with ``pool="tvm"``."""
    saved = os.environ.get("KILN_THREAD_POOL")
    if pool is not None:
        os.environ["KILN_THREAD_POOL"] = pool
    try:
        sess = art.load(threads=threads)
    finally:
        if saved is None:
            os.environ.pop("KILN_THREAD_POOL", None)
        else:
            os.environ["KILN_THREAD_POOL"] = saved
    return lambda: sess.run(feeds)


def _ort_fn(proto: Any, feeds: dict[str, np.ndarray], threads: int) -> Callable[[], Any]:
    sess = _ort_session(proto, threads)
    return lambda: sess.run(None, feeds)


def _engines(proto: Any, feeds: dict[str, np.ndarray], art: Any, threads: int, tvm_pool: bool,
             errors: dict[str, str]) -> dict[str, Callable[[], Any]]:
    """The engines to alternate: kiln (its pool), ORT, OpenVINO, and kiln on TVM's pool if asked."""
    makers: dict[str, Callable[[], Callable[[], Any]]] = {}
    if art is not None:
        makers["kiln"] = lambda: _kiln_fn(art, feeds, threads)
    makers["ort"] = lambda: _ort_fn(proto, feeds, threads)
    makers["openvino"] = lambda: _openvino_fn(proto, feeds, threads)
    if art is not None and tvm_pool:
        makers["tvm_pool"] = lambda: _kiln_fn(art, feeds, threads, pool="tvm")
    engines: dict[str, Callable[[], Any]] = {}
    for name, make in makers.items():
        try:
            fn = make()
            fn()
            engines[name] = fn
        except ImportError as e:
            errors[name] = f"not installed ({e})"
        except Exception as e:  # noqa: BLE001 - a row records the failure and goes on
            errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    return engines


def bench_contention(name: str, proto: Any, feeds: dict[str, np.ndarray], *, threads: int, repeat: int,
                     rounds: int = 5, busy: Sequence[int] = (0, 1, 2), tvm_pool: bool = False,
                     passes: str | None = None) -> tuple[list[ContentionRow], Any]:
    """Compile ``proto``, then per busy-loop count time the engines in alternating blocks; (rows, artifact)."""
    import kiln

    errors: dict[str, str] = {}
    art = None
    try:
        art = kiln.compile(proto, feeds, passes=passes, progress=None)
    except Exception as e:  # noqa: BLE001
        errors["kiln"] = f"{type(e).__name__}: {e}"
    engines = _engines(proto, feeds, art, threads, tvm_pool, errors)
    rows: list[ContentionRow] = []
    for n in busy:
        with busy_loops(n):
            medians = block_medians(engines, repeat, rounds=rounds, settle=0.1) if engines else {}
        ms = {k: 1e3 * v for k, v in medians.items()}
        rows.append(ContentionRow(name, n, ms.get("kiln"), ms.get("ort"), ms.get("openvino"), ms.get("tvm_pool"),
                                  errors=dict(errors)))
    quiet = rows[0].kiln_over_ort if rows and rows[0].busy == 0 else None
    for r in rows:
        r.drift = r.kiln_over_ort / quiet if quiet and r.kiln_over_ort else None
    return rows, art


def _pair_worker(engine: str, path: str, feeds_path: str, threads: int, seconds: float, barrier: Any,
                 results: Any) -> None:
    """One process of a pair: load, warm up, wait for the other, then run for ``seconds``; put the median."""
    with np.load(feeds_path) as z:
        feeds = {k: z[k] for k in z.files}
    if engine == "kiln":
        from kiln.runtime import load

        sess = load(path, threads=threads)
        fn: Callable[[], Any] = lambda: sess.run(feeds)
    else:
        import onnx

        ort_sess = _ort_session(onnx.load(path), threads)
        fn = lambda: ort_sess.run(None, feeds)
    for _ in range(5):
        fn()
    barrier.wait()
    times = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    results.put(statistics.median(times))


def _run_pair(engine: str, path: str, feeds_path: str, threads: int, seconds: float) -> float:
    """The slower of two processes' median seconds per run, both running ``engine`` at once."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_pair_worker, args=(engine, path, feeds_path, threads, seconds, barrier, results))
             for _ in range(2)]
    for p in procs:
        p.start()
    try:
        medians = [results.get(timeout=seconds + 300) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return max(medians)


def bench_pairs(name: str, proto: Any, feeds: dict[str, np.ndarray], art: Any, *, threads: int,
                seconds: float = 3.0) -> PairRow:
    """Two kiln processes at once, then two ORT processes at once, each with ``threads`` threads."""
    import onnx

    row = PairRow(name)
    with tempfile.TemporaryDirectory(prefix="kiln-pairs-") as d:
        feeds_path, onnx_path = os.path.join(d, "feeds.npz"), os.path.join(d, "model.onnx")
        np.savez(feeds_path, **feeds)
        onnx.save(proto, onnx_path)
        paths = {"ort": onnx_path}
        if art is not None:
            paths["kiln"] = art.save(os.path.join(d, "model.kiln"))
        for engine, path in paths.items():
            try:
                setattr(row, f"{engine}_ms", 1e3 * _run_pair(engine, path, feeds_path, threads, seconds))
            except Exception as e:  # noqa: BLE001
                row.errors[engine] = f"{type(e).__name__}: {e}"
    return row


def print_contention(rows: Sequence[ContentionRow], pairs: Sequence[PairRow], title: str) -> None:
    from rich.table import Table

    from kiln.cli import console

    tvm_pool = any(r.tvm_pool_ms is not None for r in rows)
    table = Table(title=title, title_justify="left")
    cols = ["model", "busy loops", "kiln ms", "ORT ms", "OpenVINO ms"] + (["kiln on TVM pool ms"] if tvm_pool else [])
    for col in cols + ["kiln/ORT", "vs no busy loop"]:
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in rows:
        cells = [r.model, str(r.busy), _ms(r.kiln_ms), _ms(r.ort_ms), _ms(r.openvino_ms)]
        cells += [_ms(r.tvm_pool_ms)] if tvm_pool else []
        table.add_row(*cells, _fmt(r.kiln_over_ort), _fmt(r.drift))
    console.print(table)
    if pairs:
        t = Table(title="two processes at once, each with the same threads: the slower one's median ms",
                  title_justify="left")
        for col in ("model", "kiln x2 ms", "ORT x2 ms", "kiln/ORT", "kiln alone ms"):
            t.add_column(col, justify="left" if col == "model" else "right")
        for p in pairs:
            t.add_row(p.model, _ms(p.kiln_ms), _ms(p.ort_ms), _fmt(p.kiln_over_ort), _ms(p.single_kiln_ms))
        console.print(t)
    drifts = [(r.drift, r.model, r.busy) for r in rows if r.drift is not None]
    if drifts:
        worst = max(drifts)
        console.print(f"worst kiln/ORT drift under busy loops: {worst[0]:.2f}x ({worst[1]}, {worst[2]} busy)")
    for r in rows:
        if r.busy == 0:
            for engine, msg in r.errors.items():
                console.print(f"[red]{r.model} / {engine}[/]: {msg}", soft_wrap=True)
    for p in pairs:
        for engine, msg in p.errors.items():
            console.print(f"[red]{p.model} pair / {engine}[/]: {msg}", soft_wrap=True)


def run_contention(args: argparse.Namespace, out: dict[str, Any]) -> int:
    """``kiln bench --contention``: the zoo and the corpus beside busy loops, then in pairs of processes."""
    from kiln import corpus, zoo

    names = args.models or [*zoo.names(), *(f"corpus/{n}" for n in corpus.names())]
    busy = [int(b) for b in args.busy.split(",")]
    rows: list[ContentionRow] = []
    pairs: list[PairRow] = []
    for name, proto, feeds in contention_cases(names, args.threads):
        got, art = bench_contention(name, proto, feeds, threads=args.threads, repeat=args.repeat,
                                    rounds=args.rounds, busy=busy, tvm_pool=args.tvm_pool, passes=args.passes)
        rows += got
        if not args.no_pairs:
            pair = bench_pairs(name, proto, feeds, art, threads=args.threads, seconds=args.pair_seconds)
            pair.single_kiln_ms = got[0].kiln_ms if got and got[0].busy == 0 else None
            pairs.append(pair)
        out["contention"] = [r.as_dict() for r in rows]
        out["pairs"] = [p.as_dict() for p in pairs]
        _write_json(args.json, out)
    print_contention(rows, pairs, f"kiln bench --contention: median ms beside busy-loop processes, "
                                  f"{args.threads} threads, {args.rounds} alternating rounds")
    return 0


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def _ms(x: float | None) -> str:
    """Milliseconds, three decimals below 1 ms (the MLP runs in ~0.01 ms)."""
    return "-" if x is None else format(x, ".3f" if x < 1 else ".2f")


def print_table(results: Sequence[BenchResult], title: str) -> None:
    from rich.table import Table

    from kiln.cli import console

    table = Table(title=title, title_justify="left")
    for col in ("model", "kiln ms", "ORT ms", "torch ms", "TVM ms", "kiln/ORT", "kiln/torch", "kernels",
                "compile s", "rel err vs ORT"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in results:
        table.add_row(r.model, _ms(r.kiln_ms), _ms(r.ort_ms), _ms(r.torch_ms), _ms(r.tvm_ms),
                      _fmt(r.kiln_over_ort), _fmt(r.kiln_over_torch), _fmt(r.kernels, "d"),
                      _fmt(r.compile_s, ".1f"), _fmt(r.rel_err_vs_ort, ".1e"))
    console.print(table)
    for r in results:
        for engine, msg in r.errors.items():
            console.print(f"[red]{r.model} / {engine}[/]: {msg}", soft_wrap=True)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("models", nargs="*", help="zoo model names (default: all)")
    p.add_argument("--light", action="store_true", help="also benchmark onnx's light CNN models (kiln vs ORT)")
    p.add_argument("--corpus", action="store_true",
                   help="also benchmark the public model corpus (kiln.corpus: HF, vision, ORT-quantized; kiln vs ORT)")
    p.add_argument("--kernels", action="store_true", help="GFLOP/s of kiln's matmul kernels vs ORT and numpy")
    p.add_argument("--fusion", action="store_true",
                   help="only the fusion table: kernels and latency with fuse-blocks off and on, and ORT")
    p.add_argument("--norms", action="store_true",
                   help="only the norm-folding table: GPT/ViT as Pre-LN, Pre-RMSNorm, Pre-CRMSNorm; ResNet with "
                        "BN, BN folded, built without BN")
    p.add_argument("--int8", action="store_true",
                   help="kiln float / kiln int8 / ORT float / ORT int8 (onnxruntime QDQ, per channel) per model")
    p.add_argument("--no-tvm", action="store_true", help="skip TVM's own from_onnx path (slow to run)")
    p.add_argument("--repeat", type=int, default=20, help="timed runs per engine (median reported)")
    p.add_argument("--threads", type=int, default=2, help="threads for every engine")
    p.add_argument("--passes", default=None, help="kiln pass pipeline")
    p.add_argument("--json", metavar="FILE", help="write the numbers as JSON")
    p.add_argument("--contention", action="store_true",
                   help="only the shared-CPU table: zoo and corpus (corpus/NAME) models beside 0, 1 and 2 busy "
                        "loops (kiln, ORT, OpenVINO), then two processes of each engine at once")
    p.add_argument("--busy", default="0,1,2", help="--contention: busy-loop counts (the first is the reference)")
    p.add_argument("--rounds", type=int, default=5, help="--contention: alternating rounds per busy-loop count")
    p.add_argument("--tvm-pool", action="store_true", help="--contention: also kiln's kernels on TVM's thread pool")
    p.add_argument("--no-pairs", action="store_true", help="--contention: skip the two-process runs")
    p.add_argument("--pair-seconds", type=float, default=3.0, help="--contention: seconds each pair runs")


def run(args: argparse.Namespace) -> int:
    from kiln import zoo
    from kiln.codegen.target import configure_threads, target_summary

    configure_threads(args.threads)
    out: dict[str, Any] = {"threads": args.threads, "repeat": args.repeat, "target": target_summary(None)}
    if getattr(args, "contention", False):
        return run_contention(args, out)
    tables = {"fusion": (lambda: fusion_variants(args.models or zoo.names()), "block fusion off/on vs ONNX Runtime"),
              "norms": (norm_variants, "compiled latency by pass pipeline")}
    for key, (make, what) in tables.items():
        if getattr(args, key):
            variants, feeds = make()
            rows = bench_variants(variants, feeds, args.repeat, args.threads)
            print_variant_table(rows, f"kiln bench --{key}: {what}, {args.threads} threads, median of {args.repeat}")
            out[key] = rows
            _write_json(args.json, out)
            return 0
    if args.int8:
        names = args.models or ["resnet", "mlp", "bert", "minilm"]
        rows = [bench_int8(n, proto, feeds, repeat=args.repeat, threads=args.threads)
                for n, proto, feeds in int8_cases(names, args.threads)]
        print_int8_table(rows, f"kiln bench --int8: median ms, {args.threads} threads, median of {args.repeat}")
        out["int8"] = [asdict(r) for r in rows]
        _write_json(args.json, out)
        return 0
    names = args.models or zoo.names()
    unknown = [n for n in names if n not in zoo.names()]
    if unknown:
        raise SystemExit(f"unknown zoo model(s) {unknown}; the zoo has {zoo.names()}")
    results = []
    for name in names:
        proto, feeds, torch_fn = _zoo_case(name, args.threads)
        results.append(bench_model(name, proto, feeds, torch_fn=torch_fn, repeat=args.repeat,
                                   threads=args.threads, run_tvm=not args.no_tvm, passes=args.passes))
    print_table(results, f"kiln bench: zoo models, fp32, batch 1, {args.threads} threads, median of {args.repeat}")
    out["zoo"] = [r.as_dict() for r in results]
    if args.light:
        light = []
        for name, path in light_models().items():
            proto, feeds = _light_case(path)
            light.append(bench_model(name, proto, feeds, torch_fn=None, repeat=args.repeat,
                                     threads=args.threads, run_tvm=False, passes=args.passes))
        print_table(light, "kiln bench: onnx light models (kiln vs ORT)")
        out["light"] = [r.as_dict() for r in light]
    if args.corpus:
        from kiln import corpus

        rows = []
        for name in corpus.names():
            cm = corpus.build(name)
            rows.append(bench_model(name, cm.model, cm.feeds, torch_fn=None, repeat=args.repeat,
                                    threads=args.threads, run_tvm=False, passes=args.passes))
        print_table(rows, "kiln bench: the public model corpus (kiln.corpus), kiln vs ORT")
        out["corpus"] = [r.as_dict() for r in rows]
    if args.kernels:
        rows = bench_matmul_kernels([(512, 512, 512), (128, 256, 1024), (128, 1024, 256), (1, 512, 512)],
                                    args.threads)
        from rich.table import Table

        from kiln.cli import console

        t = Table(title="matmul kernels (constant weight), GFLOP/s", title_justify="left")
        for col in ("M x K x N", "kiln", "ORT", "numpy", "max |err|"):
            t.add_column(col, justify="right")
        for r in rows:
            t.add_row(r["shape"], f"{r['kiln_gflops']:.1f}", f"{r['ort_gflops']:.1f}", f"{r['numpy_gflops']:.1f}",
                      f"{r['max_abs_err']:.1e}")
        console.print(t)
        out["matmul_kernels"] = rows
    _write_json(args.json, out)
    return 0


def _write_json(path: str | None, out: Mapping[str, Any]) -> None:
    if path:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(out, f, indent=2)
        os.replace(tmp, path)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kiln.bench", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
