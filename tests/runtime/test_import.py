"""Import hygiene, in fresh processes: the runtime never imports torch or onnx, and blocking torch
while TVM is imported does not break the compiler used later in the same process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

LOAD_AND_RUN = """
import json, sys, time
t0 = time.perf_counter()
import kiln.runtime
t1 = time.perf_counter()
after_import = sorted(m for m in ("tvm", "torch", "onnx") if m in sys.modules)
sess = kiln.runtime.load(sys.argv[1])
t2 = time.perf_counter()
import numpy as np
x = np.ones((2, 8), np.float32)
out = sess.run({"x": x})
print(json.dumps({"after_import": after_import, "import_s": t1 - t0, "load_s": t2 - t1,
                  "heavy": sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "onnx")),
                  "relu": out["relu"].tolist()}))
"""


def _python(code: str, *args: str, env: dict[str, str] | None = None) -> dict:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_load_and_run_import_neither_torch_nor_onnx(artifacts):
    res = _python(LOAD_AND_RUN, str(artifacts["static"].path))
    assert res["after_import"] == []
    assert res["heavy"] == []
    assert res["relu"] == [[1.0] * 8] * 2


def test_runtime_only_mode(artifacts):
    res = _python(LOAD_AND_RUN, str(artifacts["static"].path), env={"KILN_RUNTIME_ONLY": "1"})
    assert res["heavy"] == []
    assert res["relu"] == [[1.0] * 8] * 2


def test_compiler_still_works_after_the_runtime_imported_tvm(artifacts):
    """torch imported after the blocked TVM import, then a Relax build and a load in the same process."""
    code = """
    import json, sys, tempfile
    from pathlib import Path
    import numpy as np
    import kiln.runtime
    first = kiln.runtime.load(sys.argv[1])
    assert "torch" not in sys.modules
    import torch
    import tvm_ffi
    from tests.runtime.conftest import _pair_module, _compile, _manifest, _sig
    d = Path(tempfile.mkdtemp())
    lib, target = _compile(_pair_module(), d)
    manifest = _manifest(target, [_sig("x", ["N", 4]), _sig("y", ["N", 4])], [_sig("prod", ["N", 4])],
                         {"N": 1}, [])
    kiln.runtime.write_artifact(d / "p.kiln", library=lib, weights={}, ir_text="", manifest=manifest)
    out = kiln.runtime.load(d / "p.kiln").run({"x": np.full((1, 4), 3, np.float32),
                                                "y": np.full((1, 4), 2, np.float32)})
    t = torch.arange(8, dtype=torch.float32).reshape(1, 8)
    print(json.dumps({"prod": out["prod"].tolist(), "dlpack": list(tvm_ffi.from_dlpack(t).shape),
                      "first": first.run({"x": np.zeros((2, 8), np.float32)})["relu"].tolist()}))
    """
    res = _python(code, str(artifacts["static"].path))
    assert res["prod"] == [[6.0] * 4]
    assert res["dlpack"] == [1, 8]
    assert res["first"] == [[0.0] * 8] * 2


def _runtime_imports() -> dict[str, set[str]]:
    """The top-level modules each runtime/*.py imports absolutely (relative imports stay in the package)."""
    import ast

    out = {}
    for src in sorted((REPO / "runtime").glob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(src.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names.add(node.module.split(".")[0])
        out[src.name] = names
    return out


def test_runtime_code_imports_nothing_from_the_compiler_side():
    """runtime/ is also the kiln-runtime wheel (import name kiln_runtime): only the stdlib, numpy, ml_dtypes,
    tvm_ffi and cryptography; never kiln's other packages, tvm, torch or onnx."""
    allowed = set(sys.stdlib_module_names) | {"numpy", "ml_dtypes", "tvm_ffi", "cryptography", "__future__"}
    bad = {f: sorted(names - allowed) for f, names in _runtime_imports().items() if names - allowed}
    assert bad == {}


def test_load_and_run_never_import_tvm_nor_map_the_compiler(artifacts):
    code = """
    import json, sys
    import numpy as np
    import kiln.runtime
    out = kiln.runtime.load(sys.argv[1]).run({"x": np.ones((2, 8), np.float32)})
    maps = sorted({l.split()[-1] for l in open("/proc/self/maps") if "libtvm" in l})
    print(json.dumps({"tvm": [m for m in sys.modules if m == "tvm" or m.startswith("tvm.")], "maps": maps,
                      "relu": out["relu"].tolist()}))
    """
    res = _python(code, str(artifacts["static"].path))
    assert res["tvm"] == []
    assert [m for m in res["maps"] if "libtvm_runtime" in m] and not [m for m in res["maps"] if "compiler" in m]
    assert res["relu"] == [[1.0] * 8] * 2


def test_runtime_and_compiler_in_one_process_share_one_tvm_runtime_library(artifacts):
    """Whichever comes first, the runtime (tvm_ffi + libtvm_runtime.so) and ``import tvm`` map the same file."""
    code = """
    import json, sys
    import numpy as np
    if sys.argv[2] == "tvm-first":
        import tvm
    import kiln.runtime
    before = kiln.runtime.load(sys.argv[1]).run({"x": np.ones((2, 8), np.float32)})["relu"].tolist()
    import tvm
    after = kiln.runtime.load(sys.argv[1]).run({"x": np.ones((2, 8), np.float32)})["relu"].tolist()
    maps = sorted({l.split()[-1] for l in open("/proc/self/maps") if "libtvm_runtime.so" in l})
    print(json.dumps({"maps": maps, "same": before == after == [[1.0] * 8] * 2,
                      "tvm_lib": str(tvm.base._LOADED_LIBS["tvm_runtime"]._name)}))
    """
    for order in ("runtime-first", "tvm-first"):
        res = _python(code, str(artifacts["static"].path), order)
        assert res["same"]
        assert len(res["maps"]) == 1 and os.path.samefile(res["maps"][0], res["tvm_lib"]), res
