"""Weighted cluster selection (Envoy's WeightedClusterUtil::pickCluster)."""

from __future__ import annotations

from ubimesh.proxy.routing.weighted import pick_weighted
from ubimesh.proxy.snapshot.types import WeightedClusterEntry


def entries(*weights: int) -> tuple[WeightedClusterEntry, ...]:
    return tuple(WeightedClusterEntry(f"c{i}", w) for i, w in enumerate(weights))


def picked(es: tuple[WeightedClusterEntry, ...], total: int, value: int) -> str | None:
    entry = pick_weighted(es, total, value)
    return None if entry is None else entry.name


def test_ranges_follow_the_entry_order() -> None:
    es = entries(1, 2, 3)
    assert [picked(es, 6, v) for v in range(6)] == ["c0", "c1", "c1", "c2", "c2", "c2"]


def test_random_value_is_taken_modulo_the_total() -> None:
    es = entries(1, 2, 3)
    assert picked(es, 6, 6) == "c0"
    assert picked(es, 6, 6 * 1000 + 3) == "c2"
    assert picked(es, 6, 2**64 - 1) == picked(es, 6, (2**64 - 1) % 6)


def test_zero_weight_entries_are_never_picked() -> None:
    es = entries(0, 5, 0, 5)
    names = {picked(es, 10, v) for v in range(10)}
    assert names == {"c1", "c3"}


def test_total_zero_means_the_sum_of_weights() -> None:
    es = entries(30, 70)
    assert picked(es, 0, 29) == "c0"
    assert picked(es, 0, 30) == "c1"


def test_nothing_to_pick() -> None:
    assert pick_weighted((), 0, 5) is None
    assert pick_weighted(entries(0, 0), 0, 5) is None


def test_total_larger_than_the_weights_falls_back_to_the_last_entry() -> None:
    es = entries(1, 1)
    assert picked(es, 10, 9) == "c1"
