"""TVM 0.27 miscompiles a rank-0 int32 min reduction followed by a float min epilogue in one PrimFunc.

Found by the QOperator work (DynamicQuantizeLinear lifts to reduce_min(all) -> min(r, 0)): on a [3, 16]
input the kernel returns -31.09 where min(min(a), 0) is -2.33. reduce_max -> max, keepdims=1 and
reduce_min -> add are all correct. kiln reduces into [1, ..., 1] instead (codegen/lowering/reduce.py).
Run: python tvm_repro.py  (prints the wrong value and the expected one)
"""

import numpy as np
import tvm
from tvm.script import tirx as T


@T.prim_func(s_tir=True)
def main(in0: T.Buffer((3, 16), "float32"), z: T.Buffer((), "float32"), y: T.Buffer((), "float32")):
    T.func_attr({"tirx.noalias": True})
    red = T.sblock_alloc_buffer((), "int32")
    for k0, k1 in T.grid(3, 16):
        with T.sblock("red"):
            v_k0, v_k1 = T.axis.remap("RR", [k0, k1])
            T.reads(in0[v_k0, v_k1])
            T.writes(red[()])
            with T.init():
                red[()] = 2147483647
            red[()] = T.min(red[()], T.Select(T.isnan(in0[v_k0, v_k1]), -2143289345,
                                              T.reinterpret("int32", in0[v_k0, v_k1])
                                              ^ T.reinterpret("int32", in0[v_k0, v_k1]) >> 31 & 2147483647))
    with T.sblock("epilogue"):
        vi = T.axis.spatial(1, 0)  # noqa: F841  (the sblock's spatial axis)
        T.reads(z[()], red[()])
        T.writes(y[()])
        y[()] = T.Select(T.isnan(z[()]), z[()], T.Select(
            z[()] < T.reinterpret("float32", red[()] ^ red[()] >> 31 & 2147483647), z[()],
            T.reinterpret("float32", red[()] ^ red[()] >> 31 & 2147483647)))


if __name__ == "__main__":
    x = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
    lib = tvm.tirx.build(tvm.IRModule({"main": main}), target=tvm.target.Target.from_device(tvm.cpu()))
    dev = tvm.cpu()
    out = tvm.runtime.tensor(np.zeros((), np.float32), dev)
    lib["main"](tvm.runtime.tensor(x, dev), tvm.runtime.tensor(np.zeros((), np.float32), dev), out)
    print("tvm:", float(out.numpy()), "expected:", min(float(x.min()), 0.0))
