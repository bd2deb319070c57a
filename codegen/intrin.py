"""x86 tensor intrinsics for kiln's integer kernels (registered with ``tvm.s_tir.TensorIntrin`` on import).

``kiln_dot_8x2_i16_avx2``: 8 int32 accumulators += 8 pairs of int16 products,
``C[i] += A[0] * B[i, 0] + A[1] * B[i, 1]``, as one ``vpmaddwd`` (AVX2: 16
int16 multiply-adds per instruction; LLVM never forms it from TVM's vectorized
int32 multiplies, which become ``vpmulld``). ``A`` is the activation pair
broadcast to every lane as one int32, ``B`` the 8 output columns' weight pairs
(a packed [K/2, N, 2] int16 layout reads them as 16 contiguous int16).
"""

from __future__ import annotations

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

__all__ = ["DOT_8X2_I16", "DOT_8X2_I16_GLOBAL", "has_avx2"]

DOT_8X2_I16 = "kiln_dot_8x2_i16_avx2"
# the same with C a global-scope buffer: a small constant-size global tile allocated inside a parallel loop is a
# stack array (LLVM keeps it in registers), where a "local" one is a workspace allocation per iteration
DOT_8X2_I16_GLOBAL = "kiln_dot_8x2_i16_avx2_global"


def _dot_8x2(scope: str):
    """The intrinsic's (description, implementation), the accumulator C in ``scope``."""

    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((2,), "int16", offset_factor=1), B: T.Buffer((8, 2), "int16", offset_factor=1),
             C: T.Buffer((8,), "int32", offset_factor=1, scope=scope)) -> None:
        with T.sblock("root"):
            T.reads(C[0:8], A[0:2], B[0:8, 0:2])
            T.writes(C[0:8])
            for i in T.serial(0, 8):
                for k in T.serial(0, 2):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((2,), "int16", offset_factor=1), B: T.Buffer((8, 2), "int16", offset_factor=1),
             C: T.Buffer((8,), "int32", offset_factor=1, scope=scope)) -> None:
        with T.sblock("root"):
            T.reads(C[0:8], A[0:2], B[0:8, 0:2])
            T.writes(C[0:8])
            # one expression, no named temporaries: a let-bound value inside a parallel loop becomes a
            # workspace allocation per call
            C[T.ramp(T.int32(0), 1, 8)] = C.vload([0], "int32x8") + T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
                T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "int16x2"), dtype="int32"), 8),
                              dtype="int16x16"),
                B.vload([0, 0], "int16x16"), dtype="int32x8")

    return desc, impl


TensorIntrin.register(DOT_8X2_I16, *_dot_8x2("local"))
TensorIntrin.register(DOT_8X2_I16_GLOBAL, *_dot_8x2("global"))


def has_avx2(target) -> bool:
    """Whether the LLVM target is x86 with AVX2 (the intrinsic's ``vpmaddwd``)."""
    from .target import cpu_features

    if str(target.kind.name) != "llvm":
        return False
    triple = str(target.attrs.get("mtriple", "") or "")
    if triple and not triple.startswith(("x86_64", "i686", "i386")):
        return False
    return "avx2" in cpu_features(target)
