"""The access log translator (ubimesh.proxy.xds.access_log): HCM, tcp_proxy and listener
access logs become AccessLogConfig; what ubimesh cannot do is refused with the field path and
the reason (the unknown command named)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from ubimesh.proxy.snapshot.types import (
    AccessLogConfig,
    AccessLogFilter,
    HttpConnectionManagerConfig,
    Snapshot,
    TcpProxyConfig,
)
from ubimesh.proxy.xds import ConfigErrors
from ubimesh.proxy.xds.bootstrap import load_bootstrap_dict

CONFIGS = Path(__file__).parent / "configs"
FILE = "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog"
STDOUT = "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog"
STDERR = "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StderrAccessLog"
HCM_PATH = "static_resources.listeners[0].filter_chains[0].filters[0].typed_config"


def minimal() -> dict[str, Any]:
    loaded = yaml.safe_load((CONFIGS / "minimal.yaml").read_text())
    assert isinstance(loaded, dict)
    return loaded


def hcm_of(doc: dict[str, Any]) -> dict[str, Any]:
    hcm: dict[str, Any] = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"
    ]
    assert "HttpConnectionManager" in hcm["@type"]
    return hcm


def with_hcm_logs(*logs: dict[str, Any]) -> Snapshot:
    doc = minimal()
    hcm_of(doc)["access_log"] = list(logs)
    return load_bootstrap_dict(doc)


def hcm_logs(snapshot: Snapshot) -> tuple[AccessLogConfig, ...]:
    terminal = snapshot.listeners[0].filter_chains[0].filters[-1]
    assert isinstance(terminal, HttpConnectionManagerConfig)
    return terminal.access_log


def errors_of(*logs: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(ConfigErrors) as info:
        with_hcm_logs(*logs)
    return [(e.path, e.message) for e in info.value.errors]


def test_file_logger_with_default_format(tmp_path: Path) -> None:
    path = str(tmp_path / "access.log")
    (log,) = hcm_logs(with_hcm_logs({"name": "f", "typed_config": {"@type": FILE, "path": path}}))
    assert log == AccessLogConfig(name="f", path=path)


def test_formats_and_stream_loggers() -> None:
    snap = with_hcm_logs(
        {
            "name": "text",
            "typed_config": {
                "@type": FILE,
                "path": "/dev/stdout",
                "log_format": {
                    "text_format_source": {"inline_string": "%RESPONSE_CODE%\n"},
                    "omit_empty_values": True,
                },
            },
        },
        {
            "name": "json",
            "typed_config": {
                "@type": STDERR,
                "log_format": {"json_format": {"z": "%DURATION%", "a": {"n": 1, "b": True}}},
            },
        },
        {"name": "legacy", "typed_config": {"@type": STDOUT}},
        {
            "name": "old",
            "typed_config": {"@type": FILE, "path": "/dev/null", "format": "%BYTES_SENT%"},
        },
    )
    text, js, legacy, old = hcm_logs(snap)
    assert (text.path, text.text_format, text.omit_empty_values) == (
        "/dev/stdout",
        "%RESPONSE_CODE%\n",
        True,
    )
    assert js.path == "/dev/stderr" and js.text_format is None
    assert json.loads(js.json_format) == {"a": {"b": True, "n": 1}, "z": "%DURATION%"}
    assert js.json_format.index('"a"') < js.json_format.index('"z"')
    assert legacy == AccessLogConfig(name="legacy", path="/dev/stdout")
    assert old.text_format == "%BYTES_SENT%"


def test_filters_are_translated() -> None:
    (log,) = hcm_logs(
        with_hcm_logs(
            {
                "name": "f",
                "filter": {
                    "or_filter": {
                        "filters": [
                            {
                                "status_code_filter": {
                                    "comparison": {
                                        "op": "GE",
                                        "value": {"default_value": 500, "runtime_key": "k"},
                                    }
                                }
                            },
                            {"response_flag_filter": {"flags": ["UH", "NR"]}},
                            {"not_health_check_filter": {}},
                        ]
                    }
                },
                "typed_config": {"@type": STDOUT},
            }
        )
    )
    assert log.filter == AccessLogFilter(
        "or_filter",
        filters=(
            AccessLogFilter("status_code_filter", op="GE", value=500),
            AccessLogFilter("response_flag_filter", flags=("UH", "NR")),
            AccessLogFilter("not_health_check_filter"),
        ),
    )


def test_unknown_command_is_refused_with_its_name() -> None:
    errors = errors_of(
        {
            "name": "f",
            "typed_config": {
                "@type": STDOUT,
                "log_format": {"text_format_source": {"inline_string": "%REQUEST_DURATION%"}},
            },
        }
    )
    assert len(errors) == 1
    path, message = errors[0]
    assert path == HCM_PATH + ".access_log[0].typed_config.log_format.text_format_source"
    assert "%REQUEST_DURATION% is not supported" in message


def test_unsupported_fields_and_filters_are_refused(tmp_path: Path) -> None:
    errors = errors_of(
        {
            "name": "a",
            "filter": {"header_filter": {"header": {"name": "x", "present_match": True}}},
            "typed_config": {"@type": STDOUT},
        },
        {
            "name": "b",
            "typed_config": {
                "@type": STDOUT,
                "log_format": {"text_format": "x", "content_type": "text/plain"},
            },
        },
        {"name": "c", "typed_config": {"@type": FILE, "path": str(tmp_path / "no" / "x.log")}},
        {
            "name": "d",
            "typed_config": {"@type": STDOUT, "log_format": {"json_format": {"l": ["a"]}}},
        },
    )
    paths = {p: m for p, m in errors}
    base = HCM_PATH + ".access_log"
    assert "status_code_filter" in paths[base + "[0].filter.header_filter"]
    assert "local reply" in paths[base + "[1].typed_config.log_format.content_type"]
    assert "does not exist" in paths[base + "[2].typed_config.path"]
    assert "nested objects" in paths[base + "[3].typed_config.log_format.json_format"]
    assert len(errors) == 4


def test_tcp_proxy_and_listener_logs() -> None:
    doc = yaml.safe_load(
        f"""
static_resources:
  listeners:
  - name: tcp
    address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
    access_log:
    - name: l
      typed_config: {{"@type": {STDOUT}}}
    filter_chains:
    - filters:
      - name: tcp
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: t
          cluster: c
          access_log:
          - name: t
            typed_config: {{"@type": {STDERR}}}
  clusters:
  - name: c
    type: STATIC
    load_assignment:
      cluster_name: c
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 1}}}}}}
"""
    )
    snap = load_bootstrap_dict(doc)
    listener = snap.listeners[0]
    assert listener.access_log == (AccessLogConfig(name="l", path="/dev/stdout"),)
    tcp = listener.filter_chains[0].filters[-1]
    assert isinstance(tcp, TcpProxyConfig)
    assert tcp.access_log == (AccessLogConfig(name="t", path="/dev/stderr"),)
