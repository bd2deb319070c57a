"""CPU feature tables: what an mcpu/mattr needs, and the host check."""

from __future__ import annotations

import pytest

from kiln.runtime.cpu import (
    flags_of_llvm_features,
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
    """Each +feature brings what it implies (issue 15 item 3: -mattr=+avx512bw needs avx512f, avx2, fma...)."""
    needed = required_cpu_features({"kind": "llvm", "mattr": ["+avx512bw"]})
    assert {"avx512bw", "avx512f", "avx2", "avx", "fma", "f16c", "sse4_2", "ssse3"} <= set(needed)
    assert required_cpu_features({"kind": "llvm", "mattr": "+avx2,+unknownfeat"}) == \
        ["avx", "avx2", "pni", "sse4_1", "sse4_2", "ssse3"]
    assert "amx_tile" in required_cpu_features({"kind": "llvm", "mattr": "+amx-int8"})
    assert "avx2" not in required_cpu_features({"mcpu": "haswell", "mattr": ["-avx2"]})


def test_llvm_feature_names_map_to_cpuinfo_flags():
    assert flags_of_llvm_features(["avx512vnni", "sahf", "lzcnt", "pclmul", "sse4.1", "fast-gather", "64bit"]) == \
        ["abm", "avx512_vnni", "lahf_lm", "pclmulqdq", "sse4_1"]


def test_non_x86_targets_need_no_x86_flags():
    assert required_cpu_features({"kind": "llvm", "mcpu": "haswell", "mtriple": "aarch64-linux-gnu"}) == []
    assert required_cpu_features({"kind": "cuda"}) == []
    assert target_arch({"mtriple": "x86_64-conda-linux-gnu"}) == "x86_64"
    assert target_arch({"mtriple": "arm64-apple-darwin"}) == "aarch64"


def test_missing_features():
    assert missing_cpu_features(["avx2", "avx512f"], host={"avx2", "fma"}) == ["avx512f"]
    assert missing_cpu_features(["avx512f"], host=set()) == []


@pytest.mark.skipif(not host_cpu_flags(), reason="needs the CPU feature flags of /proc/cpuinfo, which this machine does not show")
def test_host_target_needs_only_what_this_cpu_has():
    from tvm.target.codegen import llvm_get_cpu_features

    from kiln.codegen.target import host_target

    target = host_target()
    spec = {"kind": "llvm", **{k: str(target.attrs[k]) for k in ("mcpu", "mtriple") if k in target.attrs}}
    assert missing_cpu_features(required_cpu_features(spec)) == []
    llvm = flags_of_llvm_features(str(f) for f in llvm_get_cpu_features(target))
    assert "avx" in llvm or "avx" not in host_cpu_flags()
    assert missing_cpu_features(llvm) == []
