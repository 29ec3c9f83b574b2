"""runtime/heap.py: with malloc's thresholds fixed, a buffer of a few hundred KiB made and
freed again and again (a span batch's body) costs no page faults; an operator's own malloc
setting is left alone. Each case runs in a fresh interpreter: the settings are per process."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc", reason="the thresholds are glibc malloc's"
)

#: A span batch's body as the Python encoder made it before the C writer: 256 pieces of 1 KB
#: joined, then encoded (256 KiB twice, made and freed). Prints the minor page faults of 200
#: such bodies, after 5 to warm the heap up.
_BODIES = """
import resource, sys
from ubimesh.runtime.heap import tune_malloc
print(tune_malloc())
parts = ["x" * 1000 for _ in range(256)]
for _ in range(5):
    body = "".join(parts).encode()
    del body
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(200):
    text = "".join(parts)
    body = text.encode()
    del text, body
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

_CLEAN_ENV = {
    k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"
}


def _bodies(env: dict[str, str]) -> tuple[str, int]:
    done = subprocess.run(
        [sys.executable, "-c", _BODIES], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    tuned, faults = done.stdout.split()
    return tuned, int(faults)


def test_fixed_thresholds_keep_freed_bodies_in_the_heap() -> None:
    tuned, faults = _bodies(_CLEAN_ENV)
    assert tuned == "True"
    # Untuned, each body's pages fault again (about 90 a body, 18,000 in all: the next test).
    assert faults < 200


def test_an_operators_setting_wins() -> None:
    # The same loop with the operator's own (default-sized) trim threshold: not tuned, and the
    # bodies fault, which is also what shows the first test's figure is the tuning's doing.
    tuned, faults = _bodies({**_CLEAN_ENV, "MALLOC_TRIM_THRESHOLD_": "131072"})
    assert tuned == "False"
    assert faults > 5_000


@pytest.mark.parametrize(
    "env",
    [
        {"MALLOC_MMAP_THRESHOLD_": "65536"},
        {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1048576"},
        {"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0:glibc.malloc.mmap_threshold=65536"},
    ],
)
def test_operator_settings_are_recognised(env: dict[str, str]) -> None:
    from ubimesh.runtime.heap import tune_malloc

    # Refused before any call into libc, so this process's malloc is not touched.
    assert tune_malloc(env) is False


def test_other_tunables_do_not_count_as_a_threshold_setting() -> None:
    tuned, _ = _bodies({**_CLEAN_ENV, "GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"})
    assert tuned == "True"
