"""Size limits on what kiln reads, materializes and allocates, so a small hostile file cannot cost gigabytes.

Each limit has a default that real models stay far below, a Python parameter
(``Limits(...)`` passed as ``limits=`` to ``kiln.load`` / ``kiln.compile`` / ``lift``)
and a CLI flag; past a limit kiln raises :class:`LimitError` naming the limit,
its value, what came and the flag that raises it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import LimitError

__all__ = ["DEFAULT_LIMITS", "Limits", "check_limit"]

MiB = 1 << 20
GiB = 1 << 30


@dataclass(frozen=True)
class Limits:
    """Largest sizes kiln accepts; every field is in bytes except ``zip_ratio``."""

    member_bytes: int = 4 * GiB  # one inflated artifact member (weights.npz of a ~1B-parameter model)
    artifact_bytes: int = 16 * GiB  # all inflated members of one artifact together
    zip_ratio: int = 200  # inflated / stored bytes of a compressed member (zip bombs: >1000)
    constant_bytes: int = 1 * GiB  # one constant materialized at lift or codegen
    tensor_bytes: int = 16 * GiB  # one tensor a run reads (npy/npz input) or allocates

    FLAGS = {
        "member_bytes": "--max-member-mb", "artifact_bytes": "--max-artifact-mb",
        "zip_ratio": "--max-zip-ratio", "constant_bytes": "--max-constant-mb",
        "tensor_bytes": "--max-tensor-mb",
    }


DEFAULT_LIMITS = Limits()


def _human(n: int) -> str:
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.4g} {unit}"
    return f"{n} bytes"


def check_limit(limits: Limits, field: str, got: int, what: str) -> None:
    """Raise LimitError when ``got`` exceeds ``limits.<field>``; ``what`` names the thing measured."""
    limit = getattr(limits, field)
    if got <= limit:
        return
    shown = (lambda n: f"{n}x") if field == "zip_ratio" else _human
    raise LimitError(f"{what} is {shown(got)}, over the limit {field}={shown(limit)}; if this is "
                     f"expected, raise it with {Limits.FLAGS[field]} (CLI) or "
                     f"limits=Limits({field}=...) (Python)")
