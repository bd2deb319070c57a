"""CPU feature tables: what an mcpu/mattr needs, and the host check."""

from __future__ import annotations

import pytest

from kiln.runtime.cpu import (
    host_cpu_flags,
    missing_cpu_features,
    required_cpu_features,
    target_arch,
)


def test_mcpu_tables():
    assert required_cpu_features({"kind": "llvm", "mcpu": "x86-64"}) == []
    v3 = required_cpu_features({"kind": "llvm", "mcpu": "haswell"})
    assert {"avx", "avx2", "fma", "f16c", "sse4_2"} <= set(v3) and "avx512f" not in v3
    spr = set(required_cpu_features({"kind": "llvm", "mcpu": "sapphirerapids"}))
    assert {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16", "amx_tile"} <= spr
    assert "avx512_vnni" in required_cpu_features({"mcpu": "cascadelake"})
    assert "avx512f" in required_cpu_features({"mcpu": "znver4"})
    assert "avx512f" not in required_cpu_features({"mcpu": "znver3"})
    assert required_cpu_features({"kind": "llvm", "mcpu": "some-future-cpu"}) == []


def test_mattr_adds_and_removes():
    assert required_cpu_features({"kind": "llvm", "mattr": ["+avx512f", "+avx512bw"]}) == ["avx512bw", "avx512f"]
    assert required_cpu_features({"kind": "llvm", "mattr": "+avx2,+fma,+unknownfeat"}) == ["avx2", "fma"]
    assert "avx2" not in required_cpu_features({"mcpu": "haswell", "mattr": ["-avx2"]})


def test_non_x86_targets_need_no_x86_flags():
    assert required_cpu_features({"kind": "llvm", "mcpu": "haswell", "mtriple": "aarch64-linux-gnu"}) == []
    assert required_cpu_features({"kind": "cuda"}) == []
    assert target_arch({"mtriple": "x86_64-conda-linux-gnu"}) == "x86_64"
    assert target_arch({"mtriple": "arm64-apple-darwin"}) == "aarch64"


def test_missing_features():
    assert missing_cpu_features(["avx2", "avx512f"], host={"avx2", "fma"}) == ["avx512f"]
    assert missing_cpu_features(["avx512f"], host=set()) == []


@pytest.mark.skipif(not host_cpu_flags(), reason="this CPU's flags are unknown")
def test_host_target_needs_only_what_this_cpu_has():
    from kiln.codegen.target import host_target

    target = host_target()
    spec = {"kind": "llvm", **{k: str(target.attrs[k]) for k in ("mcpu", "mtriple") if k in target.attrs}}
    assert missing_cpu_features(required_cpu_features(spec)) == []
