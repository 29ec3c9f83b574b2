"""``ubimesh top``'s I/O (ubimesh.cli.top_cmds): which claimed admin addresses are scraped, the
admin address in generated bootstraps, and the command against real HTTP servers on loopback
that serve crafted metrics pages (a real proxy's are in tests/integration/test_top_mesh.py)."""

from __future__ import annotations

import contextlib
import http.server
import json
import socket
import threading
from collections.abc import Iterator

import pytest

from ubimesh.cli.main import main
from ubimesh.cli.top_live import admin_url, peer_ip, proxy_target
from ubimesh.control.bootstrap import ADMIN_ADDRESS_KEY, build_bootstrap

LOCAL_API = "http://127.0.0.1:15000"


def metrics_page(ok: int, failed: int, fast: int, slow: int) -> str:
    """Istio's two metrics for service web: ``fast`` requests took <= 5 ms, ``slow`` 25-50 ms."""
    labels = 'reporter="destination",destination_service="web.default.svc.cluster.local"'
    return "\n".join(
        [
            "# TYPE istio_requests_total counter",
            f'istio_requests_total{{{labels},response_code="200"}} {ok}',
            f'istio_requests_total{{{labels},response_code="500"}} {failed}',
            "# TYPE istio_request_duration_milliseconds histogram",
            f'istio_request_duration_milliseconds_bucket{{{labels},le="5"}} {fast}',
            f'istio_request_duration_milliseconds_bucket{{{labels},le="25"}} {fast}',
            f'istio_request_duration_milliseconds_bucket{{{labels},le="50"}} {fast + slow}',
            f'istio_request_duration_milliseconds_bucket{{{labels},le="+Inf"}} {fast + slow}',
            f"istio_request_duration_milliseconds_count{{{labels}}} {fast + slow}",
            "",
        ]
    )


@contextlib.contextmanager
def serving(pages: list[str], status: int = 200) -> Iterator[str]:
    """An HTTP server on 127.0.0.1 answering its n-th GET /stats/prometheus with pages[n] (the
    last one from then on); yields its base URL."""
    served = [0]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path != "/stats/prometheus":
                self.send_error(404)
                return
            body = pages[min(served[0], len(pages) - 1)].encode()
            served[0] += 1
            self.send_response(status)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- addresses ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "url"),
    [
        ("127.0.0.1:15000", "http://127.0.0.1:15000/stats/prometheus"),
        ("http://127.0.0.1:15000/", "http://127.0.0.1:15000/stats/prometheus"),
        ("http://[::1]:9901", "http://[::1]:9901/stats/prometheus"),
        ("https://h.example/metrics?x=1", "https://h.example/metrics?x=1"),
    ],
)
def test_admin_urls(given: str, url: str) -> None:
    assert admin_url(given) == url


@pytest.mark.parametrize("bad", ["ftp://127.0.0.1:1", "http://", "http://h:notaport"])
def test_bad_admin_urls_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match=r"scheme|not an admin URL"):
        admin_url(bad)


def test_grpc_peers() -> None:
    assert peer_ip("ipv4:10.1.2.3:5555") == "10.1.2.3"
    assert peer_ip("ipv6:[::1]:5555") == "::1"
    assert peer_ip("ipv6:%5B::1%5D:5555") == "::1"
    assert peer_ip("unix:/tmp/x") is None


def _proxy(admin: str, peer: str = "ipv4:127.0.0.1:40000") -> dict[str, str]:
    return {"id": "web-1.default", "adminAddress": admin, "peer": peer}


@pytest.mark.parametrize(
    ("proxy", "api", "url", "note"),
    [
        (_proxy("127.0.0.1:15001"), LOCAL_API, "http://127.0.0.1:15001/stats/prometheus", ""),
        (
            _proxy("[::1]:15001", "ipv6:%5B::1%5D:1"),
            LOCAL_API,
            "http://[::1]:15001/stats/prometheus",
            "",
        ),
        (
            _proxy("10.0.0.5:15001", "ipv4:10.0.0.5:1"),
            "http://10.0.0.1:15000",
            "http://10.0.0.5:15001/stats/prometheus",
            "",
        ),
        # an unspecified address: the one the proxy connected from
        (
            _proxy("0.0.0.0:15001", "ipv4:10.0.0.7:1"),
            "http://10.0.0.1:15000",
            "http://10.0.0.7:15001/stats/prometheus",
            "",
        ),
        ({"id": "envoy.default", "peer": "ipv4:127.0.0.1:1"}, LOCAL_API, "", "no admin address"),
        # claims are not followed elsewhere
        (
            _proxy("10.0.0.9:15001", "ipv4:10.0.0.5:1"),
            LOCAL_API,
            "",
            "not the address the proxy connected from (10.0.0.5); pass --proxy",
        ),
        (_proxy("169.254.169.254:80", "ipv4:10.0.0.5:1"), LOCAL_API, "", "--proxy http://169"),
        (
            _proxy("127.0.0.1:15001", "ipv4:10.0.0.5:1"),
            LOCAL_API,
            "",
            "loopback but the proxy connected from 10.0.0.5",
        ),
        (
            _proxy("127.0.0.1:15001"),
            "http://10.0.0.1:15000",
            "",
            "loopback on the control plane's host",
        ),
        (_proxy("metadata.internal:80"), LOCAL_API, "", "is not IP:PORT"),
        (_proxy("127.0.0.1:0"), LOCAL_API, "", "port 0"),
    ],
)
def test_which_claimed_admin_addresses_are_scraped(
    proxy: dict[str, str], api: str, url: str, note: str
) -> None:
    target = proxy_target(proxy, api)
    assert target.url == url
    assert note in target.note
    assert bool(target.note) == (not url)


def test_generated_bootstraps_carry_the_admin_address() -> None:
    def meta(**kwargs: object) -> dict[str, object]:
        boot = build_bootstrap(node_id="web-1.default", xds=[("127.0.0.1", 15010)], **kwargs)  # type: ignore[arg-type]
        return dict(boot["node"]["metadata"])

    assert meta(admin_port=15001)[ADMIN_ADDRESS_KEY] == "127.0.0.1:15001"
    assert meta(admin_port=15001, admin_address="::1")[ADMIN_ADDRESS_KEY] == "[::1]:15001"
    assert ADMIN_ADDRESS_KEY not in meta()
    assert ADMIN_ADDRESS_KEY not in meta(admin_port=0)


# -- the command ----------------------------------------------------------------------------


def test_once_json_measures_each_proxy_between_two_scrapes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Between the two scrapes: 40 OK and 10 x 500, 25 fast and 25 slow.
    pages = [metrics_page(100, 10, 110, 0), metrics_page(140, 20, 135, 25)]
    dead = f"127.0.0.1:{closed_port()}"
    with serving(pages) as url:
        code = main(
            ["top", "--once", "--json", "--interval", "300ms", "--proxy", url, "--proxy", dead]
        )
    out = capsys.readouterr().out
    assert code == 0, out
    doc = json.loads(out)
    (web,) = doc["services"]
    assert web["service"] == "web.default.svc.cluster.local"
    assert web["requests"] == 50 and web["errors"] == 10
    assert web["successRate"] == pytest.approx(0.8)
    # One interval apart, give or take the scrapes' own time (dt >= 0.15 s whatever it is).
    assert 50 / 2.0 < web["rps"] < 50 / 0.15
    assert web["p50Ms"] == pytest.approx(5.0)  # rank 25: the last of the fast ones
    assert web["p99Ms"] == pytest.approx(25 + 25 * (49.5 - 25) / 25)
    assert web["proxies"] == 1
    status = {p["url"]: p for p in doc["proxies"]}
    assert status[url + "/stats/prometheus"]["status"] == "ok"
    down = status[f"http://{dead}/stats/prometheus"]
    assert down["status"] == "unreachable" and "refused" in down["reason"].lower()


def test_once_table_lists_what_could_not_be_scraped(capsys: pytest.CaptureFixture[str]) -> None:
    with (
        serving([metrics_page(0, 0, 0, 0), metrics_page(10, 0, 10, 0)]) as good,
        serving(['istio_requests_total{reporter="destination" 1\n']) as bad,
    ):
        code = main(["top", "--once", "--interval", "200ms", "--proxy", good, "--proxy", bad])
    out = capsys.readouterr().out
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0].startswith("ubimesh top - ")
    assert "1 proxies measured" in lines[0]
    header = next(i for i, line in enumerate(lines) if line.startswith("SERVICE"))
    assert lines[header].split() == ["SERVICE", "RPS", "SUCCESS", "P50", "P99", "PROXIES"]
    assert lines[header + 1].split()[0] == "web.default.svc.cluster.local"
    assert lines[header + 1].split()[2] == "100.0%"
    assert any(
        line.startswith("unreachable") and "unreadable metrics: line 1" in line for line in lines
    ), out
    assert "\x1b[" not in out  # not a terminal: no escape sequences


def test_once_exits_1_when_nothing_could_be_measured(capsys: pytest.CaptureFixture[str]) -> None:
    with serving(["oops"], status=503) as url:
        code = main(["top", "--once", "--json", "--interval", "100ms", "--proxy", url])
    captured = capsys.readouterr()
    assert code == 1
    (proxy,) = json.loads(captured.out)["proxies"]
    assert proxy["status"] == "unreachable" and proxy["reason"].startswith("HTTP 503")
    assert "no proxy could be measured" in captured.err


def test_an_unreachable_control_plane_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["top", "--once", "--server", f"http://127.0.0.1:{closed_port()}", "--token", "t"])
    assert code == 1
    assert "cannot reach the control plane" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--interval", "soon"], "--interval: 'soon' is not a duration"),
        (["--interval", "0"], "--interval: '0' must be more than 0"),
        (["--proxy", "ftp://x:1"], "--proxy: 'ftp://x:1': scheme 'ftp'"),
    ],
)
def test_usage_errors_name_the_flag(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["top", "--once", *flags]) == 2
    assert message in capsys.readouterr().err
