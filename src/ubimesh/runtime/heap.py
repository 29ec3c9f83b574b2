"""The serving process's heap settings: Python's garbage collector and glibc's malloc.

``tune_heap`` runs once a process's listeners are up (the proxy's main process and each
worker), before traffic:

* **The collector.** Configuration is long-lived: it is frozen out of the collector's
  generations, and the first generation is collected every 50,000 allocations instead of
  700, which trims p99 pauses on the request path.
* **malloc's thresholds** (``tune_malloc``). glibc serves a block of 128 KiB or more with its
  own ``mmap`` and unmaps it when freed, and it returns free memory at the top of the heap to
  the system once there is more than 128 KiB of it; both thresholds then adapt to the largest
  block freed. A proxy that makes and frees a buffer of a few hundred KiB at a steady pace
  (a span batch's JSON body is about 1 KiB a span, 256 spans a batch) pays page faults for
  every page of every such buffer, each time: 0.37 faults per request at 100 % trace
  sampling (bench/telemetry_cpu.py, the ``page faults/req`` column), about 2 % of that
  target's throughput (bench/README.md, session 10). Fixed thresholds (``MMAP_THRESHOLD``,
  ``TRIM_THRESHOLD``) keep such buffers in the heap and the heap's top in the process, at the
  price of holding at most ``TRIM_THRESHOLD`` of free memory after a peak. An operator's
  own setting (the ``MALLOC_*_`` environment variables or ``GLIBC_TUNABLES``) wins: nothing
  is changed then.
* **The start-up heap.** What start-up freed (parsing, the translator's result) is handed
  back to the system once (``malloc_trim``), glibc keeping it otherwise.

Without glibc (musl, macOS) the malloc steps do nothing.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import logging
import os
from collections.abc import Mapping
from typing import Final

log = logging.getLogger("ubimesh.runtime")

#: mallopt's parameter numbers (glibc's malloc.h).
M_TRIM_THRESHOLD: Final = -1
M_MMAP_THRESHOLD: Final = -3
#: Blocks this large or larger get their own mapping: above a span batch's body (256 KiB to
#: 512 KiB for OTLP) and a listener's largest read buffers.
MMAP_THRESHOLD: Final = 1 << 20
#: The free memory at the heap's top that is kept before the top is returned to the system:
#: room for a few such blocks freed at once (the body, its bytes and the write's copy).
TRIM_THRESHOLD: Final = 8 << 20
#: Environment variables by which an operator sets malloc's thresholds themselves.
OPERATOR_SETTINGS: Final = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
OPERATOR_TUNABLES: Final = ("glibc.malloc.mmap_threshold", "glibc.malloc.trim_threshold")


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None  # not glibc


def tune_malloc(env: Mapping[str, str] = os.environ) -> bool:
    """Fix glibc malloc's mmap and trim thresholds (module docstring). Returns whether they
    were set: False without glibc or when ``env`` carries the operator's own setting."""
    tunables = env.get("GLIBC_TUNABLES", "")
    if any(name in env for name in OPERATOR_SETTINGS) or any(
        name in tunables for name in OPERATOR_TUNABLES
    ):
        return False
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    # mallopt returns 1 on success, 0 for a value it refuses.
    if (
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1
        or mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) != 1
    ):
        log.warning("malloc refused the mmap or trim threshold; its defaults stay")
        return False
    return True


def tune_heap() -> None:
    """The collector's settings, malloc's thresholds and the start-up heap returned (module
    docstring). Called once per serving process, after start-up."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)
    tune_malloc()
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None)
    if trim is not None:
        trim(0)
