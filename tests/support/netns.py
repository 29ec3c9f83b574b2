"""Network faults with nftables inside a network namespace that the test creates.

The test kernel has no ``tc netem`` but has network namespaces, veth and nftables (see
../shared/docs/reliability.md, key takeaway 3).  :class:`NetNamespace` builds an isolated
"host" for an upstream:

* a namespace ``ubimesh-t<pid>-<n>`` with its loopback up;
* a veth pair from the test's namespace into it, with a /30 from 10.199.0.0/16 that no
  interface uses yet: :attr:`NetNamespace.host_address` on our side,
  :attr:`NetNamespace.address` inside (``veth=False`` skips this: then only processes inside
  the namespace, on its own 127.0.0.1, can talk to each other);
* an nftables table ``inet ubimesh_faults`` with an ``input`` chain inside the namespace, to
  which :meth:`~NetNamespace.drop`, :meth:`~NetNamespace.reject` and :meth:`~NetNamespace.loss`
  add rules for one TCP port (returning a handle for :meth:`~NetNamespace.remove`).

A rule matches every packet to the port, so it hits new **and established** connections:
``drop`` makes a connect time out and stalls an open connection; ``reject`` (``reject with tcp
reset``) answers a SYN with RST (the client sees ECONNREFUSED) and data on an open connection
with RST (ECONNRESET).  Processes run inside with :meth:`~NetNamespace.start` (``ip netns
exec`` replaces itself with the program, so the returned process's pid is the program's and
SIGSTOP/SIGKILL reach it).

Leaving the ``with`` block stops those processes and deletes the namespace, which also deletes
the veth pair; namespaces left behind by a test process that died are deleted by the next
:class:`NetNamespace`.  :func:`netns_support` tells, with the precise reason, when this machine
cannot do any of it (not root, no ``ip`` or ``nft``, namespaces not permitted); tests skip with
that reason.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import itertools
import os
import random
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from tests.support.procs import ManagedProcess

__all__ = ["NetNamespace", "NetnsError", "netns_support"]

PREFIX = "ubimesh-t"
TABLE = "ubimesh_faults"
ADDRESS_POOL = ipaddress.ip_network("10.199.0.0/16")
CMD_TIMEOUT_S = 10.0
_counter = itertools.count(1)


class NetnsError(RuntimeError):
    """An ``ip`` or ``nft`` command failed; the message has the command and its stderr."""


def _run(argv: Sequence[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        done = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=CMD_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetnsError(f"`{' '.join(argv)}` failed: {exc}") from exc
    if check and done.returncode != 0:
        raise NetnsError(f"`{' '.join(argv)}` exited with {done.returncode}: {done.stderr.strip()}")
    return done


@functools.cache
def netns_support() -> str | None:
    """None when namespaces, veth and nftables work here; else why not, precisely."""
    if not sys.platform.startswith("linux"):
        return f"network namespaces are Linux only (this is {sys.platform})"
    if os.geteuid() != 0:
        return (
            f"creating network namespaces and nftables rules needs root (CAP_SYS_ADMIN and "
            f"CAP_NET_ADMIN); this test runs as uid {os.geteuid()}"
        )
    for tool, package in (("ip", "iproute2"), ("nft", "nftables")):
        if shutil.which(tool) is None:
            return f"`{tool}` is not on PATH: install the Debian package {package}"
    probe = f"{PREFIX}probe{os.getpid()}"
    try:
        _run(["ip", "netns", "add", probe])
    except NetnsError as exc:
        return f"network namespaces are not permitted here: {exc}"
    try:
        _run(["ip", "netns", "exec", probe, "nft", "add", "table", "inet", TABLE])
        _run(["ip", "-n", probe, "link", "add", "probe0", "type", "veth", "peer", "probe1"])
    except NetnsError as exc:
        return f"a namespace could be made but not configured: {exc}"
    finally:
        _run(["ip", "netns", "del", probe], check=False)
    return None


def _sweep_stale() -> None:
    """Delete namespaces of ours whose test process is gone (it died without cleaning up)."""
    listing = _run(["ip", "netns", "list"], check=False).stdout
    for match in re.finditer(rf"^{PREFIX}(\d+)-\d+", listing, re.MULTILINE):
        pid = int(match.group(1))
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            _run(["ip", "netns", "del", match.group(0)], check=False)
        except PermissionError:
            pass


def _free_subnet() -> ipaddress.IPv4Network:
    """A /30 of ADDRESS_POOL that no interface of the test's namespace has an address in."""
    used = _run(["ip", "-4", "-o", "addr", "show"]).stdout
    taken = {ipaddress.ip_interface(m.group(1)).network for m in re.finditer(r"inet (\S+)", used)}
    subnets = list(ADDRESS_POOL.subnets(new_prefix=30))
    for _ in range(200):  # bounded: the pool has 16384 subnets and tests use a handful
        net = random.choice(subnets)
        if not any(net.overlaps(t) for t in taken):
            return net
    raise NetnsError(f"no free /30 in {ADDRESS_POOL}")


class NetNamespace:
    """A network namespace with a veth link and an nftables input chain; see the module doc."""

    def __init__(self, veth: bool = True) -> None:
        n = next(_counter)
        self.name = f"{PREFIX}{os.getpid()}-{n}"
        self.veth = veth
        # Interface names are at most 15 characters.
        tag = f"{os.getpid() % 100000}{n % 100}"
        self.host_if = f"umt{tag}h"
        self.ns_if = f"umt{tag}n"
        self.host_address = ""
        self.address = "127.0.0.1"
        self._procs: list[ManagedProcess] = []
        self._created = False

    # -- life ---------------------------------------------------------------------------------

    def __enter__(self) -> NetNamespace:
        reason = netns_support()
        if reason is not None:
            raise NetnsError(reason)
        _sweep_stale()
        _run(["ip", "netns", "add", self.name])
        self._created = True
        try:
            self._setup()
        except BaseException:
            self.close()
            raise
        return self

    def _setup(self) -> None:
        self.exec(["ip", "link", "set", "lo", "up"])
        if self.veth:
            net = _free_subnet()
            host, inside = list(net.hosts())
            self.host_address, self.address = str(host), str(inside)
            _run(["ip", "link", "add", self.host_if, "type", "veth", "peer", self.ns_if])
            _run(["ip", "link", "set", self.ns_if, "netns", self.name])
            _run(["ip", "addr", "add", f"{host}/30", "dev", self.host_if])
            _run(["ip", "link", "set", self.host_if, "up"])
            self.exec(["ip", "addr", "add", f"{inside}/30", "dev", self.ns_if])
            self.exec(["ip", "link", "set", self.ns_if, "up"])
        self.exec(["nft", "add", "table", "inet", TABLE])
        self.exec(
            [
                "nft",
                "add chain inet "
                f"{TABLE} input {{ type filter hook input priority 0; policy accept; }}",
            ]
        )

    def close(self) -> None:
        """Stop the processes started inside, then delete the namespace (and its veth)."""
        for proc in self._procs:
            proc.stop()
        self._procs.clear()
        if self._created:
            _run(["ip", "netns", "del", self.name], check=False)
            # The host end goes with its peer; this only matters if the move into the
            # namespace failed half-way.
            _run(["ip", "link", "del", self.host_if], check=False)
            self._created = False

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- inside -------------------------------------------------------------------------------

    @property
    def prefix(self) -> list[str]:
        """The command prefix that runs a program inside the namespace."""
        return ["ip", "netns", "exec", self.name]

    def exec(self, argv: Sequence[str]) -> str:
        """Run a short command inside the namespace (bounded); returns its stdout."""
        return _run([*self.prefix, *argv]).stdout

    def start(self, name: str, argv: Sequence[str], workdir: Path) -> ManagedProcess:
        """Start a long-running process inside; it is stopped when the namespace closes."""
        proc = ManagedProcess(name, [*self.prefix, *argv], workdir / f"{name}.log", workdir)
        self._procs.append(proc)
        return proc

    def adopt(self, proc: ManagedProcess) -> ManagedProcess:
        """Stop ``proc`` (started under :attr:`prefix` elsewhere) when the namespace closes."""
        self._procs.append(proc)
        return proc

    # -- faults -------------------------------------------------------------------------------

    def _add_rule(self, rule: str) -> int:
        out = self.exec(["nft", "--echo", "--handle", f"add rule inet {TABLE} input {rule}"])
        match = re.search(r"# handle (\d+)", out)
        if match is None:
            raise NetnsError(f"nft printed no handle for rule {rule!r}: {out!r}")
        return int(match.group(1))

    def drop(self, port: int) -> int:
        """Drop every TCP packet to ``port`` inside: connects time out, open ones stall."""
        return self._add_rule(f"tcp dport {port} drop")

    def reject(self, port: int) -> int:
        """Answer every TCP packet to ``port`` with RST: ECONNREFUSED, then ECONNRESET."""
        return self._add_rule(f"tcp dport {port} reject with tcp reset")

    def loss(self, port: int, percent: int) -> int:
        """Drop ``percent`` % of the TCP packets to ``port``, at random."""
        if not 0 <= percent <= 100:
            raise ValueError("percent must be from 0 to 100")
        if percent == 100:  # nft's range check refuses "< 100" for "mod 100"
            return self.drop(port)
        return self._add_rule(f"tcp dport {port} numgen random mod 100 < {percent} drop")

    def remove(self, handle: int) -> None:
        """Remove one rule added by :meth:`drop`, :meth:`reject` or :meth:`loss`."""
        self.exec(["nft", "delete", "rule", "inet", TABLE, "input", "handle", str(handle)])

    def clear(self) -> None:
        """Remove every rule: traffic flows again."""
        self.exec(["nft", "flush", "chain", "inet", TABLE, "input"])

    def rules(self) -> str:
        """The namespace's nftables ruleset, as ``nft list`` prints it (for failure messages)."""
        with contextlib.suppress(NetnsError):
            return self.exec(["nft", "-a", "list", "table", "inet", TABLE])
        return "<unavailable>"
