"""TVM 0.27 alone (no kiln): NarrowDataType on SBlock TIR (before LowerOpaqueBlock) kills the process (SIGSEGV, exit 139)."""
import tvm
from tvm.script import tirx as T


@T.prim_func(s_tir=True)
def f(a: T.Buffer((4,), "float32"), b: T.Buffer((4,), "float32")):
    for i in range(4):
        with T.sblock("b"):
            vi = T.axis.spatial(4, i)
            b[vi] = a[vi] + T.float32(1)
mod = tvm.IRModule({"main": f})
print("before", flush=True)
tvm.tirx.transform.NarrowDataType(16)(mod)
print("ok minimal")
