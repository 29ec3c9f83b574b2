"""CPU-bound work shared with one forked child: ``share`` (the policy questions' file reading
and listener compiling; docs/policy.md section 4).

The items are numbered; both processes take the next number from a pipe holding them all (a
one-byte read from a pipe is atomic: each number goes to one process), so the work splits by
how much each process could do, whatever the other work on the machine or the caller's own
``meanwhile`` (run by this process while the child has already started). The child sends its
results back pickled and exits. Whatever the child did not deliver (it failed, or was killed
after taking far longer than this process) this process does itself, so a failure is raised
here, by the same code, with its own message; when items fail, the error raised is the one
doing them in order raises (the first failing item's). Without ``fork``, on one CPU, or from a
threaded process (a child forked while another thread holds a lock, of logging or of the
import system, could wait on it forever), everything runs here.
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

T = TypeVar("T")

#: The most items one call shares (each is one byte in the pipe).
MAX_ITEMS = 255
#: How long the child may still take after this process is done with its own items, at the
#: least (else three times what this process took): then it is killed, and this process
#: does what it had taken.
CHILD_GRACE_S = 5.0


def can_fork() -> bool:
    """Whether sharing work with a forked child can pay and is safe: ``fork`` exists, there
    is more than one CPU, and this process runs a single thread."""
    return hasattr(os, "fork") and (os.cpu_count() or 1) > 1 and threading.active_count() == 1


def share(
    count: int, work: Callable[[int], T], meanwhile: Callable[[], object] | None = None
) -> dict[int, T]:
    """``{i: work(i)}`` for ``i`` in ``range(count)`` (at most ``MAX_ITEMS``), some of them
    done by a forked child when ``can_fork()``; ``meanwhile`` is called once, by this process,
    before it takes items. ``work`` must be deterministic, its results picklable, and anything
    it leaves behind in this process (caches) must not be needed for the items the child
    did."""
    if count > MAX_ITEMS:
        raise ValueError(f"share: {count} items, at most {MAX_ITEMS}")
    if count < 2 or not can_fork():
        if meanwhile is not None:
            meanwhile()
        return {i: work(i) for i in range(count)}
    tokens, write_tokens = os.pipe()
    os.write(write_tokens, bytes(range(count)))  # at most 255 bytes: never blocks
    os.close(write_tokens)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its items, pickled into the pipe, then gone
        code = 1
        try:
            os.close(read_fd)
            theirs = {i: work(i) for i in _claim(tokens)}
            with os.fdopen(write_fd, "wb") as out:
                pickle.dump(theirs, out, protocol=pickle.HIGHEST_PROTOCOL)
            code = 0
        finally:
            os._exit(code)  # never run the parent's cleanup (atexit, buffered output)
    os.close(write_fd)
    data = None
    done: dict[int, T] = {}
    failed: tuple[int, Exception] | None = None
    try:
        if meanwhile is not None:
            meanwhile()
        started = time.monotonic()
        for i in _claim(tokens):
            try:
                done[i] = work(i)
            except Exception as exc:
                failed = (i, exc)
                break
        else:
            # The child is at most on its last item by now; if it takes far longer than
            # this process took for all of its own, something is wrong with it.
            data = read_all(read_fd, max(CHILD_GRACE_S, 3 * (time.monotonic() - started)))
    finally:
        os.close(tokens)
        os.close(read_fd)
        if data is None:
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
    if failed is not None:
        # Raise what doing the items in order would: the first of them that fails.
        for i in range(failed[0]):
            if i not in done:
                work(i)
        raise failed[1]
    if data and os.waitstatus_to_exitcode(status) == 0:
        done.update(pickle.loads(data))
    for i in range(count):  # what the child did not deliver
        if i not in done:
            done[i] = work(i)
    return done


def _claim(tokens: int) -> Iterator[int]:
    """The items this process takes, one at a time, until the pipe is empty."""
    while True:
        token = os.read(tokens, 1)
        if not token:
            return
        yield token[0]


def read_all(fd: int, timeout: float) -> bytes | None:
    """Everything from ``fd`` until EOF, or None when that takes longer than ``timeout``."""
    deadline = time.monotonic() + timeout
    chunks: list[bytes] = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return None
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
