"""Campaigns end to end: the CI smoke run finds nothing; a planted bug is found, reduced and replayed."""

import json
import subprocess
import sys

import pytest

import tests.fuzz.planted  # noqa: F401  (registers the planted passes in this process)
from kiln.fuzz.campaign import FuzzOptions, iter_finding_dirs, parse_duration, run_campaign
from kiln.fuzz.findings import read_finding, replay
from kiln.fuzz.oracle import GraphCase

# This module registers planted passes in-process; in-process campaigns name the product passes explicitly.
PRODUCT_PASSES = ("canonicalize", "dce", "fold-conv-bn", "fold-conv-bn{mode=tune}", "fuse-blocks",
                  "fold-ln-affine", "ln-to-rmsnorm", "ln-to-crmsnorm{untie=true}")


def test_parse_duration():
    assert parse_duration("90") == 90 and parse_duration("90s") == 90
    assert parse_duration("10m") == 600 and parse_duration("1h") == 3600
    with pytest.raises(ValueError, match="duration"):
        parse_duration("ten")


def test_options_name_what_is_wrong():
    with pytest.raises(ValueError, match="--level"):
        FuzzOptions(level="ir", iterations=1)
    with pytest.raises(ValueError, match="--time or --iterations"):
        FuzzOptions()


@pytest.mark.slow
def test_fuzz_smoke_run_finds_nothing_on_the_current_compiler(tmp_path):
    """The CI smoke run: fixed seed, both levels, every stage, in a worker process, well under 60 s."""
    out = tmp_path / "fuzz"
    cmd = [sys.executable, "-m", "kiln", "fuzz", "--level", "both", "--iterations", "24", "--seed", "7",
           "--jobs", "1", "--timeout", "40", "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["tests"] == 24
    assert report["findings"] == [], report["findings"]
    assert report["coverage"]["total"] > 0 and set(report["levels"]) == {"graph", "tir"}
    assert (out / "coverage.png").stat().st_size > 1000
    assert any((out / "corpus").iterdir())


@pytest.mark.slow
def test_a_planted_bug_is_found_reduced_and_replayed(tmp_path):
    pool = ("planted-sub-to-add", "dce", "fuse-blocks")
    opts = FuzzOptions(level="graph", iterations=80, seed=1, jobs=0, pass_pool=pool, stages=("passes",),
                       out=str(tmp_path), reduce_tests=150)
    camp = run_campaign(opts)
    found = [f for f in camp.findings.values() if f.outcome["pass_name"] == "planted-sub-to-add"]
    assert found, [f.outcome for f in camp.findings.values()]
    f = found[0]
    assert f.outcome["symptom"] == "mismatch" and f.outcome["stage"] == "pass"
    reduced = GraphCase.from_json(f.reduced)
    ops = [n.op for n in reduced.graph().nodes]
    assert ("sub" in ops or "add" in ops) and len(ops) <= 3, reduced.ir
    assert reduced.passes == ["planted-sub-to-add"]
    assert f.size_after < f.size_before
    folders = list(iter_finding_dirs(tmp_path))
    assert any(d.name == f.id for d in folders)
    d = tmp_path / "findings" / f.id
    for name in ("case.ir", "original.ir", "pipeline.txt", "inputs.npz", "finding.json", "repro.sh"):
        assert (d / name).exists(), name
    level, case, expected = read_finding(d)
    assert level == "graph" and case["passes"] == ["planted-sub-to-add"]
    assert all(r.reproduces for r in replay([d], in_process=True))


def test_without_feedback_the_corpus_never_grows():
    opts = FuzzOptions(level="graph", iterations=12, seed=0, jobs=0, feedback=False, stages=("passes",),
                       reduce=False, pass_pool=PRODUCT_PASSES)
    camp = run_campaign(opts)
    assert all(e.added == 0 for e in camp.corpus["graph"])
    assert camp.coverage.total > 0


@pytest.mark.slow
def test_zoo_models_seed_the_graph_corpus():
    opts = FuzzOptions(level="graph", iterations=3, seed=0, jobs=0, models=("mlp",), stages=("passes",),
                       reduce=False, pass_pool=PRODUCT_PASSES)
    camp = run_campaign(opts)
    seed = camp.corpus["graph"][0]
    assert seed.origin == "seed:mlp"
    assert "matmul" in GraphCase.from_json(seed.case).graph().op_counts()
    with pytest.raises(ValueError, match="no light model 'nope'"):
        run_campaign(FuzzOptions(level="graph", iterations=1, jobs=0, models=("light:nope",), reduce=False))
