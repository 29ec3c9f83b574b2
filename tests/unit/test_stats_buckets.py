"""Histogram bucketing: ``bucket_index`` is ``bisect.bisect_left`` for sorted bounds."""

from __future__ import annotations

import bisect
import math

import pytest

from ubimesh.telemetry.mesh_metrics import BYTES_BUCKETS
from ubimesh.telemetry.stats import DEFAULT_BUCKETS_MS, Histogram, bucket_index

EDGES = [-1.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 1024.0, 3600000.0, 3600000.5, 1e12, math.inf,
         -math.inf, math.nan]  # fmt: skip


@pytest.mark.parametrize("bounds", [DEFAULT_BUCKETS_MS, BYTES_BUCKETS, (), (5.0,), (1.0, 1.0, 2.0)])
def test_bucket_index_is_bisect_left(bounds: tuple[float, ...]) -> None:
    # Every bound, its neighbours and the odd values (NaN goes to the first bucket, as bisect).
    values = [*EDGES, *bounds, *(b + 0.5 for b in bounds), *(b - 0.5 for b in bounds)]
    for v in values:
        assert bucket_index(bounds, v) == bisect.bisect_left(bounds, v), v


def test_record_counts_a_sample_on_a_bound_in_that_bucket() -> None:
    h = Histogram((1, 10))
    for v in (0.5, 1.0, 1.5, 10.0, 11.0, math.inf):
        h.record(v)
    assert h.counts == [2, 2, 2]
    assert h.count == 6 and h.sum == math.inf


@pytest.mark.parametrize("bounds", [DEFAULT_BUCKETS_MS, BYTES_BUCKETS, (), (5.0,), (1.0, 1.0, 2.0)])
def test_record_after_record_lands_where_bisect_says(bounds: tuple[float, ...]) -> None:
    # record() reuses the previous sample's bucket when the value falls in its range: every
    # value after every other (repeats, neighbours, edges, NaN) must land as bisect says.
    values = [*EDGES, *bounds, *(b + 0.5 for b in bounds), *(b - 0.5 for b in bounds)]
    h = Histogram(bounds)
    want = [0] * (len(bounds) + 1)
    for before in values:
        for v in (before, before, *values):
            h.record(before)
            want[bisect.bisect_left(bounds, before)] += 1
            h.record(v)
            want[bisect.bisect_left(bounds, v)] += 1
    assert h.counts == want
