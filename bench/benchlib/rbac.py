"""Scenario ``rbac``: what an RBAC filter with 100 policies costs on the request path (issue 5
bar: at most 10 % of throughput against no RBAC).

Two targets, both ubimesh with one worker, on the S1 setup (``configs.ubimesh_bootstrap``:
plain HTTP/1.1, one route, the nginx upstream), measured closed-loop with wrk:

* ``ubimesh``: the S1 bootstrap as it is;
* ``ubimesh-rbac``: the same with an ``envoy.filters.http.rbac`` filter before the router,
  ALLOW rules of 100 policies named ``p000`` to ``p099`` (tried in that order):

  - ``p000``-``p049``: any permission, principal ``authenticated`` with ``principal_name``
    exact on 50 different SPIFFE IDs (a mesh's source identities);
  - ``p050``-``p074``: ``:method`` GET and ``url_path`` prefix ``/svc-NN/`` (route rules);
  - ``p075``-``p098``: header ``x-tenant`` exact ``tenant-NN``;
  - ``p099``: ``url_path`` exact on the benchmark's paths (``/1k``, ...): the one the requests
    match, the last policy.

  Plain HTTP has no peer identity, so the proxy settles the 50 identity policies once per
  connection (docs/policy.md, "Speed"); the other 49 are evaluated for every request before
  the matching one.

The report adds the bar: rps of ``ubimesh-rbac`` divided by rps of ``ubimesh``, PASS at 0.90 or
more, per size and load.
"""

from __future__ import annotations

import copy
from typing import Any

from benchlib import configs, report

PRODUCTS = ("ubimesh",)
PLAIN = "ubimesh"
WITH_RBAC = "ubimesh-rbac"
TARGETS = (PLAIN, WITH_RBAC)
POLICIES = 100
BAR = 0.90
HTTP_RBAC_TYPE = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"


def _any() -> list[dict[str, Any]]:
    return [{"any": True}]


def policies(paths: list[str]) -> dict[str, Any]:
    """The 100 policies (see the module docstring); ``paths`` are what the load requests."""
    out: dict[str, Any] = {}
    for i in range(50):
        sid = f"spiffe://bench.local/ns/ns-{i:02}/sa/client-{i:02}"
        out[f"p{i:03}"] = {
            "permissions": _any(),
            "principals": [{"authenticated": {"principal_name": {"exact": sid}}}],
        }
    for i in range(50, 75):
        rules = [
            {"header": {"name": ":method", "string_match": {"exact": "GET"}}},
            {"url_path": {"path": {"prefix": f"/svc-{i:02}/"}}},
        ]
        out[f"p{i:03}"] = {"permissions": [{"and_rules": {"rules": rules}}], "principals": _any()}
    for i in range(75, POLICIES - 1):
        out[f"p{i:03}"] = {
            "permissions": [
                {"header": {"name": "x-tenant", "string_match": {"exact": f"tenant-{i}"}}}
            ],
            "principals": _any(),
        }
    out[f"p{POLICIES - 1:03}"] = {
        "permissions": [
            {"or_rules": {"rules": [{"url_path": {"path": {"exact": p}}} for p in paths]}}
        ],
        "principals": _any(),
    }
    return out


def rbac_bootstrap(
    listen_port: int, admin_port: int, upstream_port: int, sizes: list[str]
) -> dict[str, Any]:
    """The S1 bootstrap with the RBAC filter in front of the router."""
    cfg = copy.deepcopy(configs.ubimesh_bootstrap(listen_port, admin_port, upstream_port))
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    rbac = {
        "name": "envoy.filters.http.rbac",
        "typed_config": {
            "@type": HTTP_RBAC_TYPE,
            "rules": {"action": "ALLOW", "policies": policies([f"/{s}" for s in sizes])},
        },
    }
    hcm["http_filters"].insert(0, rbac)
    return cfg


def bootstrap(
    target: str, listen: int, admin: int, upstream: int, sizes: list[str]
) -> dict[str, Any]:
    if target == PLAIN:
        return configs.ubimesh_bootstrap(listen, admin, upstream)
    if target == WITH_RBAC:
        return rbac_bootstrap(listen, admin, upstream, sizes)
    raise ValueError(f"unknown target {target!r} for --scenario rbac")


def bar_section(rows: list[dict[str, Any]]) -> str:
    """Markdown: rps with and without RBAC, their ratio, and the bar per size and load."""
    return report.ratio_bar_section(
        rows,
        heading="RBAC with 100 policies: the bar",
        bar_text=(
            f"Bar (issue 5): throughput with RBAC is at least {BAR:.0%} of throughput without it "
            "(closed loop, same proxy, same run). Medians over repetitions."
        ),
        plain=PLAIN,
        subject=WITH_RBAC,
        bar=BAR,
        without="without RBAC",
        with_="with RBAC",
    )
