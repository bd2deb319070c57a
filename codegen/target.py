"""CPU target handling for kiln's TVM code generation.

TVM 0.27 rejects target strings with options (``"llvm -mcpu=znver2"``); only
the bare kind name or the dict/JSON form is accepted.  This module detects
the host CPU, translates the familiar CLI-style strings into the dict form,
and summarises a target (the vector width the schedules should use).
"""

from __future__ import annotations

import json
import os
import shlex
from functools import lru_cache
from typing import Any

import tvm
from tvm.target import Target

from kiln.runtime.errors import Error
from kiln.runtime.session import configure_threads

__all__ = [
    "TargetError",
    "check_runnable",
    "configure_threads",
    "cpu_features",
    "host_target",
    "parse_target",
    "target_summary",
    "vector_width_bits",
    "vector_lanes",
    "num_cores",
]

# Vector register width (bits) of CPUs whose LLVM name alone tells it.  Used
# when LLVM's feature query is not available (e.g. a cross target).
_MCPU_512 = frozenset(
    "skylake-avx512 cascadelake cooperlake icelake-server icelake-client tigerlake "
    "sapphirerapids emeraldrapids graniterapids cannonlake rocketlake znver4 znver5 "
    "knl knm x86-64-v4".split()
)
_MCPU_256 = frozenset(
    "znver1 znver2 znver3 haswell broadwell skylake alderlake raptorlake meteorlake "
    "arrowlake sandybridge ivybridge bdver1 bdver2 bdver3 bdver4 btver2 x86-64-v3 "
    "core-avx2 core-avx-i corei7-avx".split()
)
_MCPU_128 = frozenset("x86-64 x86-64-v2 nehalem westmere core2".split())

# Options of the old CLI string form that take no value (``-system-lib``).
_FLAG_OPTIONS = {"system-lib"}
# Options whose value is a comma-separated list in the dict form.
_LIST_OPTIONS = {"mattr", "keys", "libs", "cl-opt"}
_INT_OPTIONS = {"num-cores", "opt-level", "vector-width"}
_POSITIVE_OPTIONS = {"num-cores", "vector-width"}


class TargetError(Error, ValueError):
    """A target kiln cannot parse or whose code its runtime cannot load; the message names the target."""


def num_cores() -> int:
    """Cores available to this process (affinity-aware)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


@lru_cache(maxsize=1)
def _host_cpu() -> tuple[str, str]:
    detected = Target.from_device(tvm.cpu())
    mcpu = str(detected.attrs.get("mcpu", "")) if "mcpu" in detected.attrs else ""
    mtriple = str(detected.attrs.get("mtriple", "")) if "mtriple" in detected.attrs else ""
    return mcpu, mtriple


def host_target(num_threads: int | None = None) -> Target:
    """The LLVM target of this machine: detected ``mcpu`` and ``num-cores``.

    ``num_threads`` overrides the core count (defaults to the cores this
    process may run on).
    """
    mcpu, mtriple = _host_cpu()
    spec: dict[str, Any] = {"kind": "llvm", "num-cores": int(num_threads or num_cores())}
    if mcpu:
        spec["mcpu"] = mcpu
    if mtriple:
        spec["mtriple"] = mtriple
    return Target(spec)


def _cli_to_dict(spec: str) -> dict[str, Any]:
    try:
        tokens = shlex.split(spec)
    except ValueError as err:
        raise TargetError(f"cannot parse target {spec!r}: {err}") from None
    if not tokens or tokens[0].startswith("-"):
        raise TargetError(f"target {spec!r} must start with a kind such as 'llvm'")
    out: dict[str, Any] = {"kind": tokens[0]}
    for tok in tokens[1:]:
        if not tok.startswith("-") or tok in ("-", "--"):
            raise TargetError(f"bad option {tok!r} in target {spec!r}: expected -key=value")
        body = tok.lstrip("-")
        if "=" not in body:
            if body in _FLAG_OPTIONS:
                out[body] = True
                continue
            raise TargetError(f"option {tok!r} in target {spec!r} needs a value (-key=value)")
        key, value = body.split("=", 1)
        if not key or not value:
            raise TargetError(f"bad option {tok!r} in target {spec!r}")
        if key in _LIST_OPTIONS:
            out[key] = [v for v in value.split(",") if v]
        elif key in _INT_OPTIONS:
            try:
                out[key] = int(value)
            except ValueError:
                raise TargetError(f"option -{key} in target {spec!r} needs an integer") from None
        else:
            out[key] = value
    return out


def parse_target(spec: str | dict | Target | None) -> Target:
    """Make a TVM target from a user spec.

    Accepts ``None``/``""``/``"host"``/``"native"`` (the host target), a kind
    name (``"llvm"``), the old CLI form (``"llvm -mcpu=znver2 -num-cores=2"``,
    translated to the dict form TVM 0.27 needs), a JSON object string, a dict,
    or a ``Target``.  Raises :class:`TargetError` (a ``ValueError``) with a readable message otherwise.
    """
    if isinstance(spec, Target):
        return spec
    if spec is None:
        return host_target()
    if isinstance(spec, dict):
        d = dict(spec)
    elif isinstance(spec, str):
        s = spec.strip()
        if s in ("", "host", "native"):
            return host_target()
        if s.startswith(("{", "[")):
            try:
                d = json.loads(s)
            except json.JSONDecodeError as err:
                raise TargetError(f"target {spec!r} is not valid JSON: {err}") from None
            if not isinstance(d, dict):
                raise TargetError(f"target JSON must be an object, got {type(d).__name__}")
        else:
            d = _cli_to_dict(s)
    else:
        raise TargetError(f"cannot make a target from {type(spec).__name__} {spec!r}")
    if "kind" not in d:
        raise TargetError(f"target {spec!r} has no 'kind'")
    _check_positive(d, spec)
    if d.get("mcpu") in ("native", "host"):
        mcpu, _ = _host_cpu()
        if mcpu:
            d["mcpu"] = mcpu
        else:
            d.pop("mcpu")
    try:
        target = Target(d)
    except Exception as err:  # TVM raises ValueError / TVMError subclasses
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TargetError(f"invalid target {spec!r}: {msg}") from None
    if d.get("kind") == "llvm" and "mcpu" in d:
        _check_mcpu(target, str(d["mcpu"]), spec)
    return target


def _check_mcpu(target: Target, mcpu: str, spec: Any) -> None:
    """TVM only warns on an unknown -mcpu; make it an error."""
    try:
        from tvm.target import codegen

        triple = str(target.attrs["mtriple"]) if "mtriple" in target.attrs else ""
        triple = triple or codegen.llvm_get_system_triple()
        ok = bool(codegen.llvm_is_valid_cpu(mcpu, triple))
    except Exception:  # LLVM query unavailable: trust the user
        return
    if not ok:
        raise TargetError(f"invalid target {spec!r}: LLVM does not know CPU {mcpu!r}")


def _check_positive(d: dict[str, Any], spec: Any) -> None:
    """TVM accepts ``-num-cores=0`` (and negative counts) and then builds a useless artifact: refuse them."""
    for key in _POSITIVE_OPTIONS & set(d):
        value = d[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise TargetError(f"target {spec!r}: -{key}={value!r} must be a positive integer (1 or more)")


def check_runnable(target: Target) -> None:
    """Refuse a target whose code kiln's runtime cannot load: it runs LLVM CPU code for this machine's
    architecture only (``kind=llvm``, no foreign ``mtriple``), and the library is linked by the host's
    toolchain, so any other target would fail late (raw compiler/linker output) or make a dead artifact."""
    from kiln.runtime.cpu import host_arch, target_arch

    kind = str(target.kind.name)
    host = host_arch()
    supported = f"kind 'llvm' for this machine's architecture ({host}), e.g. --target 'llvm -mcpu=...'"
    if kind != "llvm":
        raise TargetError(f"target kind {kind!r}: kiln's runtime loads only CPU code compiled by LLVM; "
                          f"supported: {supported}")
    arch = target_arch({"mtriple": str(_attr(target, "mtriple", "") or "")})
    if arch is not None and arch != host:
        raise TargetError(f"target mtriple {_attr(target, 'mtriple')!s} is for {arch}: kiln cannot cross-compile "
                          f"(the library is linked by this machine's toolchain) and its runtime loads only "
                          f"{host} code; supported: {supported}")


def _attr(target: Target, key: str, default: Any = None) -> Any:
    attrs = target.attrs
    return attrs[key] if key in attrs else default


def cpu_features(target: Target) -> set[str]:
    """LLVM's CPU features of the target (its mcpu or the host), with the target's ``mattr`` +/- applied;
    empty when LLVM cannot tell."""
    mattr = [str(a) for a in (_attr(target, "mattr", []) or [])]
    feats: set[str] = set()
    try:
        from tvm.target import codegen

        with target:
            feats = {str(k) for k in codegen.llvm_get_cpu_features(target)}
    except Exception:
        feats = set()
    for a in mattr:
        if a[:1] in "+-":
            (feats.add if a[0] == "+" else feats.discard)(a[1:])
    return feats


def vector_width_bits(target: Target | None = None) -> int:
    """Width in bits of the widest SIMD register the target has (256 default)."""
    target = target or host_target()
    mcpu = str(_attr(target, "mcpu", "") or "")
    feats = cpu_features(target)
    if feats:
        if "avx512f" in feats:
            return 512
        if "avx" in feats or "avx2" in feats:
            return 256
        if feats & {"sse2", "sse4.1", "sse4.2", "neon", "simd128", "altivec", "vsx"}:
            return 128
    for table, bits in ((_MCPU_512, 512), (_MCPU_256, 256), (_MCPU_128, 128)):
        if mcpu in table:
            return bits
    if mcpu.startswith(("cortex-", "neoverse", "apple-")):
        return 128
    return 256


def vector_lanes(target: Target | None = None, dtype: str = "float32") -> int:
    """Number of ``dtype`` elements in one SIMD register of the target."""
    bits = tvm.runtime.DataType(dtype).bits
    return max(1, vector_width_bits(target) // max(8, bits))


def target_summary(target: Target | str | dict | None = None) -> dict[str, Any]:
    """kind, mcpu, mtriple, num-cores, vector width (bits) and float32 lanes."""
    t = parse_target(target) if not isinstance(target, Target) else target
    bits = vector_width_bits(t)
    cores = _attr(t, "num-cores", None)
    return {
        "kind": str(t.kind.name),
        "mcpu": str(_attr(t, "mcpu", "") or "") or None,
        "mtriple": str(_attr(t, "mtriple", "") or "") or None,
        "num-cores": int(cores) if cores is not None else num_cores(),
        "vector-width": bits,
        "float32-lanes": bits // 32,
    }
