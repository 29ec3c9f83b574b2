"""Machinery of the differential suite (tests/interop/test_differential.py).

A *suite* is one YAML file under tests/interop/cases/: a bootstrap template and a list of
*cases*, each a list of requests.  The bootstrap is rendered once per proxy (with that proxy's
own listener and admin ports and the shared echo upstreams' ports), both proxies are started
once per suite, and each request is sent to both.  What the client and the upstreams observed is
normalised (:func:`observe`) and the two observations must be equal.

See tests/interop/README.md for the file format and for what is normalised and why.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import email.utils
import functools
import hashlib
import json
import re
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.support.echo_upstream import EchoServerPool, RequestRecord
from tests.support.http_client import Response, build_request, send_httpclient, send_raw
from tests.support.procs import (
    LOOPBACK,
    ManagedProcess,
    ProcessStartError,
    free_ports,
    launch_envoy,
    launch_ubimesh,
    wait_ready,
)

__all__ = [
    "Case",
    "ProxyFarm",
    "RequestSpec",
    "RunningProxy",
    "Suite",
    "check_expectations",
    "describe_difference",
    "load_suites",
    "observe",
    "run_case",
]

PLACEHOLDER = re.compile(r"\$\{(ADMIN_PORT|LISTENER:[\w.-]+|UPSTREAM:[\w.-]+)\}")
UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
#: Trace headers a tracing proxy fills with random ids (a control plane traces by default).
TRACE_ID_HEADERS = frozenset(
    {"x-b3-traceid", "x-b3-spanid", "x-b3-parentspanid", "traceparent", "b3"}
)
HEX_ID_RE = re.compile(r"\b(?:[0-9a-f]{32}|[0-9a-f]{16})\b")
PORT_AFTER_COLON = re.compile(r"(?<=:)(\d{1,5})(?!\d)")
# Names an implementation may use for itself in `server:` when the bootstrap sets no server_name.
DEFAULT_SERVER_NAMES = {"envoy", "ubimesh"}
REQUEST_KEYS = {
    "method",
    "path",
    "host",
    "headers",
    "body",
    "chunks",
    "client",
    "version",
    "listener",
    "expect",
    "await_upstreams",
    "note",
}
EXPECT_KEYS = {
    "status",
    "upstream",
    "target",
    "upstream_headers",
    "response_headers",
    "body",
    "upstream_count",
    "error",
}


# --------------------------------------------------------------------------------------------
# Case files


@dataclass
class RequestSpec:
    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes | None
    chunks: list[bytes] | None
    client: str
    version: str
    listener: str
    expect: dict[str, Any]
    await_upstreams: int
    note: str

    def label(self) -> str:
        host = next((v for n, v in self.headers if n.lower() == "host"), None)
        extra = f" host={host}" if host is not None else " (no host)"
        return f"{self.method} {self.path} {self.version}{extra} via {self.listener}/{self.client}"


@dataclass(eq=False)
class Case:
    suite: Suite = field(repr=False)
    name: str
    doc: str
    requests: list[RequestSpec]

    @property
    def id(self) -> str:
        return f"{self.suite.name}/{self.name}"


@dataclass(eq=False)
class Suite:
    name: str
    path: Path
    doc: str
    bootstrap: dict[str, Any]
    echo_clusters: dict[str, dict[str, Any]]
    cases: list[Case] = field(default_factory=list, repr=False)

    def listener_names(self) -> list[str]:
        names: list[str] = []
        for match in PLACEHOLDER.finditer(json.dumps(self.bootstrap)):
            key = match.group(1)
            if key.startswith("LISTENER:") and key[9:] not in names:
                names.append(key[9:])
        return names

    def upstream_names(self) -> list[str]:
        names = [spec.get("upstream", name) for name, spec in self.echo_clusters.items()]
        for match in PLACEHOLDER.finditer(json.dumps(self.bootstrap)):
            key = match.group(1)
            if key.startswith("UPSTREAM:"):
                names.append(key[9:])
        return sorted(set(names))


def _as_bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    return str(value).encode("latin-1")


def _header_pairs(raw: Any, where: str) -> list[tuple[str, str]]:
    if raw is None:
        return []
    if isinstance(raw, Mapping):
        return [(str(k), str(v)) for k, v in raw.items()]
    pairs = []
    for item in raw:
        if not isinstance(item, list | tuple) or len(item) != 2:
            raise ValueError(f"{where}: headers must be [name, value] pairs, got {item!r}")
        pairs.append((str(item[0]), str(item[1])))
    return pairs


def _request_spec(raw: Mapping[str, Any], defaults: Mapping[str, Any], where: str) -> RequestSpec:
    unknown = set(raw) - REQUEST_KEYS
    if unknown:
        raise ValueError(f"{where}: unknown request keys {sorted(unknown)}")
    merged = {**defaults, **raw}
    expect = dict(merged.get("expect") or {})
    bad = set(expect) - EXPECT_KEYS
    if bad:
        raise ValueError(f"{where}: unknown expect keys {sorted(bad)}")
    method = str(merged.get("method", "GET"))
    headers: list[tuple[str, str]] = []
    if merged.get("host") is not None:
        headers.append(("Host", str(merged["host"])))
    headers += _header_pairs(merged.get("headers"), where)
    lower_names = {n.lower() for n, _ in headers}
    body = _as_bytes(merged["body"]) if merged.get("body") is not None else None
    chunks = [_as_bytes(c) for c in merged["chunks"]] if merged.get("chunks") is not None else None
    if chunks is not None and "transfer-encoding" not in lower_names:
        headers.append(("Transfer-Encoding", "chunked"))
    if (
        body is not None
        and "content-length" not in lower_names
        and "transfer-encoding" not in lower_names
    ):
        headers.append(("Content-Length", str(len(body))))
    version = str(merged.get("version", "HTTP/1.1"))
    client = str(merged.get("client", "http"))
    if chunks is not None or version != "HTTP/1.1":
        client = "raw"
    if client not in ("http", "raw"):
        raise ValueError(f"{where}: client must be http or raw")
    return RequestSpec(
        method=method,
        path=str(merged.get("path", "/")),
        headers=headers,
        body=body,
        chunks=chunks,
        client=client,
        version=version,
        listener=str(merged.get("listener", "main")),
        expect=expect,
        await_upstreams=int(merged.get("await_upstreams", 0)),
        note=str(merged.get("note", "")),
    )


def load_suite(path: Path) -> Suite:
    data = yaml.safe_load(path.read_text())
    where = path.name
    # Top-level keys starting with "x-" are free for YAML anchors shared inside the file.
    unknown = {k for k in data if not k.startswith("x-")} - {
        "doc",
        "bootstrap",
        "echo_clusters",
        "defaults",
        "cases",
    }
    if unknown:
        raise ValueError(f"{where}: unknown top-level keys {sorted(unknown)}")
    clusters_raw = data.get("echo_clusters") or {}
    if isinstance(clusters_raw, list):
        clusters_raw = {name: {} for name in clusters_raw}
    suite = Suite(
        name=path.stem,
        path=path,
        doc=str(data.get("doc", "")).strip(),
        bootstrap=data["bootstrap"],
        echo_clusters={str(k): dict(v or {}) for k, v in clusters_raw.items()},
    )
    defaults = data.get("defaults") or {}
    seen: set[str] = set()
    for raw_case in data["cases"]:
        name = raw_case["name"]
        if name in seen:
            raise ValueError(f"{where}: duplicate case {name}")
        seen.add(name)
        requests = [
            _request_spec(r, defaults, f"{where}:{name}[{i}]")
            for i, r in enumerate(raw_case["requests"])
        ]
        suite.cases.append(Case(suite, name, str(raw_case.get("doc", "")).strip(), requests))
    listeners = set(suite.listener_names())
    for case in suite.cases:
        for req in case.requests:
            if req.listener not in listeners:
                raise ValueError(f"{where}:{case.name}: unknown listener {req.listener!r}")
    return suite


def load_suites(directory: Path) -> list[Suite]:
    return [load_suite(p) for p in sorted(directory.glob("*.yaml"))]


# --------------------------------------------------------------------------------------------
# Rendering


def _substitute(value: Any, ports: Mapping[str, int]) -> Any:
    if isinstance(value, dict):
        return {k: _substitute(v, ports) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, ports) for v in value]
    if isinstance(value, str):
        whole = PLACEHOLDER.fullmatch(value)
        if whole:
            return ports[whole.group(1)]
        return PLACEHOLDER.sub(lambda m: str(ports[m.group(1)]), value)
    return value


def render_text(text: str, ports: Mapping[str, int]) -> str:
    return PLACEHOLDER.sub(lambda m: str(ports[m.group(1)]), text)


def render_bootstrap(suite: Suite, ports: Mapping[str, int]) -> dict[str, Any]:
    boot = copy.deepcopy(suite.bootstrap)
    if suite.echo_clusters:
        clusters = boot.setdefault("static_resources", {}).setdefault("clusters", [])
        for name, spec in suite.echo_clusters.items():
            endpoint: dict[str, Any] = {
                "address": {
                    "socket_address": {
                        "address": LOOPBACK,
                        "port_value": f"${{UPSTREAM:{spec.get('upstream', name)}}}",
                    }
                }
            }
            if "hostname" in spec:
                endpoint["hostname"] = spec["hostname"]
            clusters.append(
                {
                    "name": name,
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "load_assignment": {
                        "cluster_name": name,
                        "endpoints": [{"lb_endpoints": [{"endpoint": endpoint}]}],
                    },
                }
            )
    return _substitute(boot, ports)


# --------------------------------------------------------------------------------------------
# Processes


@dataclass
class RunningProxy:
    label: str
    kind: str
    proc: ManagedProcess
    ports: dict[str, int]
    config_path: Path

    def listener_port(self, name: str) -> int:
        return self.ports[f"LISTENER:{name}"]

    def port_labels(self) -> dict[int, str]:
        return {port: "${" + key + "}" for key, port in self.ports.items()}


class ProxyFarm:
    """Runs the reference and subject proxies of one suite at a time.

    Both proxies of a suite are launched together, and while a suite's cases run, the next
    suite's proxies (in ``order``) are already starting, which hides most of the start-up time.
    Moving to another suite stops the previous one's processes.  A proxy that fails to start
    is remembered, so the rest of that suite's cases fail at once with the same message.
    """

    def __init__(
        self,
        pool: EchoServerPool,
        workdir: Path,
        subject_kind: str,
        order: list[Suite] | None = None,
        ready_timeout: float = 20.0,
    ) -> None:
        if subject_kind not in ("envoy", "ubimesh"):
            raise ValueError(subject_kind)
        self.pool = pool
        self.workdir = workdir
        self.subject_kind = subject_kind
        self.order = list(order or [])
        self.ready_timeout = ready_timeout
        self.current: str | None = None
        self.running: dict[str, RunningProxy | BaseException] = {}
        self._handed_out: set[int] = set()
        # suite name -> side label -> launched, not yet waited for
        self.pending: dict[str, dict[str, RunningProxy | BaseException]] = {}

    @property
    def sides(self) -> tuple[tuple[str, str], tuple[str, str]]:
        subject_label = "envoy-2" if self.subject_kind == "envoy" else "ubimesh"
        return ("envoy", "envoy"), (subject_label, self.subject_kind)

    def proxies(self, suite: Suite) -> tuple[RunningProxy, RunningProxy]:
        if self.current != suite.name:
            self.stop_running()
            self.current = suite.name
            launched = self.pending.pop(suite.name, None) or self._launch_all(suite)
            for label, kind in self.sides:
                self.running[label] = self._await(suite, label, kind, launched[label])
            self._prefetch_after(suite)
        out = []
        for label, _ in self.sides:
            entry = self.running[label]
            if isinstance(entry, BaseException):
                raise ProcessStartError(f"{label} did not start for suite {suite.name}:\n{entry}")
            out.append(entry)
        return out[0], out[1]

    def _prefetch_after(self, suite: Suite) -> None:
        names = [s.name for s in self.order]
        if suite.name not in names:
            return
        index = names.index(suite.name)
        if index + 1 < len(self.order):
            nxt = self.order[index + 1]
            if nxt.name not in self.pending:
                self.pending[nxt.name] = self._launch_all(nxt)

    def _launch_all(self, suite: Suite) -> dict[str, RunningProxy | BaseException]:
        out: dict[str, RunningProxy | BaseException] = {}
        for label, kind in self.sides:
            try:
                out[label] = self._launch(suite, label, kind, attempt=0)
            except ProcessStartError as exc:
                out[label] = exc
        return out

    def _launch(self, suite: Suite, label: str, kind: str, attempt: int) -> RunningProxy:
        suite_dir = self.workdir / suite.name
        suite_dir.mkdir(parents=True, exist_ok=True)
        listeners = suite.listener_names()
        upstream_ports = {f"UPSTREAM:{n}": self.pool.port(n) for n in suite.upstream_names()}
        # A port handed to a process that has not bound it yet looks free, so the farm never
        # hands out the same port twice in a session.
        picked = free_ports(len(listeners) + 1)
        for _ in range(20):
            if not self._handed_out & set(picked):
                break
            picked = free_ports(len(listeners) + 1)
        self._handed_out.update(picked)
        ports = {"ADMIN_PORT": picked[0], **upstream_ports}
        for name, port in zip(listeners, picked[1:], strict=True):
            ports[f"LISTENER:{name}"] = port
        config_path = suite_dir / f"{label}.bootstrap.yaml"
        config_path.write_text(yaml.safe_dump(render_bootstrap(suite, ports), sort_keys=False))
        name = f"{label}-{attempt}" if attempt else label
        launcher = launch_envoy if kind == "envoy" else launch_ubimesh
        proc = launcher(config_path, suite_dir, name=name)
        return RunningProxy(label, kind, proc, ports, config_path)

    def _await(
        self, suite: Suite, label: str, kind: str, launched: RunningProxy | BaseException
    ) -> RunningProxy | BaseException:
        attempt = 0
        while True:
            if isinstance(launched, BaseException):
                return launched
            listener_ports = [launched.listener_port(n) for n in suite.listener_names()]
            try:
                wait_ready(
                    launched.proc, launched.ports["ADMIN_PORT"], listener_ports, self.ready_timeout
                )
                return launched
            except ProcessStartError as exc:
                launched.proc.stop()
                text = str(exc).lower()
                attempt += 1
                if attempt >= 3 or ("in use" not in text and "eaddrinuse" not in text):
                    return exc
                # Somebody took one of the ports between picking and binding: new ports.
                try:
                    launched = self._launch(suite, label, kind, attempt)
                except ProcessStartError as again:
                    return again

    def stop_running(self) -> None:
        for entry in self.running.values():
            if isinstance(entry, RunningProxy):
                entry.proc.stop()
        self.running.clear()
        self.current = None

    def close(self) -> None:
        self.stop_running()
        for launched in self.pending.values():
            for entry in launched.values():
                if isinstance(entry, RunningProxy):
                    entry.proc.stop()
        self.pending.clear()


# --------------------------------------------------------------------------------------------
# Sending and observing


def send(proxy: RunningProxy, spec: RequestSpec) -> Response:
    port = proxy.listener_port(spec.listener)
    ports = proxy.ports
    path = render_text(spec.path, ports)
    headers = [(n, render_text(v, ports)) for n, v in spec.headers]
    if spec.client == "raw":
        data = build_request(spec.method, path, headers, spec.body, spec.chunks, spec.version)
        return send_raw(LOOPBACK, port, data, spec.method)
    return send_httpclient(LOOPBACK, port, spec.method, path, headers, spec.body)


def _group_sorted(pairs: Iterable[tuple[str, str]]) -> list[list[str]]:
    """Order-insensitive across field names, order-preserving among values of one name."""
    return [[n, v] for n, v in sorted(pairs, key=lambda p: p[0].lower())]


@functools.cache
def host_ipv4_labels() -> dict[str, str]:
    """This machine's non-loopback IPv4 addresses, labelled in interface order.

    Envoy appends its own "local address" (the first non-loopback address of the host) to
    x-forwarded-for when use_remote_address is set and the peer is on loopback, so that value
    depends on the machine.  It is labelled ``${HOST_IP}`` (then ``${HOST_IP2}``, ...).
    """
    addresses: list[str] = []
    try:
        import psutil

        for infos in psutil.net_if_addrs().values():
            for info in infos:
                if info.family == socket.AF_INET and not info.address.startswith("127."):
                    addresses.append(info.address)
    except ImportError:
        with contextlib.suppress(OSError):
            addresses.append(socket.gethostbyname(socket.gethostname()))
    labels: dict[str, str] = {}
    for address in addresses:
        if address not in labels and not address.startswith("127."):
            labels[address] = "${HOST_IP}" if not labels else f"${{HOST_IP{len(labels) + 1}}}"
    return labels


class _Normalizer:
    def __init__(self, port_labels: Mapping[int, str], client_sent_ids: set[str]) -> None:
        self.port_labels = dict(port_labels)
        self.client_sent_ids = client_sent_ids
        self.ip_labels = host_ipv4_labels()
        self.ip_re = (
            re.compile(
                r"(?<![\d.])("
                + "|".join(re.escape(a) for a in sorted(self.ip_labels, key=len, reverse=True))
                + r")(?![\d.])"
            )
            if self.ip_labels
            else None
        )

    def text(self, value: str) -> str:
        if value.isdigit() and int(value) in self.port_labels:
            return self.port_labels[int(value)]

        def repl(m: re.Match[str]) -> str:
            return self.port_labels.get(int(m.group(1)), m.group(1))

        value = PORT_AFTER_COLON.sub(repl, value)
        if self.ip_re is not None:
            value = self.ip_re.sub(lambda m: self.ip_labels[m.group(1)], value)
        return value

    def request_headers(self, pairs: Iterable[Iterable[str]]) -> list[list[str]]:
        out = []
        for name, value in pairs:
            if (
                name.lower() == "x-request-id"
                and UUID_RE.fullmatch(value)
                and value not in self.client_sent_ids
            ):
                value = "<generated-uuid>"
            elif name.lower() in TRACE_ID_HEADERS and value not in self.client_sent_ids:
                value = HEX_ID_RE.sub(lambda m: f"<generated-id-{len(m.group(0))}>", value)
            out.append((name, self.text(value)))
        return _group_sorted(out)

    def record(self, rec: RequestRecord) -> dict[str, Any]:
        return {
            "upstream": rec.name,
            "method": rec.method,
            "target": self.text(rec.target),
            "version": rec.version,
            "headers": self.request_headers(rec.headers),
            "body_length": rec.body_length,
            "body_sha256": rec.body_sha256[:16],
            "chunked": rec.chunked,
            "trailers": self.request_headers(rec.trailers),
        }


def _is_http_date(value: str) -> bool:
    try:
        return email.utils.parsedate_to_datetime(value) is not None
    except (TypeError, ValueError):
        return False


def observe(
    spec: RequestSpec,
    resp: Response,
    records: list[RequestRecord],
    proxy: RunningProxy,
) -> dict[str, Any]:
    """The normalised observation of one request; equal observations mean equal behaviour."""
    labels = proxy.port_labels()
    if resp.local_port:
        labels.setdefault(resp.local_port, "${CLIENT_PORT}")
    sent_ids = {v for n, v in spec.headers if n.lower() in ("x-request-id", *TRACE_ID_HEADERS)}
    norm = _Normalizer(labels, sent_ids)
    upstreams = sorted(
        (norm.record(r) for r in records), key=lambda r: (r["upstream"], r["target"], r["method"])
    )
    timeouts = {
        v for up in upstreams for n, v in up["headers"] if n == "x-envoy-expected-rq-timeout-ms"
    }
    if len(timeouts) > 1:
        # Retries: a retry carries what is left of the route timeout, which depends on how long
        # the earlier attempts took (test_retries_differential checks it is below the first's).
        for up in upstreams:
            up["headers"] = [
                [n, "<remaining ms>" if n == "x-envoy-expected-rq-timeout-ms" else v]
                for n, v in up["headers"]
            ]
    obs: dict[str, Any] = {"request": spec.label()}
    if resp.status is None:
        obs["status"] = None
        obs["error"] = resp.error
        obs["upstreams"] = upstreams
        return obs

    answered_by = next((v for n, v in resp.headers if n.lower() == "x-echo-upstream"), None)
    body_obs: Any
    echo_json: Any = None
    if answered_by is not None and resp.body.startswith(b'{"echo":1'):
        with contextlib.suppress(ValueError):
            echo_json = json.loads(resp.body)
    if echo_json is not None:
        matching = [r for r in records if r.to_json() == echo_json]
        if matching:
            body_obs = {"echo_of": echo_json["name"]}
        else:
            body_obs = {"echo_not_matching_any_upstream_record": echo_json}
    elif not resp.body:
        body_obs = ""
    else:
        try:
            text = resp.body.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        if text is not None and len(text) <= 4000:
            body_obs = norm.text(text)
        else:
            body_obs = {
                "length": len(resp.body),
                "sha256": hashlib.sha256(resp.body).hexdigest()[:16],
            }

    headers = []
    for name, value in resp.headers:
        lname = name.lower()
        if lname == "date" and _is_http_date(value):
            value = "<http-date>"
        elif lname == "x-envoy-upstream-service-time" and value.isdigit():
            value = "<ms>"
        elif lname == "server" and value in DEFAULT_SERVER_NAMES:
            value = "<proxy-default>"
        elif lname == "content-length" and value.isdigit():
            if spec.method != "HEAD" and int(value) == len(resp.body):
                value = "<length of body>"
            elif spec.method == "HEAD" and answered_by is not None:
                value = "<echo length>"
        else:
            value = norm.text(value)
        headers.append((name, value))

    obs["status"] = resp.status
    obs["reason"] = resp.reason
    obs["version"] = resp.version
    if resp.error:
        obs["error"] = resp.error
    obs["response_headers"] = _group_sorted(headers)
    obs["body"] = body_obs
    obs["upstreams"] = upstreams
    return obs


def run_request(pool: EchoServerPool, proxy: RunningProxy, spec: RequestSpec) -> dict[str, Any]:
    cursor = pool.cursor()
    resp = send(proxy, spec)
    records = pool.records_since(cursor, at_least=spec.await_upstreams, timeout=3.0)
    return observe(spec, resp, records, proxy)


def run_case(pool: EchoServerPool, proxy: RunningProxy, case: Case) -> list[dict[str, Any]]:
    return [run_request(pool, proxy, spec) for spec in case.requests]


# --------------------------------------------------------------------------------------------
# Expectations and reporting


def _values(pairs: list[list[str]], name: str) -> list[str]:
    return [v for n, v in pairs if n.lower() == name.lower()]


def _check_headers(
    pairs: list[list[str]], wanted: Mapping[str, Any], where: str, problems: list[str]
) -> None:
    for name, want in wanted.items():
        got = _values(pairs, name)
        if want is None:
            if got:
                problems.append(f"{where} {name}: expected absent, got {got}")
        elif want == "*":
            if not got:
                problems.append(f"{where} {name}: expected present, is absent")
        else:
            want_list = want if isinstance(want, list) else [want]
            want_list = [str(w) for w in want_list]
            if got != want_list:
                problems.append(f"{where} {name}: expected {want_list}, got {got}")


def check_expectations(spec: RequestSpec, obs: Mapping[str, Any]) -> list[str]:
    """Problems with the sanity expectations a case states; they guard against vacuous cases."""
    exp = spec.expect
    problems: list[str] = []
    if "status" in exp and obs.get("status") != exp["status"]:
        problems.append(f"status: expected {exp['status']}, got {obs.get('status')}")
    if "error" in exp and bool(obs.get("error")) != bool(exp["error"]):
        problems.append(f"error: expected {exp['error']}, got {obs.get('error')}")
    headers = obs.get("response_headers", [])
    answered = _values(headers, "x-echo-upstream")
    answered_by = answered[0] if answered else None
    if "upstream" in exp and answered_by != exp["upstream"]:
        problems.append(f"upstream: expected {exp['upstream']}, answered by {answered_by}")
    upstreams = obs.get("upstreams", [])
    primary = next((u for u in upstreams if u["upstream"] == answered_by), None)
    if primary is None and upstreams:
        primary = upstreams[0]
    if "upstream_count" in exp and len(upstreams) != exp["upstream_count"]:
        problems.append(f"upstream_count: expected {exp['upstream_count']}, got {len(upstreams)}")
    if "target" in exp:
        got = primary["target"] if primary else None
        if got != exp["target"]:
            problems.append(f"target: expected {exp['target']!r}, got {got!r}")
    if "upstream_headers" in exp:
        if primary is None:
            problems.append("upstream_headers: no request reached an upstream")
        else:
            _check_headers(primary["headers"], exp["upstream_headers"], "upstream header", problems)
    if "response_headers" in exp:
        _check_headers(headers, exp["response_headers"], "response header", problems)
    if "body" in exp and obs.get("body") != exp["body"]:
        problems.append(f"body: expected {exp['body']!r}, got {obs.get('body')!r}")
    return problems


_PAIR = re.compile(r'\[\n\s*("(?:[^"\\]|\\.)*"),\n\s*("(?:[^"\\]|\\.)*")\n\s*\]')


def _dump(value: Any) -> str:
    """Indented JSON with each [name, value] header pair on one line."""
    text = json.dumps(value, indent=2, sort_keys=False, ensure_ascii=False)
    return _PAIR.sub(lambda m: f"[{m.group(1)}, {m.group(2)}]", text)


def describe_difference(
    case: Case,
    ref_label: str,
    sub_label: str,
    ref_obs: list[dict[str, Any]],
    sub_obs: list[dict[str, Any]],
) -> str:
    differing = sum(1 for x, y in zip(ref_obs, sub_obs, strict=True) if x != y)
    lines = [
        f"case {case.id}: {case.doc}",
        f"{differing} of {len(case.requests)} requests differ ({ref_label} is the reference)",
    ]
    for i, (spec, a, b) in enumerate(zip(case.requests, ref_obs, sub_obs, strict=True)):
        if a == b:
            continue
        lines.append("")
        lines.append(
            f"--- request #{i}: {spec.label()}" + (f"  ({spec.note})" if spec.note else "")
        )
        keys = [k for k in dict.fromkeys([*a, *b]) if a.get(k) != b.get(k)]
        lines.append(f"    differing fields: {', '.join(keys)}")
        if (a.get("status") is None) != (b.get("status") is None):
            # One side got no response at all: say so, and show the other side whole.
            for label, obs in ((ref_label, a), (sub_label, b)):
                if obs.get("status") is None:
                    lines.append(f"    {label}: NO RESPONSE ({obs.get('error')})")
                    if obs.get("upstreams"):
                        lines.append(f"    {label} upstreams:")
                        lines.extend("        " + x for x in _dump(obs["upstreams"]).splitlines())
                else:
                    lines.append(f"    {label}:")
                    lines.extend("        " + x for x in _dump(obs).splitlines())
            continue
        for key in keys:
            lines.append(f"    [{key}] {ref_label}:")
            lines.extend("        " + x for x in _dump(a.get(key)).splitlines())
            lines.append(f"    [{key}] {sub_label}:")
            lines.extend("        " + x for x in _dump(b.get(key)).splitlines())
        diff = difflib.unified_diff(
            _dump(a).splitlines(), _dump(b).splitlines(), ref_label, sub_label, lineterm="", n=2
        )
        lines.append("    unified diff of the whole observation:")
        lines.extend("      " + x for x in diff)
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Case lists without a bootstrap (the control-plane differential: routes come over ADS)


def load_request_cases(path: Path) -> list[Case]:
    """The cases of a file holding only ``doc``, ``defaults`` and ``cases`` (the same request
    format as a suite's), for proxies configured some other way than by a bootstrap template.

    The cases belong to a Suite with an empty bootstrap named after the file; requests name
    their listener (``main`` by default), which the caller's RunningProxy must have as
    ``LISTENER:<name>``.  Raises ValueError naming the file and case on a malformed entry.
    """
    data = yaml.safe_load(path.read_text())
    where = path.name
    unknown = set(data) - {"doc", "defaults", "cases"}
    if unknown:
        raise ValueError(f"{where}: unknown top-level keys {sorted(unknown)}; expected doc, "
                         "defaults, cases (a request list has no bootstrap)")
    suite = Suite(
        name=path.stem, path=path, doc=str(data.get("doc", "")).strip(), bootstrap={},
        echo_clusters={},
    )
    defaults = data.get("defaults") or {}
    seen: set[str] = set()
    for raw_case in data["cases"]:
        name = raw_case["name"]
        if name in seen:
            raise ValueError(f"{where}: duplicate case {name}")
        seen.add(name)
        requests = [
            _request_spec(r, defaults, f"{where}:{name}[{i}]")
            for i, r in enumerate(raw_case["requests"])
        ]
        suite.cases.append(Case(suite, name, str(raw_case.get("doc", "")).strip(), requests))
    return suite.cases
