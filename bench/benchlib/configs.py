"""Configuration generators for the upstream and for every proxy under test.

All generators return text (or a dict for the Envoy-style bootstraps) and never touch the
filesystem themselves; ``write_text`` does that. Every socket is bound to 127.0.0.1.

Equivalence of the proxy configs (performance.md section 4, S1):

* one worker each (the caller passes ``--concurrency 1`` / ``worker_processes 1`` /
  ``nbthread 1``), keep-alive on both legs, one catch-all route, no access log;
* nginx talks HTTP/1.1 with keep-alive to the upstream (``proxy_http_version 1.1``,
  ``proxy_set_header Connection ""``, ``keepalive 64``);
* HAProxy reuses upstream connections (``http-reuse always``);
* Envoy gets the "bare" profile: no request ids, no dynamic router stats, circuit breakers
  raised out of the way.

Per-connection request limits (nginx closes a keep-alive connection after 1000 requests by
default) are raised everywhere, so that no product pays for reconnects the others do not.
"""

from __future__ import annotations

import copy
import resource
from pathlib import Path
from typing import Any

import yaml

LOCALHOST = "127.0.0.1"
HCM_TYPE = (
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
    "HttpConnectionManager"
)
ROUTER_TYPE = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
CLUSTER_NAME = "upstream"

# nginx refuses a single configuration token longer than its 4 KB parse buffer, so the
# 16 KB body is assembled from variables of at most this many bytes.
_NGINX_CHUNK = 2048
# Effectively unlimited requests per keep-alive connection.
_KEEPALIVE_REQUESTS = 1_000_000
BIG = 1_000_000_000


#: The upstream's span sink (Zipkin's ingest path; the telemetry scenario's collector).
SPANS_PATH = "/api/v2/spans"


def body_bytes(size: int) -> str:
    """A deterministic printable body of exactly ``size`` bytes (no quotes or escapes)."""
    pattern = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
    return (pattern * (size // len(pattern) + 1))[:size]


def _socket_address(port: int) -> dict[str, Any]:
    return {"socket_address": {"address": LOCALHOST, "port_value": port}}


# --------------------------------------------------------------------------------------
# Envoy v3 bootstraps
# --------------------------------------------------------------------------------------


def ubimesh_bootstrap(listen_port: int, admin_port: int, upstream_port: int) -> dict[str, Any]:
    """The common bootstrap: listener -> HCM -> one route -> STATIC cluster.

    It uses only the subset of fields the ubimesh proxy accepts (see bench/README.md); do
    not add fields here. Fields that only Envoy gets belong in ``envoy_bare_bootstrap``.
    """
    hcm = {
        "@type": HCM_TYPE,
        "stat_prefix": "ingress_http",
        "generate_request_id": False,
        "route_config": {
            "virtual_hosts": [
                {
                    # Both Envoy's and ubimesh's validation reject a nameless virtual host.
                    "name": "local",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": CLUSTER_NAME}}],
                }
            ]
        },
        "http_filters": [
            {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER_TYPE}}
        ],
    }
    return {
        "admin": {"address": _socket_address(admin_port)},
        "static_resources": {
            "listeners": [
                {
                    "address": _socket_address(listen_port),
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": hcm,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                {
                    "name": CLUSTER_NAME,
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "load_assignment": {
                        "cluster_name": CLUSTER_NAME,
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {"endpoint": {"address": _socket_address(upstream_port)}}
                                ]
                            }
                        ],
                    },
                }
            ],
        },
    }


def envoy_bare_bootstrap(listen_port: int, admin_port: int, upstream_port: int) -> dict[str, Any]:
    """The common bootstrap plus the Envoy-only "bare" profile.

    Added on top of ``ubimesh_bootstrap``:

    * router ``dynamic_stats: false`` (Envoy's benchmarking guidance);
    * circuit-breaker thresholds raised so that they never trip under the benchmark.
    """
    cfg = copy.deepcopy(ubimesh_bootstrap(listen_port, admin_port, upstream_port))
    listener = cfg["static_resources"]["listeners"][0]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    for http_filter in hcm["http_filters"]:
        if http_filter["name"] == "envoy.filters.http.router":
            http_filter["typed_config"]["dynamic_stats"] = False
    cluster = cfg["static_resources"]["clusters"][0]
    cluster["circuit_breakers"] = {
        "thresholds": [
            {
                "priority": priority,
                "max_connections": BIG,
                "max_pending_requests": BIG,
                "max_requests": BIG,
                "max_retries": BIG,
            }
            for priority in ("DEFAULT", "HIGH")
        ]
    }
    return cfg


def dump_yaml(cfg: dict[str, Any]) -> str:
    return yaml.safe_dump(cfg, sort_keys=False, default_flow_style=False)


# --------------------------------------------------------------------------------------
# nginx
# --------------------------------------------------------------------------------------


def max_connections() -> int:
    """Connections per proxy that fit in the open-file limit (each may need 2 fds)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = soft if soft != resource.RLIM_INFINITY else 65536
    return max(256, min(8192, (limit - 128) // 2))


def _nginx_prelude(workdir: Path, name: str) -> str:
    """Settings common to both nginx instances; paths stay inside ``workdir``."""
    return f"""\
daemon off;
master_process on;
worker_processes 1;
pid {workdir}/{name}.pid;
error_log {workdir}/{name}.error.log warn;
events {{
    worker_connections {max_connections()};
}}
"""


def _nginx_http_common(workdir: Path, name: str) -> str:
    return f"""\
    access_log off;
    keepalive_requests {_KEEPALIVE_REQUESTS};
    keepalive_timeout 300s;
    client_body_temp_path {workdir}/{name}.tmp/body;
    proxy_temp_path {workdir}/{name}.tmp/proxy;
    fastcgi_temp_path {workdir}/{name}.tmp/fastcgi;
    uwsgi_temp_path {workdir}/{name}.tmp/uwsgi;
    scgi_temp_path {workdir}/{name}.tmp/scgi;
"""


def _nginx_return_body(size: int) -> tuple[str, str]:
    """(``set`` directives, ``return`` argument) producing a body of ``size`` bytes."""
    body = body_bytes(size)
    if size <= _NGINX_CHUNK:
        return "", f'"{body}"'
    chunks = [body[i : i + _NGINX_CHUNK] for i in range(0, size, _NGINX_CHUNK)]
    sets = "".join(f'            set $b{i} "{c}";\n' for i, c in enumerate(chunks))
    joined = "".join(f"$b{i}" for i in range(len(chunks)))
    return sets, f'"{joined}"'


def nginx_upstream_conf(workdir: Path, port: int, sizes: dict[str, int]) -> str:
    """The upstream: ``return 200`` with a fixed body per size, at ``/<size-label>``.

    ``GET /1k`` answers 1024 bytes, ``GET /16k`` 16384 bytes, and so on.
    """
    locations = []
    for label, size in sizes.items():
        sets, arg = _nginx_return_body(size)
        locations.append(
            f"        location = /{label} {{\n{sets}            return 200 {arg};\n        }}\n"
        )
    return (
        _nginx_prelude(workdir, "upstream")
        + "http {\n"
        + _nginx_http_common(workdir, "upstream")
        + "    default_type application/octet-stream;\n"
        + f"    server {{\n        listen {LOCALHOST}:{port};\n"
        + "".join(locations)
        # Where the telemetry scenario's proxies send their spans (Zipkin's endpoint): taken
        # and dropped, so that the figures are the proxy's cost, not a collector's.
        + f"        location = {SPANS_PATH} {{\n            return 202;\n        }}\n"
        + "        location / {\n            return 404;\n        }\n"
        + "    }\n}\n"
    )


def nginx_proxy_conf(workdir: Path, port: int, ready_port: int, upstream_port: int) -> str:
    """nginx as a reverse proxy with upstream keep-alive (fairness rule 4)."""
    return (
        _nginx_prelude(workdir, "nginx-proxy")
        + "http {\n"
        + _nginx_http_common(workdir, "nginx-proxy")
        + f"""\
    upstream backend {{
        server {LOCALHOST}:{upstream_port};
        keepalive 64;
        keepalive_requests {_KEEPALIVE_REQUESTS};
        keepalive_timeout 300s;
    }}
    server {{
        listen {LOCALHOST}:{port};
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
    server {{
        listen {LOCALHOST}:{ready_port};
        location = /ready {{
            return 200 "ready\\n";
        }}
    }}
}}
"""
    )


# --------------------------------------------------------------------------------------
# HAProxy
# --------------------------------------------------------------------------------------


def haproxy_conf(port: int, ready_port: int, upstream_port: int, cpu: int) -> str:
    """HAProxy with one thread pinned to ``cpu`` and upstream connection reuse."""
    return f"""\
global
    nbthread 1
    cpu-map 1/1 {cpu}
    maxconn {max_connections()}

defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 5s
    timeout client 300s
    timeout server 60s
    timeout http-keep-alive 300s

frontend ready
    bind {LOCALHOST}:{ready_port}
    monitor-uri /ready

frontend bench
    bind {LOCALHOST}:{port}
    default_backend upstream

backend upstream
    server up {LOCALHOST}:{upstream_port}
"""


def write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path
