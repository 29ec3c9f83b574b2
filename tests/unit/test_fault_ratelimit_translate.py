"""The fault and local rate limit filters: translation from Envoy's protos (what comes out,
what is refused, with the field path and the fix), the token bucket's arithmetic, and how the
HCM builds its decoder filter chain (in http_filters order, RBAC included; none without these
filters)."""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path
from typing import Any, cast

import pytest
import yaml

from ubimesh.proxy.http.fault import FaultFilter, fires
from ubimesh.proxy.http.filter_chain import RbacStage
from ubimesh.proxy.http.local_ratelimit import LocalRateLimitFilter, TokenBucket
from ubimesh.proxy.network.hcm_config import HcmRuntime
from ubimesh.proxy.snapshot.types import (
    FaultConfig,
    HttpConnectionManagerConfig,
    LocalRateLimitConfig,
    RateLimitActionKind,
    TokenBucketConfig,
)
from ubimesh.proxy.upstream.cluster_manager import ClusterManager
from ubimesh.proxy.xds import ConfigErrors, load_bootstrap_dict
from ubimesh.telemetry.stats import Store

CONFIGS = Path(__file__).parent / "configs"
FAULT = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"
LRL = "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit"
HRBAC = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
HCM_PATH = "static_resources.listeners[0].filter_chains[0].filters[0].typed_config"
VHOST = HCM_PATH + ".route_config.virtual_hosts[0]"
ALL = {"default_value": {"numerator": 100}}
BUCKET = {"max_tokens": 3, "tokens_per_fill": 2, "fill_interval": "1s"}


def bootstrap(*filters: dict[str, Any]) -> dict[str, Any]:
    d = yaml.safe_load((CONFIGS / "minimal.yaml").read_text())
    hcm = d["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"][:0] = list(filters)
    return d  # type: ignore[no-any-return]


def fault(**config: Any) -> dict[str, Any]:
    return {"name": "envoy.filters.http.fault", "typed_config": {"@type": FAULT, **config}}


def lrl(**config: Any) -> dict[str, Any]:
    base = {"@type": LRL, "stat_prefix": "rl", "token_bucket": BUCKET}
    return {"name": "envoy.filters.http.local_ratelimit", "typed_config": {**base, **config}}


def hcm_of(d: dict[str, Any]) -> HttpConnectionManagerConfig:
    hcm = load_bootstrap_dict(d).listeners[0].filter_chains[0].filters[-1]
    assert isinstance(hcm, HttpConnectionManagerConfig)
    return hcm


def errors_of(d: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(ConfigErrors) as info:
        load_bootstrap_dict(d)
    return [(e.path, e.message) for e in info.value.errors]


# -- what comes out ---------------------------------------------------------------------------


def test_fault_config() -> None:
    hcm = hcm_of(
        bootstrap(
            fault(
                delay={"fixed_delay": "0.25s", "percentage": {"numerator": 5, "denominator": 1}},
                abort={"http_status": 503, "percentage": {"numerator": 200}},
                upstream_cluster="backend",
                headers=[{"name": "X-Fault", "exact_match": "yes"}],
                max_active_faults=3,
            )
        )
    )
    config = hcm.http_filters[0].config
    assert isinstance(config, FaultConfig)
    assert (config.delay, config.delay_percent) == (0.25, (5, 10_000))
    # A numerator above the denominator is 100 %, as Envoy's.
    assert (config.abort_status, config.abort_percent) == (503, (100, 100))
    assert config.upstream_cluster == "backend" and config.max_active_faults == 3
    assert [h.name for h in config.headers] == ["x-fault"]


def test_header_faults_and_defaults() -> None:
    config = hcm_of(bootstrap(fault(delay={"header_delay": {}}, abort={"header_abort": {}})))
    fc = config.http_filters[0].config
    assert fc.header_delay and fc.header_abort and fc.delay is None and fc.abort_status is None
    # An unset percentage is 0 % (Envoy): the fault never fires without one.
    assert fc.delay_percent == (0, 100) and fc.abort_percent == (0, 100)
    assert fc.max_active_faults is None


def test_local_ratelimit_config_and_per_route() -> None:
    d = bootstrap(
        lrl(
            filter_enabled=ALL,
            filter_enforced={"default_value": {"numerator": 50, "denominator": "TEN_THOUSAND"}},
            status={"code": 302},
            enable_x_ratelimit_headers="DRAFT_VERSION_03",
            local_rate_limit_per_downstream_connection=True,
            descriptors=[{"entries": [{"key": "k", "value": "v"}], "token_bucket": BUCKET}],
            rate_limits=[
                {"actions": [{"generic_key": {"descriptor_value": "v", "descriptor_key": "k"}}]},
                {
                    "actions": [
                        {"remote_address": {}},
                        {
                            "request_headers": {
                                "header_name": "X-User",
                                "descriptor_key": "user",
                                "skip_if_absent": True,
                            }
                        },
                    ]
                },
            ],
        )
    )
    hcm_d = d["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    vhost = hcm_d["typed_config"]["route_config"]["virtual_hosts"][0]
    override = {"@type": LRL, "stat_prefix": "vh", "token_bucket": BUCKET}
    vhost["typed_per_filter_config"] = {"envoy.filters.http.local_ratelimit": override}
    vhost["routes"][0]["typed_per_filter_config"] = {
        "envoy.filters.http.local_ratelimit": {**override, "stat_prefix": "route"}
    }
    hcm = hcm_of(d)
    config = hcm.http_filters[0].config
    assert isinstance(config, LocalRateLimitConfig)
    assert config.token_bucket == TokenBucketConfig(3, 2, 1.0)
    assert config.enabled == (100, 100) and config.enforced == (50, 10_000)
    assert config.status == 429  # below 400: Envoy's default
    assert config.x_ratelimit_headers and config.per_downstream_connection
    assert config.descriptors[0].entries == (("k", "v"),)
    kinds = [[a.kind for a in actions] for actions in config.rate_limits]
    assert kinds == [
        [RateLimitActionKind.GENERIC_KEY],
        [RateLimitActionKind.REMOTE_ADDRESS, RateLimitActionKind.REQUEST_HEADERS],
    ]
    assert config.rate_limits[1][1].header_name == "x-user"
    vh = hcm.route_config.virtual_hosts[0]
    assert [(n, c.stat_prefix) for n, c in vh.typed_per_filter_config] == [
        ("envoy.filters.http.local_ratelimit", "vh")
    ]
    assert vh.routes[0].typed_per_filter_config[0][1].stat_prefix == "route"


# -- refused, with the path and the fix --------------------------------------------------------

F0 = HCM_PATH + ".http_filters[0].typed_config"

REFUSED: list[tuple[dict[str, Any], str, str]] = [
    (fault(abort={"grpc_status": 14}), F0 + ".abort.grpc_status", "use http_status"),
    (fault(downstream_nodes=["a"]), F0 + ".downstream_nodes", "remove downstream_nodes"),
    (
        fault(response_rate_limit={"fixed_limit": {"limit_kbps": 1}}),
        F0 + ".response_rate_limit",
        "not implemented",
    ),
    (fault(delay_percent_runtime="x"), F0 + ".delay_percent_runtime", "no runtime"),
    (fault(abort_percent_runtime="x"), F0 + ".abort_percent_runtime", "no runtime"),
    (lrl(stage=1), F0 + ".stage", "leave stage at 0"),
    (
        lrl(filter_enabled={"runtime_key": "k", "default_value": {"numerator": 1}}),
        F0 + ".filter_enabled.runtime_key",
        "no runtime",
    ),
    (lrl(vh_rate_limits="INCLUDE"), F0 + ".vh_rate_limits", "filter's own rate_limits"),
    (
        lrl(rate_limits=[{"actions": [{"source_cluster": {}}]}]),
        F0 + ".rate_limits[0].actions[0].source_cluster",
        "use request_headers, remote_address",
    ),
    (
        lrl(descriptors=[{"entries": [{"key": "k"}], "token_bucket": BUCKET}]),
        F0 + ".descriptors[0].entries[0].value",
        "wildcard",
    ),
    (
        lrl(token_bucket={"max_tokens": 1, "fill_interval": "0.01s"}),
        F0 + ".token_bucket.fill_interval",
        "below the 50 ms",
    ),
    (lrl(stat_prefix=""), F0 + ".stat_prefix", ""),
]


@pytest.mark.parametrize(("flt", "path", "words"), REFUSED, ids=[r[1] for r in REFUSED])
def test_refused(flt: dict[str, Any], path: str, words: str) -> None:
    errors = errors_of(bootstrap(flt))
    assert any(p == path and words in m for p, m in errors), errors


def test_other_per_route_configs_are_refused() -> None:
    d = bootstrap()
    hcm_d = d["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    route = hcm_d["typed_config"]["route_config"]["virtual_hosts"][0]["routes"][0]
    route["typed_per_filter_config"] = {"envoy.filters.http.fault": {"@type": FAULT}}
    errors = errors_of(d)
    path = VHOST + '.routes[0].typed_per_filter_config["envoy.filters.http.fault"]'
    assert any(p == path and "only" in m for p, m in errors), errors


def test_route_rate_limits_still_refused_with_a_pointer() -> None:
    d = bootstrap()
    hcm_d = d["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    route = hcm_d["typed_config"]["route_config"]["virtual_hosts"][0]["routes"][0]
    route["route"]["rate_limits"] = [{"actions": [{"remote_address": {}}]}]
    errors = errors_of(d)
    assert any("filter's own rate_limits" in m for _, m in errors), errors


# -- the token bucket -------------------------------------------------------------------------


def test_bucket_refills_whole_intervals_up_to_max() -> None:
    b = TokenBucket(TokenBucketConfig(max_tokens=3, tokens_per_fill=2, fill_interval=1.0), 100.0)
    assert [b.consume(100.0) for _ in range(4)] == [True, True, True, False]
    assert not b.consume(100.99)  # no whole interval yet
    assert b.reset_seconds(100.2) == 1
    assert b.consume(101.0) and b.consume(101.5) and not b.consume(101.9)
    # 3.5 intervals later: 3 fills of 2, capped at 3; the half interval carries over.
    b.refill(104.5)
    assert b.tokens == 3 and b.last_fill == 104.0
    assert b.reset_seconds(104.5) == 1


def test_fractions() -> None:
    assert not fires(0, 100) and fires(100, 100) and fires(7, 7)
    hits = sum(fires(1, 2) for _ in range(2000))
    assert 800 < hits < 1200


# -- the decoder filter chain -----------------------------------------------------------------


def _runtime(d: dict[str, Any]) -> HcmRuntime:
    config = hcm_of(d)

    async def build() -> HcmRuntime:
        # The chain needs no clusters (only a tracer would): none are given.
        return HcmRuntime(config, cast(ClusterManager, None), Store())

    return asyncio.run(build())


def test_chain_keeps_the_configured_order() -> None:
    rbac = {"name": "r", "typed_config": {"@type": HRBAC}}
    rt = _runtime(
        bootstrap(copy.deepcopy(rbac), lrl(), copy.deepcopy(rbac), copy.deepcopy(rbac), fault())
    )
    chain = rt.decoder_filters
    assert chain is not None
    assert [type(f) for f in chain] == [RbacStage, LocalRateLimitFilter, RbacStage, FaultFilter]
    assert [(s.first, s.stop) for s in chain if isinstance(s, RbacStage)] == [(0, 1), (1, 3)]


def test_no_chain_without_fault_or_rate_limit() -> None:
    rt = _runtime(bootstrap({"name": "r", "typed_config": {"@type": HRBAC}}))
    assert rt.decoder_filters is None and rt.rbac is not None


def test_an_rds_update_drops_the_old_routes_limiters() -> None:
    """Per-route limiters are kept by the route's config: an RDS update must not leave the old
    ones behind (each update would otherwise add limiters that are never freed)."""
    d = bootstrap(lrl())
    vhost = d["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"]["route_config"]["virtual_hosts"][0]
    vhost["routes"][0]["typed_per_filter_config"] = {
        "envoy.filters.http.local_ratelimit": {"@type": LRL, "stat_prefix": "route",
                                               "token_bucket": BUCKET}
    }
    rt = _runtime(d)
    chain = rt.decoder_filters
    assert chain is not None
    limiter = next(f for f in chain if isinstance(f, LocalRateLimitFilter))

    class Stream:
        route = rt.config.route_config.virtual_hosts[0].routes[0]
        vhost = None

    first = limiter.limiter_for(cast(Any, Stream()))
    assert first is not limiter.own and len(limiter.overrides) == 1
    assert limiter.limiter_for(cast(Any, Stream())) is first  # kept while the route lives
    rt.take_routes(hcm_of(d))
    assert limiter.overrides == {}
