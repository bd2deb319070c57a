"""The TIR level of the fuzzer: seeds, mutators, pass sequences, the guarded oracle and the reducer."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
import tvm_ffi

from kiln.fuzz import tir


def _json(script: str) -> str:
    """A handwritten TVMScript literal of this file (trusted test source) as the TVM JSON cases hold."""
    return tir.dump_func(tvm.script.from_source(script))

OOB = '''# from tvm.script import tirx as T

@T.prim_func
def oob(A: T.Buffer((4,), "float32"), B: T.Buffer((4,), "float32")):
    for i in range(5):
        B[i] = A[i % 4] + T.float32(1.0)
'''

UNINIT = '''# from tvm.script import tirx as T

@T.prim_func
def uninit(A: T.Buffer((4,), "float32"), B: T.Buffer((4,), "float32")):
    S = T.alloc_buffer((4,), "float32", scope="local")
    for i in range(4):
        B[i] = A[i] + S[i]
'''

COPY = '''# from tvm.script import tirx as T

@T.prim_func
def copy(A: T.Buffer((8,), "float32"), B: T.Buffer((8,), "float32")):
    for i in range(8):
        B[i] = A[i] * T.float32(2.0)
    for j in range(8):
        A[j] = T.float32(0.0)
'''


@pytest.fixture(scope="module")
def seeds() -> list[tir.TirCase]:
    return tir.seed_cases(0)


SMALL = ("kernel:trivial", "kernel:matmul:unscheduled", "kernel:ewise_chain:unscheduled", "kernel:matmul_bias_relu",
         "kernel:reduce_mean")


def _small(seeds: list[tir.TirCase]) -> list[tir.TirCase]:
    return [c for c in seeds if c.origin in SMALL]


def _by_origin(seeds: list[tir.TirCase], origin: str) -> tir.TirCase:
    return next(c for c in seeds if c.origin == origin)


def test_seed_cases_round_trip_and_run_ok(seeds: list[tir.TirCase]) -> None:
    origins = {c.origin for c in seeds}
    assert {"kernel:matmul", "kernel:matmul:unscheduled", "kernel:conv", "kernel:softmax", "kernel:trivial"} <= origins
    for case in seeds:
        func = case.prim_func()
        assert tvm_ffi.structural_equal(tir.load_func(tir.dump_func(func)), func), case.origin
        assert "T.prim_func" in case.script
        assert case.passes == []
    for origin in ("kernel:matmul", "kernel:matmul_bias_relu:unscheduled", "kernel:trivial"):
        out = tir.run_case(_by_origin(seeds, origin))
        assert out.status == "ok", (origin, out)
        assert out.changed_passes, origin
        assert any(f.startswith("edge:") for f in out.features)
        assert any(f.startswith("for:") for f in out.features)


def test_case_from_kernel_is_runnable() -> None:
    from kiln.codegen.kernel import lower_node
    from kiln.codegen.target import host_target
    from kiln.ir.text import parse

    g = parse("""graph @g(%x: f32[3,5]) -> (%y) {
      %y = sigmoid(%x) : f32[3,5]
    }""")
    case = tir.case_from_kernel(lower_node(g.nodes[0], host_target(), name="k_sig"), seed=3)
    assert case.origin == "kernel:k_sig" and case.seed == 3
    assert tir.run_case(case).status == "ok"


def test_mutate_func_changes_and_round_trips(seeds: list[tir.TirCase]) -> None:
    rng = np.random.default_rng(7)
    names = set()
    small = _small(seeds)
    for i in range(30):
        func = small[i % len(small)].prim_func()
        new, name = tir.mutate_func(func, rng)
        names.add(name)
        assert name in tir.MUTATORS
        assert not tvm_ffi.structural_equal(new, func), name
        assert tvm_ffi.structural_equal(tir.load_func(tir.dump_func(new)), new), name
    assert len(names) >= 8, names


def test_every_mutator_fits_some_seed(seeds: list[tir.TirCase]) -> None:
    funcs = [c.prim_func() for c in _small(seeds)]
    for name in tir.MUTATORS:
        ok = 0
        for k in range(3 * len(funcs)):
            try:
                new = tir._apply(name, funcs[k % len(funcs)], np.random.default_rng(k))
                tir.load_func(tir.dump_func(new))
            except Exception:  # noqa: BLE001 - a mutator may not fit every seed
                continue
            ok += 1
            break
        assert ok, name


def test_pass_sequences() -> None:
    rng = np.random.default_rng(0)
    for spec in tir.PASS_POOL:
        tir.make_pass(spec)
    for name, args in tir._PASS_ARGS.items():
        for a in args:
            tir.make_pass(f"{name}:{a}" if a else name)
    passes: list[str] = []
    for _ in range(200):
        new = tir.mutate_passes(passes, rng)
        assert new != passes and len(new) <= tir.MAX_PASSES
        assert all(p.partition(":")[0] in tir.PASS_POOL for p in new)
        passes = new
    a, b = ["tirx.StmtSimplify"] * 5, ["tirx.RemoveNoOp"] * 7
    for _ in range(50):
        child = tir.crossover_passes(a, b, rng)
        assert set(child) <= set(a) | set(b) and len(child) <= tir.MAX_PASSES
    assert "tirx.NarrowDataType" not in tir.SAFE_PASS_POOL


def test_out_of_bounds_write_is_reported() -> None:
    out = tir.run_case(tir.TirCase(_json(OOB), [], 0, "handwritten"))
    assert out.status == "oob", out
    assert out.detail["oob"][0]["buffer"] == "B" and out.detail["oob"][0]["side"] == "after"
    # the same write in a mutated function is the function's fault, not the compiler's
    assert tir.run_case(tir.TirCase(_json(OOB), [], 0, "kernel:x|ir-flip-const")).status == "invalid"


def test_uninitialized_read_is_invalid_not_mismatch() -> None:
    for passes in ([], ["s_tir.LoopPartition", "tirx.StmtSimplify"]):
        out = tir.run_case(tir.TirCase(_json(UNINIT), passes, 0, "kernel:handwritten|ir-wrap-alloc"))
        assert out.status == "invalid", out
    assert tir.uninitialized_reads(tir.load_func(_json(UNINIT))) == ["S"]


def test_inputs_written_and_passes_compared() -> None:
    out = tir.run_case(tir.TirCase(_json(COPY), ["tirx.StmtSimplify", "s_tir.LoopPartition", "tirx.UnrollLoop"], 1))
    assert out.status == "ok", out
    assert any(p.startswith("pre:") for p in out.changed_passes) or out.changed_passes


def test_pass_error_and_bad_script_never_raise(seeds: list[tir.TirCase]) -> None:
    mm = _by_origin(seeds, "kernel:matmul:unscheduled")  # a reduction block with an init
    out = tir.run_case(tir.TirCase(mm.func, ["s_tir.ConvertBlocksToOpaque"], 0, mm.origin))
    assert out.status == "pass-error", out
    assert out.error_site.startswith("mutated-build:") and "0x" not in out.message
    assert tir.run_case(tir.TirCase("def nope(:", [], 0)).status == "invalid"
    assert tir.run_case(tir.TirCase(mm.func, ["tirx.NoSuchPass"], 0)).status == "invalid"


def test_reduce_case_shrinks_to_the_minimum(seeds: list[tir.TirCase]) -> None:
    base = _by_origin(seeds, "kernel:ewise_chain:unscheduled")
    passes = ["tirx.StmtSimplify", "tirx.RemoveNoOp", "s_tir.LoopPartition", "tirx.UnrollLoop",
              "s_tir.CanonicalizeLoop", "tirx.ConvertSSA"]
    case = tir.TirCase(base.func, passes, 0, base.origin)

    def fails(c: tir.TirCase) -> bool:
        func = c.prim_func()
        has_for = any(isinstance(s.node, tir.tirx.For) for s in tir._sites(func.body))
        return "s_tir.LoopPartition" in c.passes and has_for

    small = tir.reduce_case(case, fails)
    assert small.passes == ["s_tir.LoopPartition"]
    func = small.prim_func()
    fors = [s for s in tir._sites(func.body) if isinstance(s.node, tir.tirx.For)]
    assert len(fors) == 1
    assert len(tir._sites(func.body)) < len(tir._sites(base.prim_func().body))


@pytest.mark.slow
def test_random_mutation_loop_never_raises(seeds: list[tir.TirCase]) -> None:
    rng = np.random.default_rng(1)
    statuses = set()
    for _ in range(30):
        case = seeds[int(rng.integers(len(seeds)))]
        for _ in range(int(rng.integers(1, 4))):
            try:
                case, _how = tir.mutate_case(case, rng, tir.SAFE_PASS_POOL)
            except tir.MutationFailed:
                pass
        out = tir.run_case(case)
        assert out.status in ("ok", "invalid", "pass-error", "mismatch", "oob")
        assert isinstance(out.message, str) and isinstance(out.changed_passes, set)
        statuses.add(out.status)
    assert "ok" in statuses
