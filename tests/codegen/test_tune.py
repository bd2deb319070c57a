"""MetaSchedule tuning: a tuned compile still matches the interpreter, and its records are reused."""

import numpy as np
import pytest

import kiln
from kiln import ir
from kiln.codegen.tolerance import MODEL_F32, assert_close

TEXT = """graph @g(%x: f32[8,32]) -> (%y) {
  %w = const f32[32,32] dense<elided>
  %m = matmul(%x, %w) : f32[8,32]
  %y = relu(%m) : f32[8,32]
}"""


@pytest.mark.slow
def test_tuning_database_is_written_then_reused(tmp_path, monkeypatch):
    from tvm.s_tir import meta_schedule as ms

    rng = np.random.default_rng(0)
    w = rng.standard_normal((32, 32)).astype(np.float32)
    g = ir.parse(TEXT, constants={"w": w})
    x = rng.standard_normal((8, 32)).astype(np.float32)
    db = tmp_path / "db"

    art = kiln.compile(g, tune=2, tune_db=str(db))
    (kernel,) = art.manifest["kernels"]
    assert kernel["ops"] == ["matmul", "relu"]
    assert kernel["tuning"].split()[0] in ("tuned", "hand"), kernel
    assert (db / "records.json").stat().st_size > 0
    assert_close(art.load().run({"x": x})["y"], np.maximum(x @ w, 0), MODEL_F32)

    def no_tuning(*args, **kwargs):
        raise AssertionError("the database should have answered without tuning")

    monkeypatch.setattr(ms, "tune_tir", no_tuning)
    again = kiln.compile(g, tune=2, tune_db=str(db))
    assert again.manifest["kernels"][0]["tuning"].split()[0] in ("database", "hand")
    assert_close(again.load().run({"x": x})["y"], np.maximum(x @ w, 0), MODEL_F32)
