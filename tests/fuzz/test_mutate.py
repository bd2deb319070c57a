"""fuzz/mutate.py: graph mutators give new verified graphs; pipeline mutators give pipelines that parse."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kiln.fuzz.generate import PATTERN_KINDS, generate_graph, pattern_graph
from kiln.fuzz.mutate import (
    GRAPH_MUTATORS,
    PASS_POOL,
    MutationFailed,
    crossover_graphs,
    crossover_pipelines,
    mutate_graph,
    mutate_pipeline,
    random_pipeline,
)
from kiln.ir.graph import Graph, structurally_equal
from kiln.ir.text import parse, print_graph
from kiln.ir.verify import verify
from kiln.passes.manager import parse_pipeline, registered_passes


def _subject(seed: int) -> Graph:
    rng = np.random.default_rng(10_000 + seed)
    if seed % 3 == 0:
        return pattern_graph(PATTERN_KINDS[seed // 3 % len(PATTERN_KINDS)], rng)
    return generate_graph(rng)


def _check(g: Graph) -> None:
    verify(g)
    assert structurally_equal(parse(print_graph(g)), g) is None


@pytest.mark.parametrize("name", sorted(GRAPH_MUTATORS))
def test_graph_mutator_gives_new_verified_graphs(name):
    ok = 0
    for seed in range(50):
        g = _subject(seed)
        before = print_graph(g)
        try:
            h = GRAPH_MUTATORS[name](g, np.random.default_rng(seed))
        except MutationFailed:
            continue
        _check(h)
        assert print_graph(h) != before, (name, seed)
        assert print_graph(g) == before, "the input graph must not change"
        ok += 1
    assert ok >= 25, (name, ok)


def test_crossover_graphs_splices_b_into_a():
    ok = 0
    for seed in range(80):
        rng = np.random.default_rng(seed)
        a, b = _subject(seed), _subject(seed + 1)
        try:
            h = crossover_graphs(a, b, rng)
        except MutationFailed:
            continue
        _check(h)
        assert len(h.nodes) > len(a.nodes) or print_graph(h) != print_graph(a)
        ok += 1
    assert ok >= 15  # measured: 25 of 80 (a needs a value of b's slice's dtype and rank)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2 ** 32 - 1))
def test_mutate_graph_verifies_and_round_trips(seed):
    rng = np.random.default_rng(seed)
    g = _subject(seed % 30)
    h, name = mutate_graph(g, rng)
    assert name in GRAPH_MUTATORS
    _check(h)
    h2, _ = mutate_graph(h, rng)
    _check(h2)


def test_pass_pool_covers_every_pass_and_option():
    names = {p.split("{")[0] for p in PASS_POOL}
    product = {n for n, c in registered_passes().items() if c.__module__.startswith("kiln.passes")}
    assert product <= names <= set(registered_passes())  # other tests may register passes of their own
    assert "fold-conv-bn{mode=tune}" in PASS_POOL
    assert "ln-to-rmsnorm{untie=true}" in PASS_POOL
    assert "fuse-blocks{max_ops=1}" in PASS_POOL
    for p in PASS_POOL:
        parse_pipeline(p)


def test_pipeline_mutators_always_parse():
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(300):
        a = random_pipeline(rng)
        b = random_pipeline(rng, max_len=4)
        assert 1 <= len(a) <= 6
        m, name = mutate_pipeline(a, rng)
        seen.add(name)
        c = crossover_pipelines(a, b, rng)
        for p in (a, b, m, c):
            assert 1 <= len(p) <= 10
            assert len(parse_pipeline(",".join(p))) == len(p)
        assert m != a
    assert seen == {"add-pass", "drop-pass", "swap-passes", "move-pass", "reparam-pass", "replace-pass"}


def test_mutate_pipeline_keeps_length_bounds():
    rng = np.random.default_rng(1)
    p = ["dce"]
    for _ in range(200):
        p, _ = mutate_pipeline(p, rng)
        assert 1 <= len(p) <= 10
        parse_pipeline(",".join(p))
