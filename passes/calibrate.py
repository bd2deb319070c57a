"""Calibration data for post-training quantization: loading, seeded sampling, and the activations it produces.

A calibration set is a list of samples, each ``{graph input name: array}`` for
one batch the model would see, with an id per sample (the ``.npz`` file's stem,
or ``"file.npz:i"`` for row i of a stacked file).  Every data-driven rewrite
(insert-qdq, RepQ-ViT, SmoothQuant, GPTQ, AWQ) draws a seeded subset with
:func:`draw` and reads the tensors it needs through :func:`activations`; the
seed and the ids drawn go into the artifact manifest.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kiln.ir.graph import Graph
from kiln.ir.interpret import interpret

__all__ = ["CalibrationError", "CalibrationSet", "activations", "as_calibration", "calibration_for", "draw",
           "load_calibration", "synthetic_calibration"]


class CalibrationError(ValueError):
    """Calibration data that does not fit the model (missing input, wrong shape, empty set, unreadable file)."""


@dataclass(frozen=True)
class CalibrationSet:
    """Samples (``{input name: array}``) and their ids, in the same order."""

    samples: tuple[dict[str, np.ndarray], ...]
    ids: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.samples)


def _npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise CalibrationError(f"calibration file {str(path)!r} is not a readable .npz: {e}") from None


def load_calibration(path: str | os.PathLike) -> CalibrationSet:
    """A directory of ``.npz`` files, one sample each, or one ``.npz`` whose arrays have a leading sample axis."""
    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*.npz"))
        if not files:
            raise CalibrationError(f"calibration directory {str(p)!r} holds no .npz files")
        return CalibrationSet(tuple(_npz(f) for f in files), tuple(f.stem for f in files))
    if not p.is_file():
        raise CalibrationError(f"calibration data {str(p)!r} does not exist (expected a directory of .npz "
                               f"files or one .npz file)")
    arrays = _npz(p)
    if not arrays:
        raise CalibrationError(f"calibration file {str(p)!r} holds no arrays")
    counts = {k: (a.shape[0] if a.ndim else None) for k, a in arrays.items()}
    if len(set(counts.values())) != 1 or None in counts.values():
        raise CalibrationError(f"calibration file {str(p)!r}: every array needs the same leading sample axis; "
                               f"got {', '.join(f'{k}: {c}' for k, c in counts.items())}")
    n = next(iter(counts.values()))
    return CalibrationSet(tuple({k: a[i] for k, a in arrays.items()} for i in range(n)),
                          tuple(f"{p.name}:{i}" for i in range(n)))


def as_calibration(data: CalibrationSet | str | os.PathLike | Iterable[Mapping[str, np.ndarray]]) -> CalibrationSet:
    """A CalibrationSet from a set, a path (see :func:`load_calibration`) or an iterable of dicts (ids ``"0"``, ...)."""
    if isinstance(data, CalibrationSet):
        return data
    if isinstance(data, (str, os.PathLike)):
        return load_calibration(data)
    samples = tuple({k: np.asarray(v) for k, v in s.items()} for s in data)
    return CalibrationSet(samples, tuple(str(i) for i in range(len(samples))))


def draw(calib: CalibrationSet, n: int, seed: int) -> CalibrationSet:
    """A seeded sample of ``n`` samples without replacement (all of them when n <= 0 or n >= len), in set order."""
    if len(calib) == 0:
        raise CalibrationError("the calibration set is empty")
    if n <= 0 or n >= len(calib):
        return calib
    idx = np.sort(np.random.default_rng(seed).choice(len(calib), size=n, replace=False))
    return CalibrationSet(tuple(calib.samples[i] for i in idx), tuple(calib.ids[i] for i in idx))


def synthetic_calibration(graph: Graph, n: int, seed: int) -> CalibrationSet:
    """``n`` seeded random-input samples (``random_inputs``): for pipeline strings given no data, and the fuzzer."""
    from kiln.passes.manager import random_inputs

    return CalibrationSet(tuple(random_inputs(graph, seed + i) for i in range(max(n, 1))),
                          tuple(f"random:{seed + i}" for i in range(max(n, 1))))


def calibration_for(graph: Graph, path: str, samples: int, seed: int) -> CalibrationSet:
    """What a pass given the options ``calib=PATH,samples=N,seed=S`` calibrates on (synthetic when PATH is empty)."""
    if not path:
        return synthetic_calibration(graph, samples, seed)
    return draw(load_calibration(path), samples, seed)


def check_sample(graph: Graph, sample: Mapping[str, np.ndarray], sample_id: str) -> dict[str, np.ndarray]:
    """The sample's arrays for the graph's inputs, cast to their dtypes; a missing input is an error naming it."""
    missing = [v.name for v in graph.inputs if v.name not in sample]
    if missing:
        raise CalibrationError(f"calibration sample {sample_id!r} lacks input(s) {missing}; it has "
                               f"{sorted(sample)}")
    return {v.name: np.asarray(sample[v.name]).astype(v.type.np_dtype, copy=False) for v in graph.inputs}


def activations(graph: Graph, calib: CalibrationSet, values: Sequence[str], *,
                progress: Callable[[int, int], None] | None = None) -> Iterator[dict[str, np.ndarray]]:
    """For each sample, the arrays of ``values`` (graph value names) computed by the reference interpreter."""
    names = set(values)
    known = {v.name for v in graph.values()}
    unknown = sorted(names - known)
    if unknown:
        raise CalibrationError(f"cannot observe {unknown}: no such value in graph @{graph.name}")
    for i, (sample, sid) in enumerate(zip(calib.samples, calib.ids)):
        try:
            env = interpret(graph, check_sample(graph, sample, sid), keep_all=True)
        except ValueError as e:
            raise CalibrationError(f"calibration sample {sid!r} does not fit the model: {e}") from None
        if progress is not None:
            progress(i + 1, len(calib))
        yield {k: env[k] for k in names}
