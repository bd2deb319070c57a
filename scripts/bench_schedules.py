#!/usr/bin/env python
"""Benchmark kiln's CPU schedules against untuned TVM, numpy, torch and ONNX Runtime.

For each kernel: the same TE compute built by TVM with no schedule ("TE
default"), kiln's schedule (kiln.codegen.schedules), numpy, torch (N threads)
and ONNX Runtime (N intra-op threads, a one-op model).  Every column is timed
the same way: perf_counter around a batch of calls from Python with
preallocated outputs where the API has them; a cell is the median over
``--repeats`` timed batches, and the best such median over ``--rounds``
rounds taken a few seconds apart (this machine is shared: other processes'
bursts hit single rounds; the load average is printed).

    .venv/bin/python scripts/bench_schedules.py [--repeats 15] [--threads 2] [--only matmul]

GFLOP/s conventions: matmul 2*M*N*K, conv 2*N*OC*OH*OW*IC/groups*KH*KW,
layer norm 8 flops per element, add 1 per element.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--repeats", type=int, default=15, help="timed repeats per column (median)")
    p.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="measure every case this many times, a while apart; report the best round's median",
    )
    p.add_argument("--threads", type=int, default=2, help="threads for TVM, torch, ORT, OpenBLAS")
    p.add_argument(
        "--budget", type=float, default=1.5, help="max seconds per cell (slow baselines)"
    )
    p.add_argument("--only", default="", help="run the cases whose name contains this")
    p.add_argument("--markdown", action="store_true", help="print a markdown table")
    return p.parse_args()


ARGS = _parse()
# thread counts must be fixed before the libraries start their pools
os.environ["TVM_NUM_THREADS"] = str(ARGS.threads)
os.environ.setdefault("OPENBLAS_NUM_THREADS", str(ARGS.threads))
os.environ.setdefault("OMP_NUM_THREADS", str(ARGS.threads))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import tvm  # noqa: E402
from numpy.lib.stride_tricks import sliding_window_view  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from tvm import te  # noqa: E402

from kiln.codegen import schedules as S  # noqa: E402
from kiln.codegen.target import host_target, target_summary  # noqa: E402

torch.set_num_threads(ARGS.threads)
TARGET = host_target(ARGS.threads)
DEV = tvm.cpu()
RNG = np.random.default_rng(0)


def rnd(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype("float32")


# --------------------------------------------------------------------------
# runners: each returns a zero-argument callable doing one inference
# --------------------------------------------------------------------------


def tvm_runner(sch_or_func, arrays: list[np.ndarray], out_shape) -> tuple[Callable, np.ndarray]:
    mod = S.build(sch_or_func, TARGET)
    args = [tvm.runtime.tensor(np.array(a, order="C"), DEV) for a in arrays]
    out = tvm.runtime.tensor(np.zeros(out_shape, "float32"), DEV)
    f = mod["main"]

    def call():
        f(*args, out)

    call()
    return call, out.numpy()


def ort_runner(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> tuple[Callable, np.ndarray]:
    model.ir_version = min(model.ir_version, 10)  # onnxruntime 1.31 reads <= 13
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = ARGS.threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    binding = sess.io_binding()
    for name, value in feeds.items():
        binding.bind_cpu_input(name, value)
    out_name = sess.get_outputs()[0].name
    binding.bind_output(out_name, "cpu")
    sess.run_with_iobinding(binding)
    ref = binding.copy_outputs_to_cpu()[0]
    # bind the output buffer ORT allocated so later runs reuse it
    ov = binding.get_outputs()[0]
    binding.bind_ortvalue_output(out_name, ov)

    def call():
        sess.run_with_iobinding(binding)

    return call, ref


def onnx_model(nodes, inputs, output, inits=()) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "bench",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(output[0], TensorProto.FLOAT, output[1])],
        [numpy_helper.from_array(a, n) for n, a in inits],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


# --------------------------------------------------------------------------
# cases
# --------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    flops: float
    runners: dict[str, Callable] = field(default_factory=dict)
    ref: np.ndarray | None = None
    notes: str = ""


def case_matmul(M: int, N: int, K: int) -> Case:
    c = Case(f"matmul M{M} N{N} K{K}", 2.0 * M * N * K)
    a, b = rnd(M, K), rnd(K, N)
    c.ref = a.astype("float64") @ b
    A = te.placeholder((M, K), name="A")
    B = te.placeholder((K, N), name="B")
    k = te.reduce_axis((0, K), name="k")
    C = te.compute((M, N), lambda i, j: te.sum(A[i, k] * B[k, j], axis=k), name="matmul")
    c.runners["TE default"] = tvm_runner(te.create_prim_func([A, B, C]), [a, b], (M, N))
    mm = S.packed_matmul_te(A, (K, N), prepacked=True)  # B constant: packed at compile time
    sch = S.schedule_matmul(mm.prim_func(), "matmul", target=TARGET)
    c.runners["kiln schedule"] = tvm_runner(sch, [a, S.pack_weight(b)], (M, N))
    out = np.empty((M, N), "float32")
    c.runners["numpy"] = (lambda: np.matmul(a, b, out=out), a @ b)
    ta, tb, to = torch.from_numpy(a), torch.from_numpy(b), torch.empty(M, N)
    c.runners["torch"] = (lambda: torch.matmul(ta, tb, out=to), (ta @ tb).numpy())
    model = onnx_model(
        [helper.make_node("MatMul", ["a", "b"], ["c"])], [("a", [M, K])], ("c", [M, N]), [("b", b)]
    )
    c.runners["onnxruntime"] = ort_runner(model, {"a": a})
    return c


def case_attention(Bt: int, M: int, D: int, N: int, qk: bool) -> Case:
    """qk: Q[B,M,D] @ K[B,N,D]^T -> [B,M,N];  else P[B,M,N] @ V[B,N,D] -> [B,M,D]."""
    if qk:
        name, a, b = f"attn QK^T {Bt}x{M}x{D}x{N}", rnd(Bt, M, D), rnd(Bt, N, D)
        Kd, Nout, ref = D, N, a.astype("float64") @ b.transpose(0, 2, 1).astype("float64")
    else:
        name, a, b = f"attn PV {Bt}x{M}x{N}x{D}", rnd(Bt, M, N), rnd(Bt, N, D)
        Kd, Nout, ref = N, D, a.astype("float64") @ b
    c = Case(name, 2.0 * Bt * M * Nout * Kd, ref=ref)
    A = te.placeholder(a.shape, name="A")
    Bp = te.placeholder(b.shape, name="B")
    plain = S.batch_matmul_te(A, Bp, transpose_b=qk, pack_b=False)
    c.runners["TE default"] = tvm_runner(plain.prim_func(), [a, b], ref.shape)
    mm = S.batch_matmul_te(A, Bp, transpose_b=qk)
    sch = S.schedule_batch_matmul(mm.prim_func(), target=TARGET)
    c.runners["kiln schedule"] = tvm_runner(sch, [a, b], ref.shape)
    out = np.empty(ref.shape, "float32")
    bb = b.transpose(0, 2, 1) if qk else b
    c.runners["numpy"] = (lambda: np.matmul(a, bb, out=out), np.matmul(a, bb))
    ta, tb, to = torch.from_numpy(a), torch.from_numpy(b), torch.empty(ref.shape)
    tbb = tb.transpose(1, 2) if qk else tb
    c.runners["torch"] = (lambda: torch.matmul(ta, tbb, out=to), torch.matmul(ta, tbb).numpy())
    if qk:  # Transpose+MatMul: ORT fuses it into one FusedMatMul(transB)
        nodes = [
            helper.make_node("Transpose", ["b"], ["bt"], perm=[0, 2, 1]),
            helper.make_node("MatMul", ["a", "bt"], ["c"]),
        ]
    else:
        nodes = [helper.make_node("MatMul", ["a", "b"], ["c"])]
    model = onnx_model(nodes, [("a", list(a.shape)), ("b", list(b.shape))], ("c", list(ref.shape)))
    c.runners["onnxruntime"] = ort_runner(model, {"a": a, "b": b})
    return c


def np_conv2d(x: np.ndarray, w: np.ndarray, pad: int) -> np.ndarray:
    """numpy conv2d (groups=1, stride 1): sliding windows + tensordot (BLAS)."""
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    win = sliding_window_view(xp, w.shape[2:], axis=(2, 3))  # n c oh ow kh kw
    return np.einsum("ncpqhw,ochw->nopq", win, w, optimize=True)


def case_conv2d(shape, oc: int, k: int, pad: int) -> Case:
    n, ic, h, wd = shape
    oh, ow = h + 2 * pad - k + 1, wd + 2 * pad - k + 1
    c = Case(f"conv2d {n}x{ic}x{h}x{wd} oc{oc} k{k}", 2.0 * n * oc * oh * ow * ic * k * k)
    x, w = rnd(*shape), rnd(oc, ic, k, k)
    tx, tw = torch.from_numpy(x), torch.from_numpy(w)
    c.ref = F.conv2d(tx.double(), tw.double(), padding=pad).numpy()
    X = te.placeholder(shape, name="data")
    W = te.placeholder(w.shape, name="weight")
    plain = S.conv2d_nchw_te(X, W, padding=pad, ow_tile=None)
    c.runners["TE default"] = tvm_runner(plain.prim_func(), [x, w], c.ref.shape)
    cv = S.conv2d_nchw_te(X, W, padding=pad, target=TARGET)
    sch = S.schedule_conv2d_nchw(cv.prim_func(), "conv2d", target=TARGET)
    c.runners["kiln schedule"] = tvm_runner(sch, [x, w], c.ref.shape)
    c.runners["numpy"] = (lambda: np_conv2d(x, w, pad), np_conv2d(x, w, pad))

    def tconv():
        with torch.inference_mode():
            return F.conv2d(tx, tw, padding=pad)

    c.runners["torch"] = (tconv, tconv().numpy())
    node = helper.make_node("Conv", ["x", "w"], ["y"], pads=[pad] * 4, kernel_shape=[k, k])
    model = onnx_model([node], [("x", list(shape))], ("y", list(c.ref.shape)), [("w", w)])
    c.runners["onnxruntime"] = ort_runner(model, {"x": x})
    return c


def layer_norm_te(x, g, b, eps=1e-5):
    *lead, n = (int(d) for d in x.shape)
    k1, k2 = te.reduce_axis((0, n), name="k1"), te.reduce_axis((0, n), name="k2")
    s1 = te.compute(lead, lambda *i: te.sum(x[(*i, k1)], axis=k1), name="s1")
    mean = te.compute(lead, lambda *i: s1[i] / n, name="mean")
    s2 = te.compute(
        lead,
        lambda *i: te.sum((x[(*i, k2)] - mean[i]) * (x[(*i, k2)] - mean[i]), axis=k2),
        name="s2",
    )
    return te.compute(
        x.shape,
        lambda *i: (x[i] - mean[i[:-1]]) * te.rsqrt(s2[i[:-1]] / n + eps) * g[i[-1]] + b[i[-1]],
        name="layer_norm",
    )


def case_layer_norm(rows: int, n: int) -> Case:
    c = Case(f"layer_norm {rows}x{n}", 8.0 * rows * n)
    x, g, b = rnd(rows, n), rnd(n), rnd(n)
    x64 = x.astype("float64")
    m = x64.mean(-1, keepdims=True)
    c.ref = (x64 - m) / np.sqrt(((x64 - m) ** 2).mean(-1, keepdims=True) + 1e-5) * g + b
    X, G, B = (
        te.placeholder((rows, n), name="x"),
        te.placeholder((n,), name="g"),
        te.placeholder((n,), name="b"),
    )
    f = te.create_prim_func([X, G, B, layer_norm_te(X, G, B)])
    c.runners["TE default"] = tvm_runner(f, [x, g, b], (rows, n))
    sch = S.schedule_reduction(f, target=TARGET)
    c.runners["kiln schedule"] = tvm_runner(sch, [x, g, b], (rows, n))

    def np_ln():
        mu = x.mean(-1, keepdims=True)
        d = x - mu
        return d / np.sqrt((d * d).mean(-1, keepdims=True) + 1e-5) * g + b

    c.runners["numpy"] = (np_ln, np_ln())
    tx, tg, tb = torch.from_numpy(x), torch.from_numpy(g), torch.from_numpy(b)

    def tln():
        with torch.inference_mode():
            return F.layer_norm(tx, (n,), tg, tb, 1e-5)

    c.runners["torch"] = (tln, tln().numpy())
    node = helper.make_node("LayerNormalization", ["x", "g", "b"], ["y"], axis=-1, epsilon=1e-5)
    model = onnx_model([node], [("x", [rows, n])], ("y", [rows, n]), [("g", g), ("b", b)])
    c.runners["onnxruntime"] = ort_runner(model, {"x": x})
    return c


def case_add(shape) -> Case:
    c = Case("add " + "x".join(map(str, shape)), float(np.prod(shape)))
    a, b = rnd(*shape), rnd(*shape)
    c.ref = a.astype("float64") + b
    A, B = te.placeholder(shape, name="a"), te.placeholder(shape, name="b")
    f = te.create_prim_func([A, B, te.compute(shape, lambda *i: A[i] + B[i], name="add")])
    c.runners["TE default"] = tvm_runner(f, [a, b], shape)
    c.runners["kiln schedule"] = tvm_runner(S.schedule_injective(f, target=TARGET), [a, b], shape)
    out = np.empty(shape, "float32")
    c.runners["numpy"] = (lambda: np.add(a, b, out=out), a + b)
    ta, tb, to = torch.from_numpy(a), torch.from_numpy(b), torch.empty(shape)
    c.runners["torch"] = (lambda: torch.add(ta, tb, out=to), (ta + tb).numpy())
    model = onnx_model(
        [helper.make_node("Add", ["a", "b"], ["c"])],
        [("a", list(shape)), ("b", list(shape))],
        ("c", list(shape)),
    )
    c.runners["onnxruntime"] = ort_runner(model, {"a": a, "b": b})
    return c


CASES: list[tuple[str, Callable[[], Case]]] = [
    ("matmul 512", lambda: case_matmul(512, 512, 512)),
    ("matmul gpt down", lambda: case_matmul(128, 256, 1024)),
    ("matmul gpt up", lambda: case_matmul(128, 1024, 256)),
    ("attn qk", lambda: case_attention(4, 128, 64, 128, qk=True)),
    ("attn pv", lambda: case_attention(4, 128, 64, 128, qk=False)),
    ("conv2d 64", lambda: case_conv2d((1, 64, 56, 56), 64, 3, 1)),
    ("conv2d 16", lambda: case_conv2d((1, 16, 32, 32), 16, 3, 1)),
    ("layer_norm", lambda: case_layer_norm(128, 256)),
    ("add", lambda: case_add((1, 128, 256))),
]
COLUMNS = ["TE default", "kiln schedule", "numpy", "torch", "onnxruntime"]


# --------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------


def _batch(fn: Callable, number: int) -> float:
    t0 = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - t0) / number


def measure(case: Case) -> dict[str, float]:
    """Median seconds per call of every runner.

    Columns are timed one after the other, not interleaved: TVM's, OpenMP's
    (torch), OpenBLAS's and ORT's thread pools all spin-wait after a job, and
    interleaving them made a 3 us TVM kernel take 3 ms (each pool's workers
    spinning on the cores the next one needed).
    """
    result = {}
    for col, (fn, _) in case.runners.items():
        time.sleep(0.2)  # let the previous library's spinning threads go idle
        t = min(_batch(fn, 1) for _ in range(3))  # warm-up + estimate
        number = max(1, int(2e-3 / max(t, 1e-9)))  # ~2 ms per timed batch
        repeats = max(3, min(ARGS.repeats, int(ARGS.budget / max(t * number, 1e-9))))
        result[col] = float(np.median([_batch(fn, number) for _ in range(repeats)]))
    return result


def check(case: Case) -> None:
    scale = max(1.0, float(np.abs(case.ref).max()))
    for col, (_, out) in case.runners.items():
        err = float(np.abs(np.asarray(out, "float64") - case.ref).max()) / scale
        if err > 1e-3:
            raise AssertionError(f"{case.name}: {col} differs from the reference ({err:.2e})")


def fmt_cell(flops: float, sec: float) -> str:
    gf = flops / sec / 1e9
    us = sec * 1e6
    t = f"{us:.0f} us" if us >= 100 else f"{us:.1f} us"
    return f"{gf:7.2f} ({t})"


def main() -> None:
    info = target_summary(TARGET)
    print(
        f"target {info}  TVM threads={os.environ['TVM_NUM_THREADS']}  torch threads={torch.get_num_threads()}"
    )
    print(
        f"tvm {tvm.__version__}  numpy {np.__version__}  torch {torch.__version__}  onnxruntime {ort.__version__}"
    )
    print(f"load average at start: {os.getloadavg()}")
    cases = []
    for key, make in CASES:
        if ARGS.only and ARGS.only not in key:
            continue
        case = make()
        check(case)
        cases.append(case)
    best: dict[str, dict[str, float]] = {}
    for r in range(ARGS.rounds):
        if r:
            time.sleep(3.0)
        for case in cases:
            for col, t in measure(case).items():
                slot = best.setdefault(case.name, {})
                slot[col] = min(t, slot.get(col, float("inf")))
        print(f"round {r + 1}/{ARGS.rounds} done, load average {os.getloadavg()}")
    rows = [(c.name, [fmt_cell(c.flops, best[c.name][col]) for col in COLUMNS]) for c in cases]
    print(f"load average at end: {os.getloadavg()}")
    head = ["kernel"] + COLUMNS
    print(
        f"\nGFLOP/s (median time per call over {ARGS.repeats} batches, best of {ARGS.rounds} rounds);"
        " higher GFLOP/s is better\n"
    )
    if ARGS.markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "|".join(["---"] * len(head)) + "|")
        for name, cells in rows:
            print("| " + " | ".join([name] + [c.strip() for c in cells]) + " |")
    else:
        widths = [max(len(head[0]), *(len(r[0]) for r in rows))] + [
            max(len(h), *(len(r[1][i]) for r in rows)) for i, h in enumerate(COLUMNS)
        ]
        print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
        for name, cells in rows:
            print("  ".join(v.ljust(w) for v, w in zip([name, *cells], widths)))


if __name__ == "__main__":
    main()
