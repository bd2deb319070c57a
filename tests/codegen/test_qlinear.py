"""Integer kernels (qmatmul, qconv, dq_matmul): compiled vs the interpreter, exact where the result is an integer.

Each case is one node in IR text with seeded constants; the kernel is lowered,
scheduled, built and run, and compared with ``kiln.ir.interpret`` (f32 results
within codegen/tolerance.py; with unit scales and |sum| < 2^24 the f32 result
is the int32 accumulator itself, and must match exactly).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from tvm.target import Target

import kiln
from kiln import ir
from kiln.codegen.intrin import has_avx2
from kiln.codegen.kernel import build_kernel, lower_block, lower_node, run_kernel
from kiln.codegen.lowering.quant import QCONV_FLOAT_MAX_CHANNELS, pack_int4
from kiln.codegen.target import host_target
from kiln.codegen.tolerance import MODEL_F32, assert_close
from kiln.ir.interpret import interpret
from kiln.passes.manager import run_pipeline

TARGET = host_target()
NP = {"i8": np.int8, "u8": np.uint8, "i4": ml_dtypes.int4, "u4": ml_dtypes.uint4, "i32": np.int32}
LIMITS = {"i8": (-128, 127), "u8": (0, 255), "i4": (-8, 7), "u4": (0, 15), "i32": (-5000, 5000)}


def codes(rng: np.random.Generator, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    lo, hi = LIMITS[dtype]
    return rng.integers(lo, hi + 1, shape).astype(NP[dtype])


def run_one(text: str, consts: dict[str, np.ndarray], feeds: dict[str, np.ndarray], exact: bool = False) -> None:
    g = ir.parse(text, constants=consts)
    ir.verify(g)
    want = interpret(g, feeds)
    k = lower_node(g.nodes[-1], TARGET, name="k")
    assert not k.notes, k.notes
    assert k.scheduled
    got = run_kernel(k, feeds, TARGET)[0]
    out = g.outputs[0].name
    if exact:
        np.testing.assert_array_equal(got, want[out])
    else:
        assert_close(got, want[out], what=text.splitlines()[-2])


def _qmatmul_text(lead: tuple[int, ...], m: int, k: int, n: int, adt: str, per_col: bool, bias: bool) -> str:
    """One qmatmul with a constant i8 weight [k, n] (scale and zero point per column or per tensor)."""
    p = f"[{n}]" if per_col else "[]"
    return f"""graph @g(%xq: {adt}[{','.join(map(str, (*lead, m, k)))}]) -> (%y) {{
  %sx = const f32[] [0.05]
  %zx = const {adt}[] [{3 if adt == 'u8' else -3}]
  %W = const i8[{k},{n}] dense<elided>
  %sw = const f32{p} dense<elided>
  %zw = const i8{p} dense<elided>
  %b = const i32[{n}] dense<elided>
  %y = qmatmul(%xq, %sx, %zx, %W, %sw, %zw{', %b' if bias else ''}) : f32[{','.join(map(str, (*lead, m, n)))}]
}}"""


@pytest.mark.parametrize("lead,m,k,n,adt,per_col,zp_w,bias", [
    ((), 7, 33, 20, "i8", True, True, True),
    ((), 1, 64, 48, "i8", True, False, True),
    ((2, 3), 5, 16, 17, "u8", False, False, False),
    ((), 40, 130, 70, "u8", True, True, True),
    ((2,), 7, 24, 16, "i8", True, True, True),  # batch dims flattened into rows padded to the tile
    ((1,), 64, 32, 24, "i8", True, False, True),
])
def test_qmatmul_constant_weight(lead, m, k, n, adt, per_col, zp_w, bias):
    rng = np.random.default_rng(k * n)
    shape = (n,) if per_col else ()
    consts = {"W": codes(rng, "i8", (k, n)), "sw": rng.uniform(0.005, 0.02, shape).astype(np.float32),
              "zw": (rng.integers(-4, 5, shape) if zp_w else np.zeros(shape)).astype(np.int8),
              "b": codes(rng, "i32", (n,))}
    run_one(_qmatmul_text(lead, m, k, n, adt, per_col, bias), consts, {"xq": codes(rng, adt, (*lead, m, k))})


def test_qmatmul_int32_accumulator_is_exact():
    """Unit scales: the f32 output is acc + bias itself (|acc| < 2^24 here), so it must match exactly."""
    k, n = 200, 24
    rng = np.random.default_rng(1)
    text = f"""graph @g(%xq: u8[9,{k}]) -> (%y) {{
  %sx = const f32[] [1.0]
  %zx = const u8[] [131]
  %W = const i8[{k},{n}] dense<elided>
  %sw = const f32[{n}] dense<elided>
  %zw = const i8[{n}] dense<elided>
  %b = const i32[{n}] dense<elided>
  %y = qmatmul(%xq, %sx, %zx, %W, %sw, %zw, %b) : f32[9,{n}]
}}"""
    consts = {"W": codes(rng, "i8", (k, n)), "sw": np.ones(n, np.float32), "zw": rng.integers(-9, 9, n).astype(np.int8),
              "b": codes(rng, "i32", (n,))}
    x = codes(rng, "u8", (9, k))
    run_one(text, consts, {"xq": x}, exact=True)
    acc = (x.astype(np.int64) - 131) @ (consts["W"].astype(np.int64) - consts["zw"]) + consts["b"]
    assert np.abs(acc).max() < 2 ** 24
    np.testing.assert_array_equal(interpret(ir.parse(text, constants=consts), {"xq": x})["y"], acc.astype(np.float32))


def test_qmatmul_activation_by_activation():
    """Q.K^T-like: both operands are codes computed at run time (per tensor), batched."""
    rng = np.random.default_rng(2)
    text = """graph @g(%aq: i8[2,6,16], %bq: i8[2,16,12]) -> (%y) {
  %sa = const f32[] [0.03]
  %za = const i8[] [5]
  %sb = const f32[] [0.07]
  %zb = const i8[] [-7]
  %y = qmatmul(%aq, %sa, %za, %bq, %sb, %zb) : f32[2,6,12]
}"""
    run_one(text, {}, {"aq": codes(rng, "i8", (2, 6, 16)), "bq": codes(rng, "i8", (2, 16, 12))})


CONVS = {
    "3x3-pad-bias": ((2, 3, 9, 9), (8, 3, 3, 3), {"pads": [1, 1, 1, 1]}, True),
    "stride2-grouped": ((1, 4, 10, 11), (6, 2, 3, 3), {"strides": [2, 2], "group": 2}, True),
    "depthwise": ((1, 8, 7, 7), (8, 1, 3, 3), {"group": 8, "pads": [1, 1, 1, 1]}, False),
    "1x1": ((1, 16, 5, 5), (24, 16, 1, 1), {}, True),
    "1d-dilated": ((2, 3, 12), (5, 3, 3), {"dilations": [2], "pads": [2, 1]}, True),
}


@pytest.mark.parametrize("name", sorted(CONVS))
def test_qconv(name):
    xs, ws, attrs, bias = CONVS[name]
    rng = np.random.default_rng(len(name))
    m = ws[0]
    y = ir.infer_types("conv", [ir.TensorType("f32", xs), ir.TensorType("f32", ws)], attrs)[0]
    attr_text = ", ".join(f"{k}={v}" for k, v in attrs.items())
    text = f"""graph @g(%xq: u8[{','.join(map(str, xs))}]) -> (%y) {{
  %sx = const f32[] [0.04]
  %zx = const u8[] [120]
  %W = const i8[{','.join(map(str, ws))}] dense<elided>
  %sw = const f32[{m}] dense<elided>
  %zw = const i8[{m}] dense<elided>
  {'%b = const i32[' + str(m) + '] dense<elided>' if bias else ''}
  %y = qconv(%xq, %sx, %zx, %W, %sw, %zw{', %b' if bias else ''}) {{{attr_text}}} : f32[{','.join(map(str, y.shape))}]
}}"""
    consts = {"W": codes(rng, "i8", ws), "sw": rng.uniform(0.005, 0.02, m).astype(np.float32),
              "zw": np.zeros(m, np.int8), "b": codes(rng, "i32", (m,))}
    run_one(text, consts, {"xq": codes(rng, "u8", xs)})


@pytest.mark.parametrize("wdt,k,n,axis,block,zp", [
    ("i4", 32, 40, 0, 8, False),
    ("u4", 48, 17, 0, 16, True),
    ("i4", 31, 20, 1, 0, False),
    ("u4", 16, 16, 1, 4, True),
    ("i8", 40, 24, 1, 0, False),
    ("u8", 24, 33, 0, 8, True),
])
def test_dq_matmul(wdt, k, n, axis, block, zp):
    rng = np.random.default_rng(k + n)
    if block:
        sshape = (-(-k // block), n) if axis == 0 else (k, -(-n // block))
    else:
        sshape = (n,)
    s = ",".join(map(str, sshape))
    text = f"""graph @g(%a: f32[3,{k}]) -> (%y) {{
  %W = const {wdt}[{k},{n}] dense<elided>
  %s = const f32[{s}] dense<elided>
  {f'%z = const {wdt}[{s}] dense<elided>' if zp else ''}
  %y = dq_matmul(%a, %W, %s{', %z' if zp else ''}) {{axis={axis}, block_size={block}}} : f32[3,{n}]
}}"""
    consts = {"W": codes(rng, wdt, (k, n)), "s": rng.uniform(0.01, 0.1, sshape).astype(np.float32),
              "z": codes(rng, wdt, sshape)}
    run_one(text, consts, {"a": rng.standard_normal((3, k)).astype(np.float32)})


def test_pack_int4_layout():
    """Row 2r of column j in the low nibble, 2r+1 in the high one, columns in tiles of bn."""
    c = np.arange(-8, 8).repeat(3)[:45].reshape(5, 9).astype(np.int8)
    p = pack_int4(c, 4)
    assert p.shape == (3, 3, 4) and p.dtype == np.uint8
    for k in range(5):
        for j in range(9):
            nib = (p[j // 4, k // 2, j % 4] >> (4 * (k % 2))) & 15
            assert (int(nib) ^ 8) - 8 == c[k, j]


def test_fused_block_qmatmul_relu_requantize():
    """qmatmul -> relu -> quantize (the next layer's input) as one kernel: the int8 output is exact."""
    rng = np.random.default_rng(4)
    text = """graph @g(%xq: i8[12,32]) -> (%yq) {
  %sx = const f32[] [0.05]
  %zx = const i8[] [2]
  %W = const i8[32,24] dense<elided>
  %sw = const f32[24] dense<elided>
  %zw = const i8[24] dense<elided>
  %b = const i32[24] dense<elided>
  %sy = const f32[] [0.37]
  %zy = const i8[] [-128]
  %m = qmatmul(%xq, %sx, %zx, %W, %sw, %zw, %b) : f32[12,24]
  %r = relu(%m) : f32[12,24]
  %yq = quantize(%r, %sy, %zy) {dtype="i8"} : i8[12,24]
}"""
    consts = {"W": codes(rng, "i8", (32, 24)), "sw": rng.uniform(0.005, 0.02, 24).astype(np.float32),
              "zw": np.zeros(24, np.int8), "b": codes(rng, "i32", (24,))}
    g = run_pipeline(ir.parse(text, constants=consts), "fuse-blocks")
    assert {n.block for n in g.nodes} == {"b0"}
    k = lower_block(g.nodes, TARGET, name="k")
    assert not k.notes and k.kind == "matmul"
    x = codes(rng, "i8", (12, 32))
    got = run_kernel(k, {"xq": x}, TARGET)[0]
    want = interpret(g, {"xq": x})["yq"]
    # requantize rounds: a kernel that differs from the reference in the last f32 bit may flip one code
    assert np.abs(got.astype(np.int32) - want.astype(np.int32)).max() <= 1
    assert np.mean(got == want) > 0.99


@pytest.mark.slow
def test_compile_quantized_mlp_end_to_end():
    """A QDQ two-layer MLP through kiln.compile's default pipeline: fuse-qlinear makes qmatmuls, results match."""
    rng = np.random.default_rng(5)
    text = """graph @g(%x: f32[8,32]) -> (%y) {
  %sx = const f32[] [0.03]
  %zx = const i8[] [-1]
  %W1 = const i8[32,64] dense<elided>
  %s1 = const f32[64] dense<elided>
  %z1 = const i8[64] dense<elided>
  %b1 = const i32[64] dense<elided>
  %sb1 = const f32[64] dense<elided>
  %sh = const f32[] [0.02]
  %zh = const i8[] [-128]
  %W2 = const i8[64,10] dense<elided>
  %s2 = const f32[10] dense<elided>
  %z2 = const i8[10] dense<elided>
  %x.q = quantize(%x, %sx, %zx) {dtype="i8"} : i8[8,32]
  %x.dq = dequantize(%x.q, %sx, %zx) : f32[8,32]
  %W1.dq = dequantize(%W1, %s1, %z1) {axis=1} : f32[32,64]
  %b1.dq = dequantize(%b1, %sb1) {axis=0} : f32[64]
  %m1 = matmul(%x.dq, %W1.dq) : f32[8,64]
  %h = add(%m1, %b1.dq) : f32[8,64]
  %r = relu(%h) : f32[8,64]
  %r.q = quantize(%r, %sh, %zh) {dtype="i8"} : i8[8,64]
  %r.dq = dequantize(%r.q, %sh, %zh) : f32[8,64]
  %W2.dq = dequantize(%W2, %s2, %z2) {axis=1} : f32[64,10]
  %y = matmul(%r.dq, %W2.dq) : f32[8,10]
}"""
    s1 = rng.uniform(0.002, 0.01, 64).astype(np.float32)
    consts = {"W1": codes(rng, "i8", (32, 64)), "s1": s1, "z1": np.zeros(64, np.int8), "b1": codes(rng, "i32", (64,)),
              "sb1": (np.float32(0.03) * s1).astype(np.float32), "W2": codes(rng, "i8", (64, 10)),
              "s2": rng.uniform(0.002, 0.01, 10).astype(np.float32), "z2": np.zeros(10, np.int8)}
    g = ir.parse(text, constants=consts)
    feeds = {"x": rng.standard_normal((8, 32)).astype(np.float32)}
    art = kiln.compile(g.clone(), feeds)
    assert "fuse-qlinear" in art.manifest["pipeline"]
    assert "qmatmul" in art.ir_text and "matmul(" not in art.ir_text.replace("qmatmul(", "")
    got = art.load().run(feeds)["y"]
    assert_close(got, interpret(g, feeds)["y"], MODEL_F32)


def _mlp_node(m: int = 13, k: int = 37, n: int = 21):
    rng = np.random.default_rng(m * k)
    text = _qmatmul_text((), m, k, n, "i8", True, True)
    consts = {"W": codes(rng, "i8", (k, n)), "sw": rng.uniform(0.005, 0.02, n).astype(np.float32),
              "zw": rng.integers(-4, 5, n).astype(np.int8), "b": codes(rng, "i32", (n,))}
    g = ir.parse(text, constants=consts)
    return g, {"xq": codes(rng, "i8", (m, k))}


@pytest.mark.skipif(not has_avx2(TARGET), reason="the vpmaddwd kernel needs x86 AVX2")
def test_qmatmul_uses_vpmaddwd_on_avx2():
    g, feeds = _mlp_node()
    k = lower_node(g.nodes[0], TARGET, name="k")
    mod = build_kernel(k, TARGET)
    asm = mod.inspect_source("asm")
    # with AVX512-VNNI (e.g. -mcpu=rocketlake) LLVM fuses vpmaddwd + vpaddd into vpdpwssd
    assert ("vpmaddwd" in asm or "vpdpwssd" in asm) and "vpmulld" not in asm
    assert_close(run_kernel(k, feeds, TARGET, module=mod)[0], interpret(g, feeds)["y"])


def test_qmatmul_without_avx2_falls_back_to_int32_products():
    """A generic x86-64 target (no AVX2 feature): int16-widened products in int32 lanes, same results."""
    generic = Target({"kind": "llvm"})
    assert not has_avx2(generic)
    g, feeds = _mlp_node(5, 20, 9)
    k = lower_node(g.nodes[0], generic, name="k")
    assert not k.notes
    assert_close(run_kernel(k, feeds, generic)[0], interpret(g, feeds)["y"])


# ------------------------------------------------------------------ qconv on int16 channel pairs (vpmaddwd)

PAIR_CONVS = {
    # name: (x shape, w shape, attrs, x dtype, per-channel w zero point)
    "3x3-pad1": ((1, 4, 8, 8), (16, 4, 3, 3), {"pads": [1, 1, 1, 1]}, "u8", True),
    "odd-c-odd-r": ((2, 3, 7, 9), (8, 3, 3, 3), {"pads": [1, 0, 1, 2]}, "i8", False),  # C=3: R=27, a zero channel
    "stride2-pad": ((1, 6, 11, 10), (20, 6, 3, 3), {"strides": [2, 2], "pads": [1, 1, 1, 1]}, "u8", True),
    "1x1-stride2": ((1, 16, 9, 9), (24, 16, 1, 1), {"strides": [2, 2]}, "i8", True),
    "5x3-dilated": ((1, 5, 12, 13), (9, 5, 5, 3), {"dilations": [2, 1], "pads": [2, 1, 2, 1]}, "u8", False),
    "c1-wide": ((1, 1, 6, 40), (7, 1, 2, 2), {}, "u8", True),
    "1d": ((2, 7, 15), (10, 7, 3), {"pads": [1, 1]}, "i8", True),
}


def _qconv_case(xs, ws, attrs, xdt, per_ch, unit: bool = False, seed: int = 0, zx: int | None = None):
    rng = np.random.default_rng(seed)
    m = ws[0]
    y = ir.infer_types("conv", [ir.TensorType("f32", xs), ir.TensorType("f32", ws)], attrs)[0]
    attr_text = ", ".join(f"{k}={v}" for k, v in attrs.items())
    p = f"[{m}]" if per_ch else "[]"
    zx = (117 if xdt == "u8" else -5) if zx is None else zx
    text = f"""graph @g(%xq: {xdt}[{','.join(map(str, xs))}]) -> (%y) {{
  %sx = const f32[] [{1.0 if unit else 0.04}]
  %zx = const {xdt}[] [{zx}]
  %W = const i8[{','.join(map(str, ws))}] dense<elided>
  %sw = const f32{p} dense<elided>
  %zw = const i8{p} dense<elided>
  %b = const i32[{m}] dense<elided>
  %y = qconv(%xq, %sx, %zx, %W, %sw, %zw, %b) {{{attr_text}}} : f32[{','.join(map(str, y.shape))}]
}}"""
    shape = (m,) if per_ch else ()
    consts = {"W": codes(rng, "i8", ws),
              "sw": (np.ones(shape) if unit else rng.uniform(0.005, 0.02, shape)).astype(np.float32),
              "zw": rng.integers(-6, 7, shape).astype(np.int8), "b": codes(rng, "i32", (m,))}
    return text, consts, {"xq": codes(rng, xdt, xs)}


@pytest.mark.skipif(not has_avx2(TARGET), reason="the vpmaddwd kernel needs x86 AVX2")
@pytest.mark.parametrize("name", sorted(PAIR_CONVS))
def test_qconv_int16_pairs_exact(name):
    """Unit scales: the f32 output is the int32 sum + bias itself, so the kernel must match exactly: the pair
    kernel, or for <= 4 input channels the float32 one on centered codes."""
    xs, ws, attrs, xdt, per_ch = PAIR_CONVS[name]
    text, consts, feeds = _qconv_case(xs, ws, attrs, xdt, per_ch, unit=True, seed=len(name))
    g = ir.parse(text, constants=consts)
    k = lower_node(g.nodes[-1], TARGET, name="k")
    assert not k.notes and k.scheduled
    small = xs[1] <= QCONV_FLOAT_MAX_CHANNELS
    assert k.kind == "conv2d" and ("w_f: T.Buffer" if small else "qconv_pairs") in k.func.script()
    got = run_kernel(k, feeds, TARGET)[0]
    want = interpret(g, feeds)["y"]
    assert np.abs(want).max() < 2 ** 24
    np.testing.assert_array_equal(got, want)


@pytest.mark.skipif(not has_avx2(TARGET), reason="the fallback past the bound is the vpmaddwd kernel (x86 AVX2)")
@pytest.mark.parametrize("xdt,x_code,zx", [("u8", 255, 0), ("i8", -128, 127), ("u8", 0, 255)])
def test_qconv_float_exact_at_the_extremes_and_its_bound(xdt, x_code, zx):
    """<= 4 input channels: float32 on centered codes equals the int32 sums exactly at the widest codes
    (|x - zx| = 255, |w - zw| = 255, 36 taps); a weight whose sums could pass 2^24 (324 taps) keeps the
    pair kernel."""
    for ws, pairs in (((3, 4, 3, 3), False), ((2, 4, 9, 9), True)):
        xs = (1, 4, 12, 12)
        text, consts, _ = _qconv_case(xs, ws, {"pads": [1, 1, 1, 1]}, xdt, False, unit=True, zx=zx)
        consts["W"] = np.full(ws, -128, np.int8)
        consts["zw"] = np.array(127, np.int8)
        feeds = {"xq": np.full(xs, x_code, np.uint8 if xdt == "u8" else np.int8)}
        g = ir.parse(text, constants=consts)
        k = lower_node(g.nodes[-1], TARGET, name="k")
        assert ("qconv_pairs" if pairs else "w_f: T.Buffer") in k.func.script()
        want = interpret(g, feeds)["y"]
        np.testing.assert_array_equal(run_kernel(k, feeds, TARGET)[0], want)
        assert np.abs(want).max() > (2 ** 22 if pairs else 2 ** 21)  # the sums are as large as claimed


@pytest.mark.parametrize("name", ["3x3-pad1", "odd-c-odd-r", "1d"])
def test_qconv_int16_pairs_scaled(name):
    xs, ws, attrs, xdt, per_ch = PAIR_CONVS[name]
    text, consts, feeds = _qconv_case(xs, ws, attrs, xdt, per_ch, seed=3)
    run_one(text, consts, feeds)


@pytest.mark.skipif(not has_avx2(TARGET), reason="the vpmaddwd kernel needs x86 AVX2")
def test_qconv_uses_vpmaddwd_on_avx2():
    text, consts, feeds = _qconv_case((1, 8, 10, 10), (16, 8, 3, 3), {"pads": [1, 1, 1, 1]}, "u8", True)
    g = ir.parse(text, constants=consts)
    k = lower_node(g.nodes[-1], TARGET, name="k")
    mod = build_kernel(k, TARGET)
    asm = mod.inspect_source("asm")
    # with AVX512-VNNI (e.g. -mcpu=rocketlake) LLVM fuses vpmaddwd + vpaddd into vpdpwssd
    assert ("vpmaddwd" in asm or "vpdpwssd" in asm) and "vpmulld" not in asm
    assert_close(run_kernel(k, feeds, TARGET, module=mod)[0], interpret(g, feeds)["y"])


@pytest.mark.parametrize("attrs,ws", [
    ({"group": 2, "pads": [1, 1, 1, 1]}, (6, 2, 3, 3)),  # grouped
    ({"group": 8, "strides": [2, 2]}, (8, 1, 3, 3)),  # depthwise
])
def test_qconv_grouped_falls_back_to_direct_conv(attrs, ws):
    """groups > 1 keeps the direct int32-lane conv (no pair kernel), still exact."""
    xs = (1, 4 if attrs["group"] == 2 else 8, 9, 9)
    text, consts, feeds = _qconv_case(xs, ws, attrs, "u8", True, unit=True, seed=7)
    g = ir.parse(text, constants=consts)
    k = lower_node(g.nodes[-1], TARGET, name="k")
    assert not k.notes and k.scheduled
    assert "qconv_pairs" not in k.func.script()
    np.testing.assert_array_equal(run_kernel(k, feeds, TARGET)[0], interpret(g, feeds)["y"])


def test_qconv_without_avx2_falls_back():
    generic = Target({"kind": "llvm"})
    text, consts, feeds = _qconv_case((1, 3, 7, 7), (5, 3, 3, 3), {"pads": [1, 1, 1, 1]}, "i8", False, unit=True)
    g = ir.parse(text, constants=consts)
    k = lower_node(g.nodes[-1], generic, name="k")
    assert not k.notes and "qconv_pairs" not in k.func.script()
    np.testing.assert_array_equal(run_kernel(k, feeds, generic)[0], interpret(g, feeds)["y"])


@pytest.mark.skipif(not has_avx2(TARGET), reason="the vpmaddwd kernel needs x86 AVX2")
def test_fused_block_quantize_qconv_relu_requantize():
    """quantize -> qconv -> relu -> quantize as one kernel on the pair kernel (the input quantize in its pad stage)."""
    rng = np.random.default_rng(9)
    text = """graph @g(%x: f32[1,5,9,9]) -> (%yq) {
  %sx = const f32[] [0.05]
  %zx = const u8[] [128]
  %W = const i8[12,5,3,3] dense<elided>
  %sw = const f32[12] dense<elided>
  %zw = const i8[12] dense<elided>
  %b = const i32[12] dense<elided>
  %sy = const f32[] [0.2]
  %zy = const u8[] [0]
  %xq = quantize(%x, %sx, %zx) {dtype="u8"} : u8[1,5,9,9]
  %m = qconv(%xq, %sx, %zx, %W, %sw, %zw, %b) {pads=[1, 1, 1, 1]} : f32[1,12,9,9]
  %r = relu(%m) : f32[1,12,9,9]
  %yq = quantize(%r, %sy, %zy) {dtype="u8"} : u8[1,12,9,9]
}"""
    consts = {"W": codes(rng, "i8", (12, 5, 3, 3)), "sw": rng.uniform(0.005, 0.02, 12).astype(np.float32),
              "zw": np.zeros(12, np.int8), "b": codes(rng, "i32", (12,))}
    g = run_pipeline(ir.parse(text, constants=consts), "fuse-blocks")
    assert len({n.block for n in g.nodes}) == 1
    k = lower_block(g.nodes, TARGET, name="k")
    assert not k.notes and k.kind == "conv2d" and "qconv_pairs" in k.func.script()
    x = rng.standard_normal((1, 5, 9, 9)).astype(np.float32)
    got = run_kernel(k, {"x": x}, TARGET)[0]
    want = interpret(g, {"x": x})["yq"]
    assert np.abs(got.astype(np.int32) - want.astype(np.int32)).max() <= 1
    assert np.mean(got == want) > 0.99
