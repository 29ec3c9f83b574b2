"""Weighted cluster selection (Envoy's ``WeightedClusterUtil::pickCluster``).

Envoy draws a random number, takes it modulo the total weight, and walks the entries adding up
their weights until the running sum passes the drawn value: entry *i* is picked for values in
``[w0 + ... + w(i-1), w0 + ... + wi)``, so each entry gets ``weight / total`` of the requests and
a zero-weight entry is never picked.
"""

from __future__ import annotations

from collections.abc import Sequence

from ubimesh.proxy.snapshot.types import WeightedClusterEntry


def pick_weighted(
    entries: Sequence[WeightedClusterEntry], total_weight: int, random_value: int
) -> WeightedClusterEntry | None:
    """The entry for ``random_value`` (any non-negative integer: it is taken modulo the total
    weight, so ``random.getrandbits(64)`` and ``random.randrange(total_weight)`` both work).
    ``total_weight`` 0 means "the sum of the entries' weights" (Envoy deprecated the field and
    sums the weights). None when there is nothing to pick (no entry, or all weights 0)."""
    if total_weight <= 0:
        total_weight = sum(e.weight for e in entries)
        if total_weight <= 0:
            return None
    selected = random_value % total_weight
    end = 0
    for entry in entries:
        end += entry.weight
        if selected < end:
            return entry
    # total_weight larger than the sum of the weights (an inconsistent config): Envoy returns
    # the last entry in that case.
    return entries[-1] if entries else None
