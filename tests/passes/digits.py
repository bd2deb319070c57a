"""A small BatchNorm CNN trained on sklearn's bundled 8x8 digits (offline, fully seeded), exported with kiln.

``digits_case()`` trains it once per process (about a second on one thread)
and returns the float kiln graph, a calibration set drawn from the training
split and the held-out split (360 images) with its labels.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from kiln.ir.graph import Graph

TRAIN_SEED = 0
HELD_OUT = 360
CALIB_BATCHES = 16
CALIB_BATCH = 8


@dataclass(frozen=True)
class DigitsCase:
    """The float model, its calibration batches (from the training split) and the held-out split."""

    graph: Graph
    calibration: list[dict[str, np.ndarray]]
    test_x: np.ndarray
    test_y: np.ndarray
    torch_accuracy: float


def _split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)[:, None]
    y = data.target.astype(np.int64)
    order = np.random.default_rng(TRAIN_SEED).permutation(len(y))
    test, train = order[:HELD_OUT], order[HELD_OUT:]
    return x[train], y[train], x[test], y[test]


def _net():
    import torch
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * 4 * 4, 10),
    ).to(torch.float32)


def _train(x: np.ndarray, y: np.ndarray, epochs: int = 8):
    import torch

    torch.manual_seed(TRAIN_SEED)
    net = _net()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(TRAIN_SEED)
    net.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(yt), generator=gen).split(64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(xt[idx]), yt[idx]).backward()
            opt.step()
    return net.eval()


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy in percent."""
    return float(np.mean(np.argmax(logits, axis=1) == labels) * 100.0)


@functools.cache
def digits_case() -> DigitsCase:
    """Train (seeded, one thread), export with a symbolic batch, lift; calibration from the training split."""
    import torch

    from kiln import frontend

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x_tr, y_tr, x_te, y_te = _split()
        net = _train(x_tr, y_tr)
        with torch.no_grad():
            torch_acc = accuracy(net(torch.from_numpy(x_te)).numpy(), y_te)
        proto = frontend.export(net, (torch.from_numpy(x_tr[:2]),), input_names=["image"], output_names=["logits"],
                                dynamic_shapes=[{0: torch.export.Dim("N")}])
    finally:
        torch.set_num_threads(threads)
    rng = np.random.default_rng(TRAIN_SEED + 1)
    picks = rng.choice(len(x_tr), size=(CALIB_BATCHES, CALIB_BATCH), replace=False)
    calib = [{"image": x_tr[p]} for p in picks]
    return DigitsCase(frontend.lift(proto), calib, x_te, y_te, torch_acc)
