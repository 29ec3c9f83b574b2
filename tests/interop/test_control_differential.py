"""Interop differential of the control plane: an Envoy gateway and a ubimesh gateway, both
configured over ADS by one ``ubimesh control``, must route the same requests the same way.

One control plane (SQLite, ports 0) gets ``control_cases/mesh.yaml`` through its API: two
Gateways with identical listeners (``edge-envoy`` and ``edge-ubimesh``, each on its own free
port) and HTTPRoutes attached to both, so the two proxies receive the same compiled routes.
Backends are echo upstreams (tests/support/echo_upstream.py) registered as Workloads that
point at them directly, plus ``hang``, a socket that accepts and never answers (the route
timeout fires).  Envoy 1.40 serves ``edge-envoy`` and ``ubimesh proxy`` serves
``edge-ubimesh``, both from :func:`ubimesh.control.bootstrap.build_bootstrap` with role
``gateway``.

Each case of ``control_cases/requests.yaml`` is sent to both (same format and the same
normalisation as the static-bootstrap differential, tests/interop/test_differential.py: port
numbers labelled, generated request ids, ``date``, ``server`` and upstream service time
reduced to their form).  The case's expectations are checked against Envoy first, so a case
that does not do what it claims is reported as broken rather than passing vacuously.  The last
test applies ``control_cases/change.yaml`` through the API, waits until both gateways serve
it, and runs ``control_cases/after_change.yaml`` the same way.

``UBIMESH_DIFF_DUMP=DIR`` writes both sides' observations of every case to DIR as JSON.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.differential import (
    Case,
    RunningProxy,
    check_expectations,
    describe_difference,
    load_request_cases,
    run_case,
)
from tests.support.echo_upstream import EchoServerPool
from tests.support.procs import (
    ManagedProcess,
    ProcessStartError,
    envoy_binary,
    free_ports,
    launch_envoy,
    launch_ubimesh,
    ubimesh_available,
    wait_ready,
)
from ubimesh.control.api_error import ApiError
from ubimesh.control.bootstrap import build_bootstrap, parse_address
from ubimesh.control.client import Client

pytestmark = [
    pytest.mark.envoy,
    pytest.mark.skipif(envoy_binary() is None, reason="no envoy binary on PATH"),
]

CASES_DIR = Path(__file__).parent / "control_cases"
ECHO_UPSTREAMS = ("alpha", "beta", "shop", "shop-v1", "shop-v2", "mix")
CASES = load_request_cases(CASES_DIR / "requests.yaml")
AFTER_CHANGE = load_request_cases(CASES_DIR / "after_change.yaml")
#: Genuine differences that are larger than a small fix: case name -> why (strict xfail, so a
#: fixed difference is noticed).
XFAIL: dict[str, str] = {}
#: A placeholder, quoted or not: ${GATEWAY_PORT:envoy}, ${UPSTREAM:alpha}.
PLACEHOLDER = re.compile(r'"?\$\{((?:GATEWAY_PORT|UPSTREAM):[\w.-]+)\}"?')
START_TIMEOUT = 20.0
FOLLOW_TIMEOUT = 10.0


@dataclass
class Mesh:
    """What the tests share: the control plane, the two gateways and the upstreams."""

    client: Client
    envoy: RunningProxy
    ubimesh: RunningProxy
    pool: EchoServerPool
    ports: dict[str, int]


def render(text: str, ports: dict[str, int]) -> str:
    """``text`` with every placeholder replaced by its port number (quotes dropped, so the
    number is a YAML integer)."""

    def repl(m: re.Match[str]) -> str:
        if m.group(1) not in ports:
            raise KeyError(f"{m.group(0)}: no such port; known: {sorted(ports)}")
        return str(ports[m.group(1)])

    return PLACEHOLDER.sub(repl, text)


def wait_for(what: str, check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def start_control(workdir: Path) -> tuple[ManagedProcess, dict[str, Any]]:
    """``ubimesh control`` on ports 0 with its SQLite store in ``workdir``; its control.json."""
    proc = ManagedProcess(
        "control",
        [sys.executable, "-m", "ubimesh.cli.main", "control", "--data-dir", str(workdir),
         "--api-address", "127.0.0.1:0", "--xds-address", "127.0.0.1:0", "-l", "warning"],
        workdir / "control.log",
        workdir,
    )
    addresses = workdir / "control.json"
    try:
        wait_for("control.json", lambda: addresses.exists() or not proc.alive, START_TIMEOUT)
        if not proc.alive:
            raise ProcessStartError(f"ubimesh control exited\n{proc.describe()}")
        info: dict[str, Any] = json.loads(addresses.read_text())
        info["token"] = (workdir / "admin-token").read_text().strip()
    except BaseException:
        proc.stop()
        raise
    return proc, info


def hang_socket() -> socket.socket:
    """A listening socket that is never accepted from: the kernel completes connections (up
    to the backlog), the request is buffered, and no answer ever comes."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    return sock


def launch_gateway(
    kind: str, workdir: Path, xds: str, listener_port: int, admin_port: int,
    upstream_ports: dict[str, int],
) -> RunningProxy:
    bootstrap = build_bootstrap(
        node_id=f"edge-{kind}.default", role="gateway", xds=[parse_address(xds)],
        admin_port=admin_port,
    )
    config = workdir / f"{kind}.bootstrap.yaml"
    config.write_text(yaml.safe_dump(bootstrap, sort_keys=False))
    launcher = launch_envoy if kind == "envoy" else launch_ubimesh
    proc = launcher(config, workdir, name=kind)
    ports = {"LISTENER:main": listener_port, "ADMIN_PORT": admin_port, **upstream_ports}
    return RunningProxy(kind, kind, proc, ports, config)


def await_both(proxies: list[RunningProxy]) -> None:
    """Wait for both gateways at once (each: /ready 200 once its first ADS config is applied,
    and its gateway listener accepting)."""
    errors: list[BaseException] = []

    def wait(proxy: RunningProxy) -> None:
        try:
            wait_ready(proxy.proc, proxy.ports["ADMIN_PORT"], [proxy.listener_port("main")],
                       START_TIMEOUT)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=wait, args=(p,)) for p in proxies]
    for t in threads:
        t.start()
    for t in threads:
        t.join(START_TIMEOUT + 5)
    if errors:
        raise errors[0]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    ok, why = ubimesh_available()
    if not ok:
        pytest.skip(f"`ubimesh proxy` is not runnable:\n{why}")
    workdir = tmp_path_factory.mktemp("control-differential")
    pool = EchoServerPool()
    hang = hang_socket()
    started: list[ManagedProcess] = []
    try:
        upstream_ports = {f"UPSTREAM:{n}": pool.port(n) for n in ECHO_UPSTREAMS}
        upstream_ports["UPSTREAM:hang"] = hang.getsockname()[1]
        control, info = start_control(workdir)
        started.append(control)
        client = Client(info["api"], info["token"], timeout=10)
        envoy_port, ubimesh_port, envoy_admin, ubimesh_admin = free_ports(4)
        ports = {
            **upstream_ports,
            "GATEWAY_PORT:envoy": envoy_port,
            "GATEWAY_PORT:ubimesh": ubimesh_port,
        }
        text = render((CASES_DIR / "mesh.yaml").read_text(), ports)
        try:
            client.apply([("mesh.yaml", text)])
        except ApiError as exc:
            raise AssertionError("mesh.yaml refused:\n" + "\n".join(exc.lines())) from None
        proxies = [
            launch_gateway("envoy", workdir, info["xds"], envoy_port, envoy_admin,
                           upstream_ports),
            launch_gateway("ubimesh", workdir, info["xds"], ubimesh_port, ubimesh_admin,
                           upstream_ports),
        ]
        started.extend(p.proc for p in proxies)
        try:
            await_both(proxies)
        except ProcessStartError as exc:
            pytest.fail(f"{exc}\n{control.describe()}", pytrace=False)
        yield Mesh(client, proxies[0], proxies[1], pool, ports)
    finally:
        for proc in reversed(started):
            proc.stop()
        hang.close()
        pool.close()


def compare(mesh: Mesh, case: Case) -> None:
    """Send ``case`` through both gateways; fail naming the case on any difference."""
    ref, sub = mesh.envoy, mesh.ubimesh
    ref_obs = run_case(mesh.pool, ref, case)
    broken = [
        f"request #{i} ({spec.label()}): {problem}"
        for i, (spec, obs) in enumerate(zip(case.requests, ref_obs, strict=True))
        for problem in check_expectations(spec, obs)
    ]
    if broken:
        pytest.fail(
            f"case {case.id} does not hold against Envoy itself (fix the case):\n  "
            + "\n  ".join(broken) + f"\n{json.dumps(ref_obs, indent=1)[:3000]}",
            pytrace=False,
        )
    sub_obs = run_case(mesh.pool, sub, case)
    dump_dir = os.environ.get("UBIMESH_DIFF_DUMP")
    if dump_dir:
        out = Path(dump_dir) / f"control__{case.suite.name}__{case.name}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({ref.label: ref_obs, sub.label: sub_obs}, indent=2))
    for proxy in (ref, sub):
        if not proxy.proc.alive:
            pytest.fail(f"{proxy.label} died during case {case.id}\n{proxy.proc.describe()}")
    if ref_obs != sub_obs:
        pytest.fail(
            describe_difference(case, ref.label, sub.label, ref_obs, sub_obs)
            + f"\n\n{sub.proc.describe()}",
            pytrace=False,
        )


def test_enough_cases() -> None:
    requests = sum(len(c.requests) for c in CASES)
    assert len(CASES) >= 25, f"only {len(CASES)} cases"
    assert requests >= 50, f"only {requests} requests"


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(c, id=c.name, marks=[pytest.mark.xfail(reason=XFAIL[c.name], strict=True)])
        if c.name in XFAIL
        else pytest.param(c, id=c.name)
        for c in CASES
    ],
)
def test_same_routes(case: Case, mesh: Mesh) -> None:
    compare(mesh, case)


def late_status(proxy: RunningProxy) -> tuple[int, str]:
    """Status of GET /late through ``proxy`` and the x-late-response header it carries."""
    conn = socket.create_connection(("127.0.0.1", proxy.listener_port("main")), timeout=2.0)
    try:
        conn.sendall(b"GET /late/probe HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n")
        data = b""
        deadline = time.monotonic() + 2.0
        while b"\r\n\r\n" not in data and time.monotonic() < deadline:
            chunk = conn.recv(4096)
            if not chunk:
                break
            data += chunk
    finally:
        conn.close()
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    status = int(head[0].split()[1])
    header = next((line.split(":", 1)[1].strip() for line in head[1:]
                   if line.lower().startswith("x-late-response:")), "")
    return status, header


def serves_late(proxy: RunningProxy) -> Callable[[], bool]:
    def check() -> bool:
        try:
            return late_status(proxy) == (200, "yes")
        except (OSError, ValueError, IndexError):
            return False

    return check


def test_a_change_reaches_both(mesh: Mesh) -> None:
    """A new HTTPRoute applied through the API reaches both gateways, and they still agree."""
    for proxy in (mesh.envoy, mesh.ubimesh):
        assert late_status(proxy)[0] == 404, f"{proxy.label} routes /late before the change"
    mesh.client.apply([("change.yaml", (CASES_DIR / "change.yaml").read_text())])
    started = time.monotonic()
    for proxy in (mesh.envoy, mesh.ubimesh):
        wait_for(f"{proxy.label} to serve the new route", serves_late(proxy), FOLLOW_TIMEOUT)
    assert time.monotonic() - started < FOLLOW_TIMEOUT * 2
    for case in AFTER_CHANGE:
        compare(mesh, case)


def test_bad_placeholder_is_named() -> None:
    with pytest.raises(KeyError, match="UPSTREAM:nope"):
        render("port: ${UPSTREAM:nope}", {})


def test_mesh_renders_to_integers() -> None:
    text = render((CASES_DIR / "mesh.yaml").read_text(),
                  {f"UPSTREAM:{n}": 1000 + i for i, n in enumerate((*ECHO_UPSTREAMS, "hang"))}
                  | {"GATEWAY_PORT:envoy": 2001, "GATEWAY_PORT:ubimesh": 2002})
    docs = list(yaml.safe_load_all(text))
    gateways = [d for d in docs if d["kind"] == "Gateway"]
    assert [g["spec"]["listeners"][0]["port"] for g in gateways] == [2001, 2002]
    assert "${" not in text

