"""``ubimesh top``: live per-service requests per second, success rate, p50 and p99, from the
Istio standard metrics each proxy's admin serves at ``/stats/prometheus`` (docs/telemetry.md,
``## ubimesh top``). The arithmetic is in ``ubimesh.telemetry.scrape``; this module finds the
proxies, scrapes them and prints (``ubimesh.cli.top_cmds`` has the flags).

Which proxies. ``--proxy ADMIN_URL`` (repeatable): exactly those, no control plane needed.
Otherwise the control plane's ``GET /api/v1/proxies`` (``--server``/``--control`` and the admin
token as for the other client commands), which reports each proxy's admin address from its
node metadata ``ubimesh.admin_address`` (bootstraps made by ``ubimesh bootstrap`` and ``ubimesh
up`` carry it). A proxy writes its own metadata, so a reported address is only a claim: it is
scraped only when it is the IP the proxy's xDS connection came from (an unspecified address,
0.0.0.0 or ::, means that IP), or when it is loopback, the proxy connected from loopback and
the control plane URL is loopback too (all on this machine). Anything else is listed as not
scraped, with the ``--proxy`` flag that would scrape it: the CLI does not send requests to
arbitrary addresses on a proxy's word. Only GET of the metrics page, never with the control
plane's token; pages over 64 MiB are refused.

Every refresh scrapes all proxies concurrently, each bounded by ``--timeout``; an unreachable
proxy is listed under the table, not fatal. Rates come from each proxy's two latest good
scrapes (a proxy seen once shows from the next refresh). ``--once``: two scrapes one interval
apart, one table, exit. Otherwise the table is redrawn in place (ANSI clear + home) when stdout
is a terminal, and printed one after another when not; ``--json`` prints one JSON document a
line instead. Ctrl-C exits 0.
"""

from __future__ import annotations

import argparse
import http.client
import ipaddress
import json
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TextIO
from urllib.parse import unquote, urlsplit, urlunsplit

from ubimesh.control.api_error import ApiError
from ubimesh.control.bootstrap import parse_address
from ubimesh.telemetry.scrape import (
    MeshMetrics,
    ParseError,
    ProxyInterval,
    ServiceRow,
    aggregate,
    read_mesh_metrics,
    render_table,
    sort_rows,
)

METRICS_PATH = "/stats/prometheus"
#: A metrics page larger than this is refused (a proxy with many clusters writes a few MB).
MAX_PAGE_BYTES = 64 * 1024 * 1024
#: At most this many scrapes at once.
MAX_CONCURRENT = 32
CLEAR = "\x1b[H\x1b[2J"


# ---------------------------------------------------------------------------------------------
# Targets


@dataclass(frozen=True, slots=True)
class Target:
    """A proxy: ``name`` (node id, or the URL as given), the metrics ``url`` ("" when not
    scraped) and ``note``, why not."""

    name: str
    url: str
    note: str = ""


def admin_url(text: str) -> str:
    """``--proxy`` value -> the metrics page URL: ``127.0.0.1:15000`` and
    ``http://127.0.0.1:15000`` mean ``http://127.0.0.1:15000/stats/prometheus``; a URL with a
    path is used as is. ValueError naming the value."""

    full = text.strip() if "://" in text else "http://" + text.strip()
    parts = urlsplit(full)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"{text!r}: scheme {parts.scheme!r} is not http or https")
    try:
        port = parts.port
    except ValueError:
        port = -1
    if not parts.hostname or port == -1:
        raise ValueError(f"{text!r} is not an admin URL; expected e.g. http://127.0.0.1:15000")
    path = parts.path if parts.path not in ("", "/") else METRICS_PATH
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


def peer_ip(peer: str) -> str | None:
    """The IP of a gRPC peer string (``ipv4:127.0.0.1:53422``, ``ipv6:[::1]:53422``, also
    percent-encoded), normalized; None when it is not an IP peer."""

    kind, _, rest = unquote(peer).partition(":")
    if kind not in ("ipv4", "ipv6"):
        return None
    host = rest.rpartition(":")[0].removeprefix("[").removesuffix("]")
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None


def _is_loopback_url(url: str) -> bool:

    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def proxy_target(proxy: Mapping[str, Any], control_url: str) -> Target:
    """The target for one entry of ``GET /api/v1/proxies``, under the rule in the module
    docstring (scrape a claimed admin address only where the proxy demonstrably is)."""

    name = str(proxy.get("id", "?"))
    address = str(proxy.get("adminAddress") or "")
    if not address:
        return Target(name, "", "no admin address")
    try:
        host, port = parse_address(address, what="admin address")
        ip = ipaddress.ip_address(host)
    except ValueError:
        return Target(name, "", f"admin address {address!r} is not IP:PORT")
    if port == 0:
        return Target(name, "", f"admin address {address} has port 0 (chosen at start)")
    peer_text = peer_ip(str(proxy.get("peer", "")))
    peer = ipaddress.ip_address(peer_text) if peer_text else None
    if ip.is_unspecified and peer is not None:
        ip = peer
    hint = f"; pass --proxy http://{address} to scrape it"
    if ip.is_loopback:
        if peer is None or not peer.is_loopback:
            return Target(
                name,
                "",
                f"admin address {address} is loopback but the proxy "
                f"connected from {peer_text or 'an unknown address'}{hint}",
            )
        if not _is_loopback_url(control_url):
            return Target(
                name,
                "",
                f"admin address {address} is loopback on the control "
                f"plane's host, not this one{hint}",
            )
    elif peer != ip:
        return Target(
            name,
            "",
            f"admin address {address} is not the address the proxy "
            f"connected from ({peer_text or 'unknown'}){hint}",
        )
    netloc = f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"
    return Target(name, f"http://{netloc}{METRICS_PATH}")


# ---------------------------------------------------------------------------------------------
# Scraping


@dataclass(slots=True)
class Scraped:
    """One scrape of one target: ``at`` (monotonic seconds, mid-request) and the metrics, or
    ``error``."""

    at: float
    metrics: MeshMetrics | None = None
    error: str = ""


def scrape(url: str, timeout: float) -> Scraped:
    """GET the metrics page at ``url`` and read it; any failure is in ``error`` (never
    raises). ``timeout`` bounds the whole exchange, not only each socket operation."""
    parts = urlsplit(url)
    connection = (
        http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    )
    start = time.monotonic()
    deadline = start + timeout
    conn = connection(parts.hostname or "", parts.port, timeout=timeout)
    chunks: list[bytes] = []
    try:
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        conn.request("GET", target, headers={"Accept": "text/plain"})
        response = conn.getresponse()
        if response.status != 200:
            return Scraped(start, error=f"HTTP {response.status} {response.reason}")
        size = 0
        while chunk := response.read1(1 << 16):
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_PAGE_BYTES:
                return Scraped(start, error=f"metrics page larger than {MAX_PAGE_BYTES} bytes")
            if time.monotonic() > deadline:
                return Scraped(start, error=f"timed out after {timeout:g} s")
    except TimeoutError:
        return Scraped(start, error=f"timed out after {timeout:g} s")
    except (OSError, http.client.HTTPException) as exc:
        return Scraped(start, error=str(getattr(exc, "strerror", None) or exc or type(exc)))
    finally:
        conn.close()
    # Stats are read somewhere between sending the request and the answer: take the middle.
    at = (start + time.monotonic()) / 2
    try:
        return Scraped(at, read_mesh_metrics(b"".join(chunks).decode("utf-8", "replace")))
    except ParseError as exc:
        return Scraped(at, error=f"unreadable metrics: {exc}")


# ---------------------------------------------------------------------------------------------
# The loop


@dataclass(slots=True)
class Report:
    """One refresh: the rows and what happened to each target."""

    rows: list[ServiceRow]
    interval: float
    targets: list[Target]
    status: dict[str, str] = field(default_factory=dict)  # url -> "ok" | "first" | error
    control_error: str = ""

    @property
    def measured(self) -> int:
        return sum(1 for s in self.status.values() if s == "ok")

    def as_json(self) -> dict[str, Any]:
        proxies = []
        for t in self.targets:
            entry: dict[str, Any] = {"name": t.name, "url": t.url or None}
            if not t.url:
                entry.update(status="not scraped", reason=t.note)
            else:
                state = self.status.get(t.url, "")
                if state in ("ok", "first"):
                    entry["status"] = {"ok": "ok", "first": "first scrape"}[state]
                else:
                    entry.update(status="unreachable", reason=state)
            proxies.append(entry)
        doc: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "intervalSeconds": self.interval,
            "services": [r.as_json() for r in self.rows],
            "proxies": proxies,
        }
        if self.control_error:
            doc["controlPlaneError"] = self.control_error
        return doc

    def as_text(self, sort: str) -> str:
        head = (
            f"ubimesh top - {time.strftime('%H:%M:%S')} - {len(self.rows)} services, "
            f"{self.measured} proxies measured, interval {self.interval:g}s, sort {sort}\n\n"
        )
        body = render_table(self.rows)
        if not self.rows:
            body += "(no requests reported by destination proxies yet)\n"
        return head + body + self.footer()

    def footer(self) -> str:
        lines = []
        if self.control_error:
            lines.append(
                f"control plane: {self.control_error} (showing the proxies it last listed)"
            )
        for t in self.targets:
            if not t.url:
                lines.append(f"not scraped   {t.name}: {t.note}")
                continue
            state = self.status.get(t.url, "")
            if state == "first":
                lines.append(f"new           {t.name}: first scrape, shown from the next refresh")
            elif state != "ok":
                lines.append(f"unreachable   {t.name} ({t.url}): {state}")
        return ("\n" + "\n".join(lines) + "\n") if lines else ""


class Top:
    """The scrape loop of one ``ubimesh top`` run."""

    def __init__(
        self,
        args: argparse.Namespace,
        interval: float,
        timeout: float,
        explicit: Sequence[Target],
        out: TextIO,
    ) -> None:
        self.args = args
        self.interval = interval
        self.timeout = timeout
        self.explicit = list(explicit)
        self.out = out
        self.tty = out.isatty() and not args.json
        self.client: Any = None
        self.targets: list[Target] = []
        self.control_error = ""
        self.listed = False  # the control plane answered once
        #: The latest good scrape of each target (by URL): the baseline of the next rates.
        self.last: dict[str, Scraped] = {}
        self._pool: ThreadPoolExecutor | None = None

    def close(self) -> None:
        if self._pool is not None:
            # Scrapes in flight end by their own timeout; nobody waits for them.
            self._pool.shutdown(wait=False, cancel_futures=True)

    def discover(self) -> None:
        """Refresh ``targets`` (from the control plane unless --proxy). Raises ApiError only
        the first time; later failures keep the last list and are shown in the footer."""
        if self.explicit:
            self.targets = self.explicit
            return
        if self.client is None:
            from ubimesh.cli.control_cmds import _client

            self.client = _client(self.args)
        try:
            proxies = self.client.proxies()
        except ApiError as exc:
            if not self.listed:
                raise
            self.control_error = "; ".join(exc.lines())
            return
        self.control_error = ""
        self.listed = True
        self.targets = [proxy_target(p, self.args.server) for p in proxies]

    def scrape_all(self) -> dict[str, Scraped]:
        urls = sorted({t.url for t in self.targets if t.url})
        if not urls:
            return {}
        if self._pool is None:
            self._pool = ThreadPoolExecutor(
                max_workers=MAX_CONCURRENT, thread_name_prefix="ubimesh-top"
            )
        futures = {url: self._pool.submit(scrape, url, self.timeout) for url in urls}
        out: dict[str, Scraped] = {}
        for url, future in futures.items():
            # scrape() bounds itself; the extra second covers a connect that ignores it.
            try:
                out[url] = future.result(timeout=self.timeout + 1.0)
            except TimeoutError:
                out[url] = Scraped(time.monotonic(), error=f"timed out after {self.timeout:g} s")
        return out

    def refresh(self) -> Report:
        """Scrape once and compare with each target's previous good scrape."""
        current = self.scrape_all()
        intervals = []
        status: dict[str, str] = {}
        for url, now in current.items():
            before = self.last.get(url)
            if now.metrics is None:
                status[url] = now.error
                continue
            if before is not None and before.metrics is not None and now.at > before.at:
                intervals.append(ProxyInterval(before.metrics, now.metrics, now.at - before.at))
                status[url] = "ok"
            else:
                status[url] = "first"
            self.last[url] = now
        # Forget proxies no longer listed (a proxy that comes back starts over).
        self.last = {url: s for url, s in self.last.items() if url in current}
        rows = sort_rows(aggregate(intervals), self.args.sort)
        return Report(rows, self.interval, list(self.targets), status, self.control_error)

    def show(self, report: Report) -> None:
        if self.args.json:
            self.out.write(json.dumps(report.as_json(), separators=(",", ":")) + "\n")
        elif self.tty:
            self.out.write(CLEAR + report.as_text(self.args.sort))
        else:
            self.out.write(report.as_text(self.args.sort) + "\n")
        self.out.flush()

    def run(self) -> int:
        try:
            self.discover()
        except ApiError as exc:
            for line in exc.lines():
                print(f"error: {line}", file=sys.stderr)
            return 1
        if self.tty and not self.args.once:
            self.out.write(
                f"{CLEAR}ubimesh top: scraping {len(self.targets)} proxies, first "
                f"figures in {self.interval:g}s (Ctrl-C quits)\n"
            )
            self.out.flush()
        started = time.monotonic()
        self.refresh()  # the baseline
        while True:
            started += self.interval
            time.sleep(max(0.0, started - time.monotonic()))
            started = max(started, time.monotonic() - self.interval)  # no catch-up bursts
            self.discover()
            report = self.refresh()
            self.show(report)
            if self.args.once:
                if report.measured == 0:
                    print(
                        "ubimesh top: no proxy could be measured (see the list above)",
                        file=sys.stderr,
                    )
                    return 1
                return 0
