"""CPU features: which x86 ISA extensions an artifact's code needs, and which this CPU has.

Code compiled for ``mcpu=skylake-avx512`` (or ``-mattr=+avx512f``) dies with
SIGILL on a CPU without AVX-512; the runtime compares the two sets at load time
and refuses with a readable message instead.  Flags use the spelling of
``/proc/cpuinfo``.  The compiler records the full set in the manifest
(``cpu_features``, from LLVM's own view of ``mcpu`` + ``mattr``:
:func:`flags_of_llvm_features`); the runtime adds what the target's ``mcpu``
and ``mattr`` imply by the tables below, so an artifact whose manifest lacks
``cpu_features`` is still checked.
"""

from __future__ import annotations

import platform
from collections.abc import Iterable, Mapping
from functools import lru_cache
from typing import Any

__all__ = ["flags_of_llvm_features", "host_arch", "host_cpu_flags", "missing_cpu_features", "required_cpu_features",
           "target_arch"]

_V2 = ("cx16", "lahf_lm", "popcnt", "pni", "ssse3", "sse4_1", "sse4_2")
_AVX = _V2 + ("avx",)
_V3 = _AVX + ("avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe")
_AVX512 = ("avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl")
_V4 = _V3 + _AVX512
_ICELAKE = _V4 + ("avx512_vnni", "avx512ifma", "avx512vbmi", "avx512_vbmi2", "avx512_bitalg",
                  "avx512_vpopcntdq", "gfni", "vaes", "vpclmulqdq")
_ZEN = _V3 + ("sse4a",)
_ZEN3 = _ZEN + ("vaes", "vpclmulqdq")
_ZEN4 = _ZEN3 + _AVX512 + ("avx512_vnni", "avx512_bf16", "avx512ifma", "avx512vbmi",
                           "avx512_vbmi2", "avx512_bitalg", "avx512_vpopcntdq", "gfni")

# What LLVM enables for each -mcpu (llvm/lib/Target/X86/X86.td), limited to
# instruction-set extensions that generated code may use.
_MCPU_FEATURES: dict[str, tuple[str, ...]] = {
    "x86-64": (),
    "x86-64-v2": _V2,
    "nehalem": _V2,
    "westmere": _V2,
    "sandybridge": _AVX,
    "corei7-avx": _AVX,
    "ivybridge": _AVX + ("f16c",),
    "core-avx-i": _AVX + ("f16c",),
    "x86-64-v3": _V3,
    "haswell": _V3,
    "core-avx2": _V3,
    "broadwell": _V3,
    "skylake": _V3,
    "alderlake": _V3 + ("avx_vnni", "gfni", "vaes", "vpclmulqdq"),
    "raptorlake": _V3 + ("avx_vnni", "gfni", "vaes", "vpclmulqdq"),
    "meteorlake": _V3 + ("avx_vnni", "gfni", "vaes", "vpclmulqdq"),
    "x86-64-v4": _V4,
    "skylake-avx512": _V4,
    "cascadelake": _V4 + ("avx512_vnni",),
    "cooperlake": _V4 + ("avx512_vnni", "avx512_bf16"),
    "icelake-client": _ICELAKE,
    "icelake-server": _ICELAKE,
    "tigerlake": _ICELAKE,
    "sapphirerapids": _ICELAKE + ("avx512_bf16", "avx512_fp16", "avx_vnni",
                                  "amx_tile", "amx_int8", "amx_bf16"),
    "emeraldrapids": _ICELAKE + ("avx512_bf16", "avx512_fp16", "avx_vnni",
                                 "amx_tile", "amx_int8", "amx_bf16"),
    "znver1": _ZEN,
    "znver2": _ZEN,
    "znver3": _ZEN3,
    "znver4": _ZEN4,
    "znver5": _ZEN4 + ("avx_vnni",),
}

# LLVM's -mattr feature names -> /proc/cpuinfo flag names.
_MATTR_TO_FLAG = {
    "sse3": "pni", "ssse3": "ssse3", "sse4.1": "sse4_1", "sse4.2": "sse4_2", "sse4a": "sse4a",
    "popcnt": "popcnt", "cx16": "cx16", "sahf": "lahf_lm", "avx": "avx", "avx2": "avx2",
    "fma": "fma", "f16c": "f16c", "bmi": "bmi1", "bmi2": "bmi2", "lzcnt": "abm", "movbe": "movbe",
    "avx512f": "avx512f", "avx512cd": "avx512cd", "avx512bw": "avx512bw", "avx512dq": "avx512dq",
    "avx512vl": "avx512vl", "avx512vnni": "avx512_vnni", "avx512bf16": "avx512_bf16",
    "avx512fp16": "avx512_fp16", "avx512ifma": "avx512ifma", "avx512vbmi": "avx512vbmi",
    "avx512vbmi2": "avx512_vbmi2", "avx512bitalg": "avx512_bitalg",
    "avx512vpopcntdq": "avx512_vpopcntdq", "avxvnni": "avx_vnni", "gfni": "gfni", "vaes": "vaes",
    "vpclmulqdq": "vpclmulqdq", "amx-tile": "amx_tile", "amx-int8": "amx_int8",
    "amx-bf16": "amx_bf16", "amx-fp16": "amx_fp16", "fma4": "fma4", "xop": "xop", "tbm": "tbm",
    "aes": "aes", "pclmul": "pclmulqdq", "sha": "sha_ni", "adx": "adx", "avx512er": "avx512er",
    "avx512pf": "avx512pf", "avxifma": "avx_ifma", "avxvnniint8": "avx_vnni_int8",
    "avxneconvert": "avx_ne_convert", "avx512vp2intersect": "avx512_vp2intersect",
}

# What each flag implies (LLVM's feature implications, X86.td), closed transitively by _closure.
_IMPLIES: dict[str, tuple[str, ...]] = {
    "avx512f": ("avx2", "fma", "f16c"),
    "avx2": ("avx",), "fma": ("avx",), "f16c": ("avx",), "fma4": ("avx", "sse4a"), "xop": ("fma4",),
    "avx": ("sse4_2",), "sse4_2": ("sse4_1",), "sse4_1": ("ssse3",), "ssse3": ("pni",),
    "avx_vnni": ("avx2",), "avx_ifma": ("avx2",), "avx_vnni_int8": ("avx2",), "avx_ne_convert": ("avx2",),
    "vaes": ("avx", "aes"), "vpclmulqdq": ("avx", "pclmulqdq"),
    "amx_int8": ("amx_tile",), "amx_bf16": ("amx_tile",), "amx_fp16": ("amx_tile",),
}

_ARCH_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64", "i686": "x86", "i386": "x86"}


@lru_cache(maxsize=1)
def host_cpu_flags() -> frozenset[str]:
    """x86 flags of this CPU from /proc/cpuinfo; empty when unknown (the check is then skipped)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "flags":
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def _mattr_items(mattr: Any) -> list[str]:
    """``mattr`` as a list of "+feat"/"-feat" strings, from either its list or its comma form."""
    if mattr is None:
        return []
    if isinstance(mattr, str):
        return [m.strip() for m in mattr.split(",") if m.strip()]
    return [str(m).strip() for m in mattr]


def _closure(flags: Iterable[str]) -> set[str]:
    """``flags`` plus everything they imply (every avx512 extension implies avx512f, which implies avx2, ...)."""
    out: set[str] = set()
    todo = list(flags)
    while todo:
        flag = todo.pop()
        if flag in out:
            continue
        out.add(flag)
        todo.extend(_IMPLIES.get(flag, ()))
        if flag.startswith("avx512") and flag != "avx512f":
            todo.append("avx512f")
    return out


def required_cpu_features(target: Mapping[str, Any]) -> list[str]:
    """x86 flags (cpuinfo spelling) the code compiled for ``target`` may use; [] when unknown.

    ``mcpu``'s table entry, plus each ``+feature`` of ``mattr`` with what it implies,
    minus each ``-feature``; unknown names (LLVM tuning flags) are ignored.
    """
    if str(target.get("kind", "llvm")) != "llvm" or target_arch(target) not in (None, "x86_64"):
        return []
    flags = set(_MCPU_FEATURES.get(str(target.get("mcpu", "")).lower(), ()))
    for item in _mattr_items(target.get("mattr")):
        sign, name = (item[0], item[1:]) if item[:1] in "+-" else ("+", item)
        flag = _MATTR_TO_FLAG.get(name.lower())
        if flag is None:
            continue
        if sign == "+":
            flags |= _closure([flag])
        else:
            flags.discard(flag)
    return sorted(flags)


def flags_of_llvm_features(features: Iterable[str]) -> list[str]:
    """The cpuinfo flags of LLVM feature names (``tvm.target.codegen.llvm_get_cpu_features``), ISA ones only."""
    flags = {_MATTR_TO_FLAG[f.lstrip("+").lower()] for f in features if f.lstrip("+").lower() in _MATTR_TO_FLAG}
    return sorted(flags)


def missing_cpu_features(required: Iterable[str], host: Iterable[str] | None = None) -> list[str]:
    """Flags in ``required`` this CPU lacks; [] when the host's flags are unknown."""
    have = set(host_cpu_flags() if host is None else host)
    if not have:
        return []
    return [f for f in dict.fromkeys(required) if f not in have]


def _norm_arch(arch: str) -> str:
    arch = arch.lower()
    return _ARCH_ALIASES.get(arch, arch)


def host_arch() -> str:
    """This machine's architecture name, normalized (x86_64, aarch64, ...)."""
    return _norm_arch(platform.machine())


def target_arch(target: Mapping[str, Any]) -> str | None:
    """Architecture of a target's ``mtriple`` (e.g. x86_64), or None when it names none."""
    triple = str(target.get("mtriple") or "")
    return _norm_arch(triple.split("-", 1)[0]) if triple else None
