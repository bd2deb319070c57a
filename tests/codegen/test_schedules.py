"""kiln.codegen.schedules / kiln.codegen.target: every CPU schedule keeps the
kernel's semantics (numpy reference, shapes that do not divide the tiles) and
really emits parallel and vectorized loops.

Each case builds one small kernel with TVM (~30-150 ms); `import tvm` takes a
few seconds, so the file is marked slow.
"""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
import tvm
from tvm import te, tirx

from kiln.codegen import schedules as S
from kiln.codegen.target import (
    configure_threads,
    host_target,
    parse_target,
    target_summary,
    vector_lanes,
)

pytestmark = pytest.mark.slow

configure_threads()  # run the parallel loops on all cores (TVM defaults to half)
TARGET = host_target()
DEV = tvm.cpu()
RNG = np.random.default_rng(1234)


def rnd(*shape: int) -> np.ndarray:
    return RNG.uniform(-1.0, 1.0, size=shape).astype("float32")


def run(sch, arrays, out_shape, out_dtype="float32"):
    """Build ``sch``, run it on ``arrays``; return the output and the LLVM IR."""
    mod = S.build(sch, TARGET)
    args = [tvm.runtime.tensor(np.array(a, order="C"), DEV) for a in arrays]
    out = tvm.runtime.tensor(np.zeros(out_shape, out_dtype), DEV)
    mod(*args, out)
    return out.numpy(), mod.inspect_source("ll")


def assert_scheduled(sch, llvm_ir: str | None = None, *, parallel: bool = True) -> None:
    kinds = S.loop_kinds(sch)
    assert kinds["vectorized"] >= 1, sch.mod.script()
    if parallel:
        assert kinds["parallel"] >= 1, sch.mod.script()
    if llvm_ir is not None:
        # the vectorized loops really became vector code, and parallel loops
        # became thread-pool launches
        assert "x float>" in llvm_ir
        if parallel:
            assert "TVMBackendParallelLaunch" in llvm_ir


def close(actual, expected, rtol=1e-4, atol=1e-5):
    np.testing.assert_allclose(actual, expected.astype(actual.dtype), rtol=rtol, atol=atol)


# --------------------------------------------------------------------------
# target
# --------------------------------------------------------------------------


def test_host_target_is_detected_llvm():
    t = host_target()
    s = target_summary(t)
    assert s["kind"] == "llvm"
    assert s["num-cores"] >= 1
    assert s["vector-width"] in (128, 256, 512)
    assert s["float32-lanes"] == s["vector-width"] // 32
    assert host_target(num_threads=3).attrs["num-cores"] == 3


@pytest.mark.parametrize(
    "spec, mcpu, cores, width",
    [
        ("llvm -mcpu=znver2", "znver2", None, 256),
        ("llvm -mcpu=skylake-avx512 -num-cores=4", "skylake-avx512", 4, 512),
        ('{"kind": "llvm", "mcpu": "haswell", "num-cores": 2}', "haswell", 2, 256),
        ({"kind": "llvm", "mcpu": "znver1"}, "znver1", None, 256),
    ],
)
def test_parse_target_forms(spec, mcpu, cores, width):
    t = parse_target(spec)
    s = target_summary(t)
    assert s["kind"] == "llvm" and s["mcpu"] == mcpu and s["vector-width"] == width
    if cores is not None:
        assert s["num-cores"] == cores
    assert vector_lanes(t, "float32") == width // 32


def test_parse_target_plain_and_host():
    assert str(parse_target("llvm").kind.name) == "llvm"
    assert target_summary(parse_target("host"))["mcpu"] == target_summary(host_target())["mcpu"]


@pytest.mark.parametrize(
    "spec",
    [
        "junk",
        "llvm -mcpu",
        "llvm mcpu=x",
        "llvm -mcpu=notacpu",
        "{bad json",
        "[1]",
        '{"mcpu": "x"}',
        "llvm -num-cores=x",
        "-mcpu=znver2",
        5,
    ],
)
def test_parse_target_rejects_junk(spec):
    with pytest.raises(ValueError):
        parse_target(spec)


def test_configure_threads_sets_env(monkeypatch):
    monkeypatch.delenv("TVM_NUM_THREADS", raising=False)
    assert configure_threads(3) == 3 and os.environ["TVM_NUM_THREADS"] == "3"
    assert configure_threads() == 3  # an existing setting is kept


# --------------------------------------------------------------------------
# matmul
# --------------------------------------------------------------------------


def mm_parallel(M: int, N: int, K: int, batch: int = 1) -> bool:
    """Whether schedule_matmul should go parallel: multiply-adds over the padded width vs the threshold."""
    nr = S.MATMUL_NR_VECTORS * S._lanes(TARGET, "float32")
    return batch * M * (-(-N // nr) * nr) * K >= S.PARALLEL_MIN_WORK_MATMUL


@pytest.mark.parametrize("prepacked", [False, True])
@pytest.mark.parametrize("M, N, K", [(17, 33, 45), (12, 32, 16), (5, 7, 3), (64, 40, 64)])
def test_packed_matmul(M, N, K, prepacked):
    A = te.placeholder((M, K), name="A")
    mm = S.packed_matmul_te(A, (K, N), prepacked=prepacked)
    sch = S.schedule_matmul(mm.prim_func(), "matmul", target=TARGET)
    a, b = rnd(M, K), rnd(K, N)
    out, ir = run(sch, [a, S.pack_weight(b) if prepacked else b], (M, N))
    close(out, a.astype("float64") @ b)
    assert_scheduled(sch, ir, parallel=mm_parallel(M, N, K) and (M > 6 or N > 16))


def test_packed_matmul_transposed_weight_bias_batch_dims_pad_m():
    A = te.placeholder((2, 17, 45), name="A")
    bias = te.placeholder((33,), name="bias")
    mm = S.packed_matmul_te(A, (33, 45), transpose_b=True, bias=bias)
    sch = S.schedule_matmul(mm.prim_func(), "matmul", pad_m=True, target=TARGET)
    a, w, c = rnd(2, 17, 45), rnd(33, 45), rnd(33)
    out, ir = run(sch, [a, w, c], (2, 17, 33))
    close(out, a.astype("float64") @ w.T + c)
    assert_scheduled(sch, ir, parallel=mm_parallel(17, 33, 45, batch=2))


def test_plain_te_matmul_with_relu_epilogue():
    """Not built by packed_matmul_te: N is padded by pad_einsum, relu folded."""
    M, N, K = 17, 33, 45
    A = te.placeholder((M, K), name="A")
    B = te.placeholder((K, N), name="B")
    k = te.reduce_axis((0, K), name="k")
    C = te.compute((M, N), lambda i, j: te.sum(A[i, k] * B[k, j], axis=k), name="matmul")
    D = te.compute((M, N), lambda i, j: tirx.max(C[i, j], tirx.const(0.0, "float32")), name="relu")
    sch = S.schedule_matmul(te.create_prim_func([A, B, D]), "matmul", target=TARGET)
    a, b = rnd(M, K), rnd(K, N)
    out, ir = run(sch, [a, b], (M, N))
    close(out, np.maximum(a.astype("float64") @ b, 0))
    assert_scheduled(sch, ir, parallel=mm_parallel(M, N, K))


@pytest.mark.parametrize(
    "transpose_b, pack_b", [(False, False), (False, True), (True, None), (True, False)]
)
def test_batch_matmul(transpose_b, pack_b):
    Bt, M, K, N = 3, 17, 45, 33
    A = te.placeholder((Bt, M, K), name="A")
    B = te.placeholder((Bt, N, K) if transpose_b else (Bt, K, N), name="B")
    mm = S.batch_matmul_te(A, B, transpose_b=transpose_b, pack_b=pack_b)
    sch = S.schedule_batch_matmul(mm.prim_func(), target=TARGET)
    a, b = rnd(Bt, M, K), rnd(*(int(d) for d in B.shape))
    out, ir = run(sch, [a, b], (Bt, M, N))
    close(out, a.astype("float64") @ (b.transpose(0, 2, 1) if transpose_b else b))
    assert_scheduled(sch, ir, parallel=mm_parallel(M, N, K, batch=Bt))


def test_matmul_rejects_non_matmul_block():
    A = te.placeholder((4, 4), name="A")
    B = te.compute((4, 4), lambda i, j: A[i, j] * 2, name="matmul")
    with pytest.raises(ValueError):
        S.schedule_matmul(te.create_prim_func([A, B]), "matmul")


# --------------------------------------------------------------------------
# conv2d
# --------------------------------------------------------------------------


def conv_ref(x, w, stride, pad, dilation, groups):
    """float64 NCHW conv2d; pad = (top, left, bottom, right)."""
    x = x.astype("float64")
    w = w.astype("float64")
    n, c, h, wd = x.shape
    oc, icg, kh, kw = w.shape
    pt, pl, pb, pr = pad
    xp = np.zeros((n, c, h + pt + pb, wd + pl + pr))
    xp[:, :, pt : pt + h, pl : pl + wd] = x
    oh = (h + pt + pb - dilation * (kh - 1) - 1) // stride + 1
    ow = (wd + pl + pr - dilation * (kw - 1) - 1) // stride + 1
    out = np.zeros((n, oc, oh, ow))
    ocg = oc // groups
    for o in range(oc):
        g = o // ocg
        for i in range(icg):
            for a in range(kh):
                for b in range(kw):
                    patch = xp[
                        :,
                        g * icg + i,
                        a * dilation : a * dilation + stride * (oh - 1) + 1 : stride,
                        b * dilation : b * dilation + stride * (ow - 1) + 1 : stride,
                    ]
                    out[:, o] += patch * w[o, i, a, b]
    return out


CONV_CASES = [
    # shape, oc, k, stride, padding, dilation, groups
    ((1, 16, 17, 19), 8, 3, 1, 1, 1, 1),
    ((2, 5, 13, 21), 7, 3, 2, 1, 1, 1),
    ((1, 8, 11, 17), 12, 3, 1, (1, 0, 2, 1), 2, 1),
    ((1, 6, 9, 19), 6, 3, 1, (1, 0), 1, 3),
    ((1, 12, 15, 33), 12, 3, 1, 1, 1, 12),  # depthwise
    ((1, 24, 9, 9), 40, 1, 1, 0, 1, 1),  # pointwise
]


@pytest.mark.parametrize("shape, oc, k, stride, padding, dilation, groups", CONV_CASES)
def test_conv2d_nchw(shape, oc, k, stride, padding, dilation, groups):
    x = rnd(*shape)
    w = rnd(oc, shape[1] // groups, k, k)
    X = te.placeholder(shape, name="data")
    W = te.placeholder(w.shape, name="weight")
    cv = S.conv2d_nchw_te(X, W, stride=stride, padding=padding, dilation=dilation, groups=groups)
    sch = S.schedule_conv2d_nchw(cv.prim_func(), "conv2d", target=TARGET)
    pad = S._conv_padding(padding)
    ref = conv_ref(x, w, stride, pad, dilation, groups)
    out, ir = run(sch, [x, w], ref.shape)
    close(out, ref)
    plain = S.as_schedule(cv.prim_func())
    work = S._work(plain, plain.get_sblock("conv2d"))
    assert_scheduled(sch, ir, parallel=work >= S.PARALLEL_MIN_WORK)


def test_conv2d_bias_unpadded_width_and_im2col():
    shape, oc = (1, 6, 10, 25), 10  # 10x250x54 multiply-adds: past the matmul parallel threshold
    x, w, c = rnd(*shape), rnd(oc, 6, 3, 3), rnd(oc)
    ref = conv_ref(x, w, 1, (1, 1, 1, 1), 1, 1)
    X, W = te.placeholder(shape, name="data"), te.placeholder(w.shape, name="weight")
    Bias = te.placeholder((oc,), name="bias")
    # ragged ow tile guarded (no width padding in the compute) + bias epilogue
    cv = S.conv2d_nchw_te(X, W, padding=1, bias=Bias, ow_tile=None)
    sch = S.schedule_conv2d_nchw(cv.prim_func(), "conv2d", target=TARGET)
    out, ir = run(sch, [x, w, c], ref.shape)
    close(out, ref + c[None, :, None, None])
    assert_scheduled(sch, ir)
    # im2col + matmul schedule (reshaping epilogue stays outside the tile)
    cv = S.conv2d_nchw_im2col_te(X, W, padding=1)
    sch = S.schedule_matmul(cv.prim_func(), "conv2d", target=TARGET)
    out, ir = run(sch, [x, w], ref.shape)
    close(out, ref)
    assert_scheduled(sch, ir)


# --------------------------------------------------------------------------
# injective
# --------------------------------------------------------------------------


def _add_relu(shape, bshape):
    A = te.placeholder(shape, name="a")
    B = te.placeholder(bshape, name="b")
    lead = len(shape) - len(bshape)

    def bidx(i):  # numpy broadcasting: size-1 dims of b read index 0
        return tuple(0 if d == 1 else v for d, v in zip(bshape, i[lead:]))

    C = te.compute(shape, lambda *i: A[i] + B[bidx(i)], name="add")
    D = te.compute(shape, lambda *i: tirx.max(C[i], tirx.const(0.0, "float32")), name="relu")
    return [A, B, D]


@pytest.mark.parametrize(
    "shape, bshape",
    [
        ((17, 33, 45), (45,)),
        ((17, 33, 45), (17, 33, 45)),
        ((1, 128, 256), (1, 128, 256)),
        ((3,), (3,)),
        ((1, 1, 20001), (1,)),
        ((1, 416, 14, 14), (416, 1, 1)),  # rows narrower than a vector, a ragged parallel remainder
    ],
)
def test_injective(shape, bshape):
    tensors = _add_relu(shape, bshape)
    sch = S.schedule_injective(te.create_prim_func(tensors), target=TARGET)
    a, b = rnd(*shape), rnd(*bshape)
    out, ir = run(sch, [a, b], shape)
    close(out, np.maximum(a + b, 0), rtol=1e-6, atol=0)
    big = int(np.prod(shape)) >= S.PARALLEL_MIN_WORK
    assert_scheduled(sch, ir, parallel=big)
    assert S.loop_kinds(sch)["vectorized"] >= 1
    # no vector wider than a few registers (LLVM spends seconds legalising 640-lane vectors)
    widths = [int(w) for w in re.findall(r"T\.vectorized\((\d+)\)", sch.mod.script())]
    assert max(widths) <= 4 * S._lanes(TARGET, "float32"), widths
    # the add was inlined into the relu: one stage
    assert "add" not in {str(sch.get(b).name_hint) for b in S._all_blocks(sch)}


def test_injective_transpose_and_scalar():
    A = te.placeholder((17, 33, 45), name="a")
    T = te.compute((17, 45, 33), lambda i, j, k: A[i, k, j] * 2.0, name="t")
    sch = S.schedule_injective(te.create_prim_func([A, T]), target=TARGET)
    a = rnd(17, 33, 45)
    out, ir = run(sch, [a], (17, 45, 33))
    close(out, a.transpose(0, 2, 1) * 2, rtol=1e-6, atol=0)
    assert_scheduled(sch, ir)
    S0 = te.placeholder((), name="s")
    sch = S.schedule_injective(
        te.create_prim_func([S0, te.compute((), lambda: S0[()] + 1.0, name="p")])
    )
    out, _ = run(sch, [np.array(2.5, "float32")], ())
    assert float(out) == 3.5


# --------------------------------------------------------------------------
# reductions
# --------------------------------------------------------------------------


def softmax_te(x):
    *lead, n = (int(d) for d in x.shape)
    k1, k2 = te.reduce_axis((0, n), name="k1"), te.reduce_axis((0, n), name="k2")
    mx = te.compute(lead, lambda *i: te.max(x[(*i, k1)], axis=k1), name="max")
    e = te.compute(x.shape, lambda *i: te.exp(x[i] - mx[i[:-1]]), name="exp")
    s = te.compute(lead, lambda *i: te.sum(e[(*i, k2)], axis=k2), name="sum")
    return te.compute(x.shape, lambda *i: e[i] / s[i[:-1]], name="softmax")


def layer_norm_te(x, g, b, eps=1e-5):
    *lead, n = (int(d) for d in x.shape)
    k1, k2 = te.reduce_axis((0, n), name="k1"), te.reduce_axis((0, n), name="k2")
    s1 = te.compute(lead, lambda *i: te.sum(x[(*i, k1)], axis=k1), name="s1")
    mean = te.compute(lead, lambda *i: s1[i] / n, name="mean")
    d2 = lambda i, k: (x[(*i, k)] - mean[i]) * (x[(*i, k)] - mean[i])  # noqa: E731
    s2 = te.compute(lead, lambda *i: te.sum(d2(i, k2), axis=k2), name="s2")
    return te.compute(
        x.shape,
        lambda *i: (x[i] - mean[i[:-1]]) * te.rsqrt(s2[i[:-1]] / n + eps) * g[i[-1]] + b[i[-1]],
        name="layer_norm",
    )


def mean_te(x, keepdims=False):
    *lead, n = (int(d) for d in x.shape)
    k = te.reduce_axis((0, n), name="k")
    shape = [*lead, 1] if keepdims else lead
    s = te.compute(shape, lambda *i: te.sum(x[(*i[: len(lead)], k)], axis=k), name="rsum")
    return te.compute(shape, lambda *i: s[i] / n, name="mean")


def np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_layer_norm(x, g, b):
    m = x.mean(-1, keepdims=True)
    v = ((x - m) ** 2).mean(-1, keepdims=True)
    return (x - m) / np.sqrt(v + 1e-5) * g + b


# (17, 33, 45): ragged rows -> "staged" schedule; (64, 128): rfactor schedule
@pytest.mark.parametrize("shape", [(17, 33, 45), (64, 128), (3, 7)])
@pytest.mark.parametrize("kind", ["softmax", "layer_norm", "mean", "mean_keepdims", "sum"])
def test_reduction(kind, shape):
    X = te.placeholder(shape, name="x")
    x = rnd(*shape)
    x64 = x.astype("float64")
    arrays = [x]
    if kind == "softmax":
        tensors, ref = [X, softmax_te(X)], np_softmax(x64)
    elif kind == "layer_norm":
        G, B = te.placeholder(shape[-1:], name="g"), te.placeholder(shape[-1:], name="b")
        g, b = rnd(shape[-1]), rnd(shape[-1])
        arrays += [g, b]
        tensors, ref = [X, G, B, layer_norm_te(X, G, B)], np_layer_norm(x64, g, b)
    elif kind == "mean":
        tensors, ref = [X, mean_te(X)], x64.mean(-1)
    elif kind == "mean_keepdims":
        tensors, ref = [X, mean_te(X, keepdims=True)], x64.mean(-1, keepdims=True)
    else:  # the output block is the reduction itself
        k = te.reduce_axis((0, shape[-1]), name="k")
        Y = te.compute(shape[:-1], lambda *i: te.sum(X[(*i, k)], axis=k), name="sum")
        tensors, ref = [X, Y], x64.sum(-1)
    sch = S.schedule_reduction(te.create_prim_func(tensors), target=TARGET)
    out, ir = run(sch, arrays, ref.shape)
    close(out, ref, rtol=1e-4, atol=1e-5)
    elements = int(np.prod(shape))
    if elements < 256:
        return
    parallel = elements >= S.PARALLEL_MIN_WORK_REDUCTION
    if kind == "sum" and shape[-1] % vector_lanes(TARGET) != 0:
        # a lone ragged reduction: nothing to vectorize without a predicate
        # (measured slower); rows are interleaved instead (unrolled chains)
        kinds = S.loop_kinds(sch)
        assert kinds["unroll"] >= 1 and (kinds["parallel"] >= 1 or not parallel)
    else:
        assert_scheduled(sch, ir, parallel=parallel)


def test_softmax_keeps_exp_materialized():
    """exp feeds two consumers: inlining it would compute it twice."""
    X = te.placeholder((17, 33, 45), name="x")
    sch = S.schedule_reduction(te.create_prim_func([X, softmax_te(X)]), target=TARGET)
    assert 'T.sblock("exp' in sch.mod.script()
    # ... and is not a scalar libm call per element and lane twice over
    assert sch.mod.script().count("T.exp(") == 2  # the exp block, split main/tail


# --------------------------------------------------------------------------
# dispatch
# --------------------------------------------------------------------------


def test_schedule_for_dispatch():
    A = te.placeholder((20, 30), name="a")
    f = te.create_prim_func([A, te.compute((20, 30), lambda i, j: A[i, j] * 3.0, name="m")])
    sch = S.schedule_for("injective", f, target=TARGET)
    out, _ = run(sch, [np.ones((20, 30), "float32")], (20, 30))
    assert (out == 3.0).all()
    with pytest.raises(ValueError):
        S.schedule_for("winograd", f)
    assert set(S.ANCHOR_KINDS) == {"matmul", "batch_matmul", "conv2d", "conv2d_ocvec", "depthwise_conv2d_cl", "injective",
                                   "reduction"}


def test_register_tiles_follow_the_vector_registers():
    """32 registers (AVX-512) take 8-row matmul tiles and 8-column int16-pair conv tiles; AVX2's 16 keep 6 (or
    a divisor of a small M / a row that pads least)."""
    from kiln.codegen.lowering.quant import qconv_ow_tile
    from kiln.codegen.target import parse_target

    wide, avx2 = parse_target("llvm -mcpu=skylake-avx512"), parse_target("llvm -mcpu=haswell")
    assert [S.matmul_rows(m, wide) for m in (16, 512, 12, 49, 1)] == [8, 8, 6, 7, 8]
    assert [S.matmul_rows(m, avx2) for m in (16, 12, 128, 7, 1)] == [4, 6, 6, 6, 6]
    assert [qconv_ow_tile(ow, wide) for ow in (32, 16, 7, 12)] == [8, 8, 7, 6]
    assert [qconv_ow_tile(ow, avx2) for ow in (32, 16, 7, 12)] == [4, 4, 4, 6]


def test_matmul_row_tiles_divide_small_m_and_stay_correct():
    """M = 16 and 12 with the divisor tile, M = 13 with a guarded ragged tile: all equal numpy."""
    def matmul(m: int):
        A, B = te.placeholder((m, 40), name="a"), te.placeholder((40, 48), name="b")
        k = te.reduce_axis((0, 40), name="k")
        C = te.compute((m, 48), lambda i, j: te.sum(A[i, k] * B[k, j], axis=k), name="matmul")
        return te.create_prim_func([A, B, C])

    for m in (16, 12, 13):
        a, b = rnd(m, 40), rnd(40, 48)
        sch = S.schedule_matmul(matmul(m), "matmul", target=TARGET)
        out, _ = run(sch, [a, b], (m, 48))
        close(out, a @ b)
