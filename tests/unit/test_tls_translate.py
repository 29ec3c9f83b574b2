"""The translator's TLS part: DownstreamTlsContext, UpstreamTlsContext, static secrets, the
HCM's client certificate details; accepted configs give the expected snapshot, refused ones the
exact errors; the TLS tables of docs/envoy-compat.md match the translator."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
from tests.support.bootstrap import HCM, ROUTER, address, static_cluster
from tests.support.pki import Pki

from ubimesh.proxy.snapshot.types import (
    CertificateValidation,
    ClientCertDetail,
    ForwardClientCertDetails,
    HttpConnectionManagerConfig,
    SanMatcher,
    SanType,
    StringMatcher,
    StringMatchKind,
    TlsCertificate,
    TlsVersion,
)
from ubimesh.proxy.tls.peer import PeerInfo
from ubimesh.proxy.xds import ConfigErrors, extensions, load_bootstrap_dict
from ubimesh.proxy.xds.context import Ctx
from ubimesh.proxy.xds.parse import parse_message
from ubimesh.proxy.xds.translate import translate_bootstrap

DOWN = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
UP = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
CHAIN = "static_resources.listeners[0].filter_chains[0]"
DCTX = CHAIN + ".transport_socket.typed_config"
UCTX = "static_resources.clusters[0].transport_socket.typed_config"
SUFFIX = "; remove it, or see docs/envoy-compat.md for the supported subset"
ID = "spiffe://example.org/ns/default/sa/web"


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki("example.org")


@pytest.fixture(scope="module")
def pem(pki: Pki) -> dict[str, str]:
    chain, key = pki.leaf(ID)
    return {"chain": chain.decode(), "key": key.decode(), "ca": pki.bundle_pem.decode()}


def certificate(pem: dict[str, str]) -> dict[str, Any]:
    return {
        "certificate_chain": {"inline_string": pem["chain"]},
        "private_key": {"inline_string": pem["key"]},
    }


def config(
    pem: dict[str, str],
    down: dict[str, Any] | None = None,
    up: dict[str, Any] | None = None,
    hcm: dict[str, Any] | None = None,
    secrets: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    chain: dict[str, Any] = {
        "filters": [
            {
                "name": "hcm",
                "typed_config": {
                    "@type": HCM,
                    "stat_prefix": "in",
                    "route_config": {
                        "virtual_hosts": [
                            {
                                "name": "all",
                                "domains": ["*"],
                                "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "b"}}],
                            }
                        ]
                    },
                    "http_filters": [{"name": "router", "typed_config": {"@type": ROUTER}}],
                    **(hcm or {}),
                },
            }
        ]
    }
    if down is not None:
        chain["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {"@type": DOWN, **down},
        }
    cluster = static_cluster("b", [1], connect_timeout="1s")
    if up is not None:
        cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {"@type": UP, **up},
        }
    static: dict[str, Any] = {
        "listeners": [
            {
                "name": "l",
                "address": address(0),
                "filter_chains": [chain],
            }
        ],
        "clusters": [cluster],
    }
    if secrets is not None:
        static["secrets"] = secrets
    return {"static_resources": static}


def errors(source: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigErrors) as info:
        load_bootstrap_dict(copy.deepcopy(source))
    return [str(e) for e in info.value.errors]


def mtls(pem: dict[str, str], **validation: Any) -> dict[str, Any]:
    return {
        "common_tls_context": {
            "tls_certificates": [certificate(pem)],
            "validation_context": {"trusted_ca": {"inline_string": pem["ca"]}, **validation},
            "alpn_protocols": ["http/1.1"],
            "tls_params": {"tls_minimum_protocol_version": "TLSv1_3"},
        },
        "require_client_certificate": True,
    }


def test_a_downstream_and_an_upstream_context_translate(pem: dict[str, str]) -> None:
    sans = [
        {"san_type": "URI", "matcher": {"exact": ID}},
        {"san_type": "URI", "matcher": {"prefix": "spiffe://example.org/ns/"}},
        {"san_type": "DNS", "matcher": {"exact": "web.default"}},
    ]
    up = {
        "common_tls_context": {
            "tls_certificates": [certificate(pem)],
            "validation_context": {"trusted_ca": {"inline_string": pem["ca"]}},
        },
        "sni": "web.default",
    }
    snap = load_bootstrap_dict(
        config(
            pem,
            down=mtls(pem, match_typed_subject_alt_names=sans),
            up=up,
            hcm={
                "forward_client_cert_details": "SANITIZE_SET",
                "set_current_client_cert_details": {"uri": True, "subject": True, "dns": True},
            },
        )
    )
    chain = snap.listeners[0].filter_chains[0]
    ctx = chain.transport_socket
    assert ctx is not None and ctx.server and ctx.require_client_certificate
    assert ctx.certificates == (
        TlsCertificate(pem["chain"].encode(), pem["key"].encode(), "inline, inline"),
    )
    assert ctx.validation == CertificateValidation(
        pem["ca"].encode(),
        (
            SanMatcher(SanType.URI, StringMatcher(StringMatchKind.EXACT, ID)),
            SanMatcher(
                SanType.URI, StringMatcher(StringMatchKind.PREFIX, "spiffe://example.org/ns/")
            ),
            SanMatcher(SanType.DNS, StringMatcher(StringMatchKind.EXACT, "web.default")),
        ),
    )
    assert (ctx.min_version, ctx.max_version) == (TlsVersion.TLSv1_3, TlsVersion.TLSv1_3)
    assert ctx.alpn_protocols == ("http/1.1",)
    assert chain.transport_socket_connect_timeout == 10.0
    hcm = chain.filters[0]
    assert isinstance(hcm, HttpConnectionManagerConfig)
    assert hcm.forward_client_cert_details is ForwardClientCertDetails.SANITIZE_SET
    assert hcm.set_current_client_cert_details == (
        ClientCertDetail.SUBJECT,
        ClientCertDetail.URI,
        ClientCertDetail.DNS,
    )
    upstream = snap.clusters["b"].transport_socket
    assert upstream is not None and not upstream.server
    assert upstream.sni == "web.default"
    # Envoy's client default: TLS 1.2 at most.
    assert upstream.max_version is TlsVersion.TLSv1_2


def test_static_secrets_are_named_and_resolved_at_run_time(pem: dict[str, str]) -> None:
    secrets = [
        {"name": "default", "tls_certificate": certificate(pem)},
        {"name": "ROOTCA", "validation_context": {"trusted_ca": {"inline_string": pem["ca"]}}},
    ]
    down = {
        "common_tls_context": {
            "tls_certificate_sds_secret_configs": [{"name": "default"}],
            "combined_validation_context": {
                "default_validation_context": {
                    "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": {"exact": ID}}]
                },
                "validation_context_sds_secret_config": {"name": "ROOTCA"},
            },
        },
        "require_client_certificate": True,
    }
    snap = load_bootstrap_dict(config(pem, down=down, secrets=secrets))
    ctx = snap.listeners[0].filter_chains[0].transport_socket
    assert ctx is not None
    assert ctx.certificate_secrets == ("default",) and ctx.validation_secret == "ROOTCA"
    assert ctx.secret_names == ("default", "ROOTCA")
    assert set(snap.secrets) == {"default", "ROOTCA"}
    root = snap.secrets["ROOTCA"]
    assert isinstance(root, CertificateValidation)
    assert ctx.validation is not None
    merged = ctx.validation.merged(root)
    assert merged.trusted_ca == pem["ca"].encode() and len(merged.san_matchers) == 1


def test_refusals_name_their_paths(pem: dict[str, str]) -> None:
    email = {"san_type": "EMAIL", "matcher": {"exact": "a"}}
    down = mtls(pem, match_typed_subject_alt_names=[email])
    down["common_tls_context"]["tls_params"]["cipher_suites"] = ["ECDHE-ECDSA-AES128-GCM-SHA256"]
    down["require_sni"] = True
    down["common_tls_context"]["validation_context"]["crl"] = {"inline_string": "x"}
    vpath = DCTX + ".common_tls_context.validation_context"
    assert errors(config(pem, down=down)) == [
        f"{DCTX}.require_sni: not supported by ubimesh (requiring SNI is not implemented yet; "
        f"match on server_names instead){SUFFIX}",
        f"{DCTX}.common_tls_context.tls_params.cipher_suites: not supported by ubimesh (ubimesh "
        f"uses OpenSSL's default cipher suites){SUFFIX}",
        f"{vpath}.crl: not supported by ubimesh (CRLs are not implemented yet){SUFFIX}",
        f"{vpath}.match_typed_subject_alt_names[0].san_type: not supported by ubimesh (SAN type "
        f"EMAIL; URI and DNS are){SUFFIX}",
    ]


def test_semantic_errors(pem: dict[str, str], pki: Pki) -> None:
    other_key = pki.leaf(ID)[1].decode()
    down = {
        "common_tls_context": {
            "tls_certificates": [
                {
                    "certificate_chain": {"inline_string": pem["chain"]},
                    "private_key": {"inline_string": other_key},
                }
            ],
        },
        "require_client_certificate": True,
    }
    up = {
        "common_tls_context": {
            "tls_certificate_sds_secret_configs": [{"name": "missing"}],
            "validation_context": {
                "match_typed_subject_alt_names": [
                    {"san_type": "URI", "matcher": {"suffix": "/web"}}
                ]
            },
        }
    }
    found = errors(config(pem, down=down, up=up))
    assert found == [
        f"{UCTX}.common_tls_context.tls_certificate_sds_secret_configs[0].name: no secret "
        "'missing' in static_resources.secrets (a reference without sds_config names a static "
        "secret)",
        f"{UCTX}.common_tls_context.validation_context.match_typed_subject_alt_names[0].matcher: "
        "not supported by ubimesh (a URI SAN matcher with suffix; ubimesh matches URI SANs with "
        f"exact or prefix){SUFFIX}",
        f"{UCTX}.common_tls_context.validation_context.trusted_ca: is required: without it no "
        "peer certificate can be verified",
        f"{DCTX}.common_tls_context.tls_certificates[0]: cannot load the certificate_chain and "
        "private_key: KEY_VALUES_MISMATCH (X509)",
        f"{DCTX}.require_client_certificate: needs a validation context with trusted_ca to "
        "verify the client certificate (common_tls_context.validation_context or "
        "validation_context_sds_secret_config)",
    ]


def test_sds_over_ads_needs_an_ads_stream(pem: dict[str, str]) -> None:
    down = {
        "common_tls_context": {
            "tls_certificate_sds_secret_configs": [{"name": "default", "sds_config": {"ads": {}}}]
        }
    }
    assert errors(config(pem, down=down)) == [
        f"{DCTX}.common_tls_context.tls_certificate_sds_secret_configs[0].sds_config.ads: needs "
        "an ADS stream: configure dynamic_resources.ads_config in the bootstrap"
    ]


def test_xfcc_element_is_envoys() -> None:
    peer = PeerInfo(
        True, ID, (ID,), ("web.default",), "", "ab" * 32, ("spiffe://example.org/ns/m/sa/p",)
    )
    assert peer.xfcc((ClientCertDetail.URI,)) == (
        f"By=spiffe://example.org/ns/m/sa/p;Hash={'ab' * 32};URI={ID}"
    )
    assert peer.xfcc((ClientCertDetail.SUBJECT, ClientCertDetail.URI, ClientCertDetail.DNS)) == (
        f'By=spiffe://example.org/ns/m/sa/p;Hash={"ab" * 32};Subject="";URI={ID};DNS=web.default'
    )


def test_the_tls_tables_of_the_compat_doc_match_the_translator(pem: dict[str, str]) -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "envoy-compat.md").read_text()
    section = doc.split("\n## TLS\n", 1)[1].split("\n## ", 1)[0]
    tables: dict[str, set[str]] = {}
    current = None
    for line in section.splitlines():
        heading = re.match(r"^##### `([\w.]+)`", line)
        if heading:
            current = tables.setdefault(heading.group(1), set())
        elif line.startswith("#"):
            current = None
        row = re.match(r"^\| (.+?) \| yes \|", line)
        if row and current is not None:
            current.update(re.findall(r"`(\w+)`", row.group(1)))
    roots = {"trusted_ca": {"inline_string": pem["ca"]}}
    secrets = [{"name": "ROOTCA", "validation_context": roots}]
    down = mtls(pem)
    down["common_tls_context"].pop("validation_context")
    down["common_tls_context"]["combined_validation_context"] = {
        "default_validation_context": {
            "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": {"exact": ID}}]
        },
        "validation_context_sds_secret_config": {"name": "ROOTCA"},
    }
    up = {"common_tls_context": {"tls_certificates": [certificate(pem)]}, "sni": "x"}
    source = config(
        pem, down=down, up=up, hcm={"set_current_client_cert_details": {"uri": True}},
        secrets=secrets,
    )
    bootstrap, parse_errors, _ = parse_message(source, extensions.Bootstrap)
    assert parse_errors == []
    ctx = Ctx()
    translate_bootstrap(bootstrap, source, ctx=ctx)
    assert len(tables) == 12
    for name, fields in tables.items():
        assert ctx.whitelists[name] == fields, name
