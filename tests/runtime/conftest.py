"""Small real artifacts (Relax modules built with BlockBuilder) shared by the runtime tests.

Every test runs with ``KILN_HOME`` in a temp folder (tests/conftest.py), so the local signing
key it creates (and trusts) is the test session's own, not the user's.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kiln.runtime import write_artifact
from kiln.runtime.signing import local_private_key, signature_record

W = np.linspace(-1.0, 1.0, 8, dtype=np.float32)


@dataclass(frozen=True)
class Built:
    """A written artifact plus what was written, to rebuild variants of it."""

    path: Path
    library: bytes
    weights: dict[str, np.ndarray]
    manifest: dict[str, Any]

    def variant(self, path: Path, **changes: Any) -> Path:
        """The same artifact with manifest keys changed, written (hashes recomputed) to ``path``."""
        write_artifact(path, library=self.library, weights=self.weights, ir_text="ir",
                       manifest={**self.manifest, **changes})
        return path


def _relax_module(symbolic: bool) -> Any:
    """main(x: [N|2, 8] f32, w: [8] f32) -> (x + w, relu(x))."""
    import tvm
    from tvm import relax, topi

    bb = relax.BlockBuilder()
    n = tvm.tirx.Var("N", "int64") if symbolic else 2
    x = relax.Var("x", relax.TensorType((n, 8), "float32"))
    w = relax.Var("w", relax.TensorType((8,), "float32"))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            a = bb.emit_te(topi.add, x, w)
            r = bb.emit_te(topi.nn.relu, x)
            out = bb.emit_output(relax.Tuple([a, r]))
        bb.emit_func_output(out)
    return bb.get()


def _pair_module() -> Any:
    """main(x: [N, 4] f32, y: [N, 4] f32) -> x * y (no weights): two inputs sharing symbol N."""
    import tvm
    from tvm import relax, topi

    bb = relax.BlockBuilder()
    n = tvm.tirx.Var("N", "int64")
    x = relax.Var("x", relax.TensorType((n, 4), "float32"))
    y = relax.Var("y", relax.TensorType((n, 4), "float32"))
    with bb.function("main", [x, y]):
        with bb.dataflow():
            out = bb.emit_output(bb.emit_te(topi.multiply, x, y))
        bb.emit_func_output(out)
    return bb.get()


def _compile(mod: Any, tmp: Path) -> tuple[bytes, dict[str, Any]]:
    import tvm

    from kiln.codegen.target import host_target

    target = host_target()
    exe = tvm.compile(mod, target=target)
    lib = tmp / "lib.so"
    exe.export_library(str(lib))
    spec = {k: target.attrs[k] for k in ("mcpu", "mtriple", "num-cores") if k in target.attrs}
    return lib.read_bytes(), {"kind": "llvm", **{k: (int(v) if k == "num-cores" else str(v))
                                                 for k, v in spec.items()}}


def _manifest(target: dict, inputs: list, outputs: list, symbols: dict, weights: list) -> dict[str, Any]:
    import tvm

    from kiln.runtime.cpu import required_cpu_features

    return {
        "kiln_version": "0.1.0", "tvm_version": tvm.__version__, "target": target,
        "cpu_features": required_cpu_features(target), "pipeline": "test", "inputs": inputs,
        "outputs": outputs, "symbols": symbols, "weights": weights, "entry": "main",
        "kernels": [{"name": "add", "op": "Add", "kind": "te"}], "calibration": None,
        "created": "2025-01-01T00:00:00+00:00",
    }


def _build(tmp: Path, name: str, mod: Any, inputs: list, outputs: list, symbols: dict,
           weights: dict[str, np.ndarray]) -> Built:
    work = tmp / name
    work.mkdir()
    library, target = _compile(mod, work)
    manifest = _manifest(target, inputs, outputs, symbols, list(weights))
    path = tmp / f"{name}.kiln"
    write_artifact(path, library=library, weights=weights, ir_text=f"graph {name}\n",
                   manifest=manifest)
    return Built(path, library, weights, manifest)


def _sig(name: str, shape: list) -> dict[str, Any]:
    return {"name": name, "dtype": "float32", "shape": shape}


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Built]:
    """Three artifacts: static [2, 8] with a weight, symbolic [N=2, 8], and two inputs sharing N=3."""
    tmp = tmp_path_factory.mktemp("artifacts")
    outs = [_sig("sum", [2, 8]), _sig("relu", [2, 8])]
    sym_outs = [_sig("sum", ["N", 8]), _sig("relu", ["N", 8])]
    return {
        "static": _build(tmp, "static", _relax_module(False), [_sig("x", [2, 8])], outs, {}, {"w": W}),
        "symbolic": _build(tmp, "symbolic", _relax_module(True), [_sig("x", ["N", 8])], sym_outs,
                           {"N": 2}, {"w": W}),
        "pair": _build(tmp, "pair", _pair_module(), [_sig("x", ["N", 4]), _sig("y", ["N", 4])],
                       [_sig("prod", ["N", 4])], {"N": 3}, {}),
    }


def rewrite_member(src: os.PathLike, dst: os.PathLike, name: str, transform: Any, *, resign: Any = None) -> None:
    """Copy an artifact zip, replacing member ``name`` with ``transform(old bytes)`` (a valid zip).

    With ``resign`` (a private key, or True for the local key) signature.json is
    rewritten for the new manifest, as a signer would: then only the checks
    behind the signature can catch the change.
    """
    with zipfile.ZipFile(src) as zin:
        members = [(info, zin.read(info.filename)) for info in zin.infolist()]
    out = {}
    for info, data in members:
        if info.filename == name:
            data = transform(data)
            if data is None:
                continue
        out[info.filename] = (info, data)
    if resign is not None and "manifest.json" in out and "signature.json" in out:
        key = local_private_key() if resign is True else resign
        record = json.dumps(signature_record(out["manifest.json"][1], key)).encode()
        out["signature.json"] = (out["signature.json"][0], record)
    with zipfile.ZipFile(dst, "w") as zout:
        for info, data in out.values():
            zout.writestr(info, data)


def edit_manifest(src: os.PathLike, dst: os.PathLike, edit: Any, *, resign: Any = True) -> None:
    """Copy an artifact, applying ``edit(manifest dict)`` in place to its manifest.json, re-signed (local key)
    unless ``resign`` is None (then the digest no longer matches)."""
    def transform(data: bytes) -> bytes:
        manifest = json.loads(data)
        edit(manifest)
        return json.dumps(manifest).encode()

    rewrite_member(src, dst, "manifest.json", transform, resign=resign)
