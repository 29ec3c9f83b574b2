"""Worker processes and their control channel (ubimesh.runtime.workers), with real forks.

Each test forks a worker whose child runs ``serve_control`` with the small handler below under
``asyncio.run``; the test process talks to it through ``WorkerHandle.call`` on one event loop.
Every wait is bounded, and every forked process is killed and reaped by the fixture.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest

from ubimesh.runtime.workers import WorkerHandle, fork_worker, serve_control

BOUND = 10.0  # no single wait in this module may exceed this


async def handler(command: str, payload: Any) -> Any:
    if command == "echo":
        return payload
    if command == "pid":
        return os.getpid()
    if command == "fail":
        raise ValueError(payload)
    if command == "sleep":
        await asyncio.sleep(payload)
        return f"slept {payload}"
    if command == "exit":
        os._exit(payload)
    raise KeyError(command)


def serve(index: int, sock: socket.socket) -> int:
    """The child: answer commands until the main process closes the channel."""
    asyncio.run(serve_control(sock, handler))
    return 0


def wait_exit(pid: int, timeout: float = BOUND) -> int | None:
    """The exit status of child ``pid`` (reaping it), or None if it is still running."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return None
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            return None
        time.sleep(0.01)


@pytest.fixture
def spawn() -> Iterator[Callable[..., WorkerHandle]]:
    handles: list[WorkerHandle] = []

    def start(index: int = 0, child: Callable[[int, socket.socket], int] = serve) -> WorkerHandle:
        handle = fork_worker(index, child)
        handles.append(handle)
        return handle

    yield start
    for h in handles:
        h.sock.close()
        try:
            os.kill(h.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            os.waitpid(h.pid, 0)  # SIGKILL cannot be ignored: this returns promptly
        except ChildProcessError:
            pass


def run(coro: Awaitable[Any]) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(coro, BOUND)

    return asyncio.run(bounded())


# -- calls ---------------------------------------------------------------------------------------


def test_call_returns_the_handlers_result(spawn: Callable[..., WorkerHandle]) -> None:
    w = spawn(3)
    assert w.index == 3
    assert w.pid != os.getpid()
    payloads: list[Any] = [None, 0, "text", b"\x00\xff", {"k": [1, 2.5, (3, "x")]}, b"z" * 2**20]

    async def scenario() -> list[Any]:
        return [await w.call("echo", p) for p in payloads]

    assert run(scenario()) == payloads


def test_the_command_runs_in_the_worker(spawn: Callable[..., WorkerHandle]) -> None:
    w = spawn()
    assert run(w.call("pid")) == w.pid


def test_concurrent_calls_each_get_their_own_answer(spawn: Callable[..., WorkerHandle]) -> None:
    w = spawn()

    async def scenario() -> list[Any]:
        return await asyncio.gather(*(w.call("echo", i) for i in range(50)))

    assert run(scenario()) == list(range(50))


def test_two_workers_are_independent(spawn: Callable[..., WorkerHandle]) -> None:
    a, b = spawn(0), spawn(1)

    async def scenario() -> list[Any]:
        return await asyncio.gather(a.call("pid"), b.call("pid"))

    assert run(scenario()) == [a.pid, b.pid]
    assert a.pid != b.pid


# -- errors --------------------------------------------------------------------------------------


def test_error_reply_raises_runtime_error_with_the_workers_message(
    spawn: Callable[..., WorkerHandle],
) -> None:
    w = spawn(7)

    async def scenario() -> Any:
        with pytest.raises(RuntimeError) as excinfo:
            await w.call("fail", "bad snapshot")
        assert str(excinfo.value) == "worker 7: ValueError: bad snapshot"
        with pytest.raises(RuntimeError, match=r"^worker 7: KeyError: 'nope'$"):
            await w.call("nope")
        # The worker keeps serving after a failed command.
        return await w.call("echo", "still here")

    assert run(scenario()) == "still here"


def test_call_times_out_on_a_slow_worker(spawn: Callable[..., WorkerHandle]) -> None:
    w = spawn()

    async def scenario() -> float:
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            await w.call("sleep", 3.0, timeout=0.2)
        return time.monotonic() - start

    elapsed = run(scenario())
    assert 0.15 <= elapsed < 2.0


def test_a_call_after_a_timeout_never_gets_the_late_reply(
    spawn: Callable[..., WorkerHandle],
) -> None:
    # The admin interface calls "stats" with a timeout; a worker that answers late must not have
    # its late answer handed to the next caller as the answer to a different command.
    w = spawn()

    async def scenario() -> Any:
        with pytest.raises(TimeoutError):
            await w.call("sleep", 0.5, timeout=0.1)
        await asyncio.sleep(0.8)  # the late reply is on its way or already arrived
        try:
            return await w.call("echo", "fresh", timeout=2.0)
        except Exception as exc:  # refusing the call is acceptable; a wrong answer is not
            return exc

    result = run(scenario())
    if not isinstance(result, Exception):
        assert result == "fresh", f"call('echo', 'fresh') returned {result!r}"


def test_call_to_a_worker_that_dies_raises(spawn: Callable[..., WorkerHandle]) -> None:
    w = spawn()

    async def scenario() -> None:
        with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
            await w.call("exit", 3, timeout=5.0)

    run(scenario())
    assert wait_exit(w.pid) == 3
    assert not w.alive()


# -- process lifecycle ---------------------------------------------------------------------------


def test_alive_and_kill(spawn: Callable[..., WorkerHandle]) -> None:
    w = spawn()
    assert run(w.call("echo", 1)) == 1
    assert w.alive()
    w.kill()
    deadline = time.monotonic() + BOUND
    while w.alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not w.alive()
    assert not w.alive()  # already reaped: still False, no exception
    w.kill()  # killing a dead worker is harmless
    w.kill(signal.SIGKILL)


def test_kill_with_another_signal(spawn: Callable[..., WorkerHandle]) -> None:
    w = spawn()
    assert w.alive()
    w.kill(signal.SIGKILL)
    deadline = time.monotonic() + BOUND
    while w.alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not w.alive()


def test_worker_exits_cleanly_when_the_main_process_closes_the_channel(
    spawn: Callable[..., WorkerHandle],
) -> None:
    w = spawn()
    assert run(w.call("echo", "x")) == "x"
    w.sock.close()
    assert wait_exit(w.pid) == 0


def test_closing_one_channel_ends_that_worker_while_a_later_sibling_runs(
    spawn: Callable[..., WorkerHandle],
) -> None:
    # Workers are forked one after another (app.py forks --concurrency of them). Closing the main
    # process's end of worker 0's channel must end worker 0 even though worker 1, forked later,
    # is still running: the main's end of a channel must not live on in sibling workers.
    first = spawn(0)
    second = spawn(1)
    assert run(first.call("echo", 0)) == 0
    first.sock.close()
    status = wait_exit(first.pid, timeout=3.0)
    assert status == 0, (
        "worker 0 still serving 3 s after the main process closed its channel "
        f"(worker 1, pid {second.pid}, holds an inherited copy of the main's end)"
    )
    assert second.alive()
    assert run(second.call("echo", 1)) == 1


def test_worker_exit_code_is_the_childs_return_value(spawn: Callable[..., WorkerHandle]) -> None:
    w = spawn(child=lambda index, sock: 40 + index)
    assert wait_exit(w.pid) == 40


def test_worker_exits_with_1_when_the_child_raises(spawn: Callable[..., WorkerHandle]) -> None:
    def child(index: int, sock: socket.socket) -> int:
        raise RuntimeError("boom")

    w = spawn(child=child)
    assert wait_exit(w.pid) == 1


def test_child_gets_its_index_and_a_connected_socket(spawn: Callable[..., WorkerHandle]) -> None:
    def child(index: int, sock: socket.socket) -> int:
        sock.sendall(b"index=%d" % index)
        return 0

    w = spawn(5, child=child)
    w.sock.settimeout(BOUND)
    data = b""
    while chunk := w.sock.recv(100):
        data += chunk
    assert data == b"index=5"
    assert wait_exit(w.pid) == 0
