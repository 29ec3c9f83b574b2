"""Load balancers over one set of hosts (one priority level, healthy or degraded hosts).

Each picker is built once per host set (``UpstreamCluster.refresh`` rebuilds them when hosts or
their health change) and then answers ``pick(hash_key)`` on the hot path. Semantics follow
Envoy's (docs: intro/arch_overview/upstream/load_balancing/load_balancers):

* ROUND_ROBIN: equal weights rotate through the hosts; unequal weights follow Envoy's earliest
  deadline first (EDF) schedule, where a host of weight ``w`` is due every ``1/w``. One period of
  that schedule is precomputed (``sum(w)/gcd(w)`` entries), so a pick is one C-level
  ``next()``; periods longer than ``MAX_SCHEDULE`` fall back to a live EDF heap. Both start at a
  random point so that many proxies do not hit the same host in lockstep.
* LEAST_REQUEST: equal weights use the power of ``choice_count`` choices (sample with
  replacement, keep the host with the fewest ``active_requests``); unequal weights use EDF with
  the dynamic weight ``weight / (active_requests + 1) ** bias`` (bias 1.0, Envoy's default),
  evaluated when a host is re-queued.
* RANDOM: a uniformly random host; like Envoy, weights are ignored.
* RING_HASH: Envoy's ketama ring. Every host gets ``scale * weight / total`` points, where
  ``scale`` gives the lightest host a whole number of points on a ring of at least
  ``minimum_ring_size`` and is capped at ``maximum_ring_size``; the points are
  ``xxh64("<address>_<i>")``. A key maps to the first point at or after it (wrapping), found by
  bisection. Without a hash key a random one is used, as Envoy does.
* MAGLEV: Envoy's weighted Maglev table of 65537 entries, indexed by ``hash % size``.

Locality weights are not used for picking (locality weighted LB is not supported yet).
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from bisect import bisect_left
from collections.abc import Callable, Sequence
from functools import reduce
from typing import Protocol

from ubimesh.proxy.snapshot.types import Cluster, LbPolicy
from ubimesh.proxy.upstream.hashing import xxh64
from ubimesh.proxy.upstream.host import Host

MASK64 = 0xFFFFFFFFFFFFFFFF
#: Longest weighted round robin period that is precomputed (one list entry per pick).
MAX_SCHEDULE = 1 << 16
MAGLEV_TABLE_SIZE = 65537
#: Envoy's default active_request_bias for weighted least request.
ACTIVE_REQUEST_BIAS = 1.0


class Picker(Protocol):
    """Chooses one host of a fixed, non-empty host set.

    ``fast`` is a zero-argument equivalent of ``pick`` for policies that ignore hash keys
    (None for RING_HASH and MAGLEV); the cluster calls it directly on its hot path.
    """

    @property
    def fast(self) -> Callable[[], Host] | None: ...

    def pick(self, hash_key: int | None) -> Host: ...


def _weights_equal(hosts: Sequence[Host]) -> bool:
    w = hosts[0].weight
    return all(h.weight == w for h in hosts)


def edf_schedule(hosts: Sequence[Host], limit: int = MAX_SCHEDULE) -> list[Host] | None:
    """One period of the EDF weighted round robin order, or None if longer than ``limit``.

    Runs Envoy's EDF scheduler for one period: a host of weight ``w`` is due ``1/w`` after its
    previous pick, the earliest deadline is picked, and equal deadlines go to the entry queued
    first. Deadlines are kept as exact integers (in units of ``1/lcm(weights)``), and weights
    are divided by their gcd first, so the period (``sum(w)/gcd``) is as short as possible and
    each host appears exactly ``w/gcd`` times in it.
    """
    weights = [max(1, h.weight) for h in hosts]
    g = reduce(math.gcd, weights)
    reduced = [w // g for w in weights]
    period = sum(reduced)
    if period > limit:
        return None
    unit = reduce(math.lcm, reduced)
    steps = [unit // w for w in reduced]
    heap = [(steps[i], i, i) for i in range(len(reduced))]
    heapq.heapify(heap)
    seq = len(heap)
    out: list[Host] = []
    for _ in range(period):
        deadline, _, idx = heap[0]
        out.append(hosts[idx])
        heapq.heapreplace(heap, (deadline + steps[idx], seq, idx))
        seq += 1
    return out


class RoundRobinPicker:
    """Round robin (weighted by EDF when weights differ) over a precomputed schedule."""

    __slots__ = ("_next", "fast", "schedule")

    def __init__(self, hosts: Sequence[Host], rng: random.Random) -> None:
        schedule = list(hosts) if _weights_equal(hosts) else edf_schedule(hosts)
        if schedule is None:
            edf = EdfPicker(hosts, _static_weight, rng)
            self.schedule: list[Host] = []
            self._next: Callable[[], Host] = edf.next_host
            self.fast: Callable[[], Host] | None = self._next
            return
        start = int(rng.random() * len(schedule))
        schedule = schedule[start:] + schedule[:start]
        self.schedule = schedule
        self._next = itertools.cycle(schedule).__next__
        self.fast = self._next

    def pick(self, hash_key: int | None) -> Host:
        return self._next()


def _static_weight(host: Host) -> float:
    return float(max(1, host.weight))


def _least_request_weight(host: Host) -> float:
    # weight / (active_requests + 1) ** bias, with bias 1.0.
    return max(1, host.weight) / (host.active_requests + 1)


class EdfPicker:
    """Live earliest-deadline-first scheduler (Envoy's ``EdfScheduler``).

    A host's next deadline is its last one plus ``1 / weight(host)``, with ``weight`` evaluated
    when the host is re-queued (right after it is picked), which is what makes weighted least
    request react to ``active_requests``.
    """

    __slots__ = ("_heap", "_hosts", "_seq", "_weight", "fast")

    def __init__(
        self, hosts: Sequence[Host], weight: Callable[[Host], float], rng: random.Random
    ) -> None:
        self._hosts = list(hosts)
        self._weight = weight
        self._heap = [(1.0 / weight(h), i, i) for i, h in enumerate(self._hosts)]
        heapq.heapify(self._heap)
        self._seq = len(self._hosts)
        self.fast: Callable[[], Host] | None = self.next_host
        # Start at a random point of the schedule, as Envoy does, so proxies do not synchronize.
        for _ in range(int(rng.random() * len(self._hosts))):
            self.next_host()

    def next_host(self) -> Host:
        heap = self._heap
        deadline, _, idx = heap[0]
        host = self._hosts[idx]
        self._seq += 1
        heapq.heapreplace(heap, (deadline + 1.0 / self._weight(host), self._seq, idx))
        return host

    def pick(self, hash_key: int | None) -> Host:
        return self.next_host()


class P2CPicker:
    """Least request with equal weights: best of ``choice_count`` random hosts (with
    replacement, as Envoy samples)."""

    __slots__ = ("_extra", "_hosts", "_n", "_nn", "_random", "fast")

    def __init__(self, hosts: Sequence[Host], choice_count: int, rng: random.Random) -> None:
        self._hosts = list(hosts)
        self._n = len(self._hosts)
        self._nn = self._n * self._n
        self._extra = max(1, choice_count) - 1
        self._random = rng.random
        if self._extra == 1 and self._nn <= 1 << 40:
            # One random draw gives both samples (53 random bits cover n*n outcomes evenly).
            self.fast: Callable[[], Host] | None = self._two
        else:
            self.fast = self.next_host

    def pick(self, hash_key: int | None) -> Host:
        return self.next_host()

    def _two(self) -> Host:
        i, j = divmod(int(self._random() * self._nn), self._n)
        hosts = self._hosts
        a = hosts[i]
        b = hosts[j]
        return b if b.active_requests < a.active_requests else a

    def next_host(self) -> Host:
        hosts = self._hosts
        n = self._n
        rnd = self._random
        best = hosts[int(rnd() * n)]
        for _ in range(self._extra):
            other = hosts[int(rnd() * n)]
            if other.active_requests < best.active_requests:
                best = other
        return best


class RandomPicker:
    __slots__ = ("_hosts", "_n", "_random", "fast")

    def __init__(self, hosts: Sequence[Host], rng: random.Random) -> None:
        self._hosts = list(hosts)
        self._n = len(self._hosts)
        self._random = rng.random
        self.fast: Callable[[], Host] | None = self.next_host

    def pick(self, hash_key: int | None) -> Host:
        return self._hosts[int(self._random() * self._n)]

    def next_host(self) -> Host:
        return self._hosts[int(self._random() * self._n)]


class SinglePicker:
    """A host set of one host: every policy picks it."""

    __slots__ = ("_host", "fast")

    def __init__(self, host: Host) -> None:
        self._host = host
        self.fast: Callable[[], Host] | None = itertools.repeat(host).__next__

    def pick(self, hash_key: int | None) -> Host:
        return self._host


def hash_key_for(host: Host) -> bytes:
    """The string a host is hashed by on a ring or Maglev table (its address, as in Envoy)."""
    return str(host.address).encode()


class RingHashPicker:
    """Envoy's ring hash (ketama) over xxHash64."""

    __slots__ = ("_getrandbits", "_n", "hashes", "ring_hosts")
    fast: Callable[[], Host] | None = None

    def __init__(
        self, hosts: Sequence[Host], min_size: int, max_size: int, rng: random.Random
    ) -> None:
        weights = [max(1, h.weight) for h in hosts]
        total = sum(weights)
        normalized = [w / total for w in weights]
        min_weight = min(normalized)
        scale = min(math.ceil(min_weight * min_size) / min_weight, float(max_size))
        entries: list[tuple[int, int]] = []
        current = 0.0
        target = 0.0
        for idx, host in enumerate(hosts):
            prefix = hash_key_for(host) + b"_"
            target += scale * normalized[idx]
            i = 0
            while current < target:
                entries.append((xxh64(prefix + str(i).encode()), idx))
                i += 1
                current += 1.0
        entries.sort()
        self.hashes = [h for h, _ in entries]
        self.ring_hosts = [hosts[idx] for _, idx in entries]
        self._n = len(entries)
        self._getrandbits = rng.getrandbits

    def pick(self, hash_key: int | None) -> Host:
        h = self._getrandbits(64) if hash_key is None else hash_key & MASK64
        i = bisect_left(self.hashes, h)
        return self.ring_hosts[i if i < self._n else 0]


class MaglevPicker:
    """Envoy's weighted Maglev: a fixed-size table filled by per-host permutations."""

    __slots__ = ("_getrandbits", "_size", "table")
    fast: Callable[[], Host] | None = None

    def __init__(
        self, hosts: Sequence[Host], rng: random.Random, table_size: int = MAGLEV_TABLE_SIZE
    ) -> None:
        n = len(hosts)
        keys = [hash_key_for(h) for h in hosts]
        offsets = [xxh64(k, 0) % table_size for k in keys]
        skips = [xxh64(k, 1) % (table_size - 1) + 1 for k in keys]
        max_weight = max(max(1, h.weight) for h in hosts)
        weights = [max(1, h.weight) / max_weight for h in hosts]
        targets = [0.0] * n
        nexts = [0] * n
        slots = [-1] * table_size
        filled = 0
        iteration = 1
        while filled < table_size:
            for i in range(n):
                if iteration * weights[i] < targets[i]:
                    continue
                targets[i] += 1.0
                off = offsets[i]
                skip = skips[i]
                nxt = nexts[i]
                c = (off + skip * nxt) % table_size
                while slots[c] >= 0:
                    nxt += 1
                    c = (off + skip * nxt) % table_size
                slots[c] = i
                nexts[i] = nxt + 1
                filled += 1
                if filled == table_size:
                    break
            iteration += 1
        self.table = [hosts[i] for i in slots]
        self._size = table_size
        self._getrandbits = rng.getrandbits

    def pick(self, hash_key: int | None) -> Host:
        h = self._getrandbits(64) if hash_key is None else hash_key & MASK64
        return self.table[h % self._size]


def build_picker(spec: Cluster, hosts: Sequence[Host], rng: random.Random) -> Picker | None:
    """The picker of ``spec.lb_policy`` over ``hosts`` (None when there is no host)."""
    if not hosts:
        return None
    policy = spec.lb_policy
    if len(hosts) == 1:
        return SinglePicker(hosts[0])
    if policy is LbPolicy.ROUND_ROBIN:
        return RoundRobinPicker(hosts, rng)
    if policy is LbPolicy.LEAST_REQUEST:
        if _weights_equal(hosts):
            return P2CPicker(hosts, spec.least_request.choice_count, rng)
        return EdfPicker(hosts, _least_request_weight, rng)
    if policy is LbPolicy.RANDOM:
        return RandomPicker(hosts, rng)
    if policy is LbPolicy.RING_HASH:
        rh = spec.ring_hash
        return RingHashPicker(hosts, rh.minimum_ring_size, rh.maximum_ring_size, rng)
    if policy is LbPolicy.MAGLEV:
        return MaglevPicker(hosts, rng)
    raise ValueError(f"unsupported lb_policy {policy}")
