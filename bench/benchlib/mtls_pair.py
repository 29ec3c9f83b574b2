"""Scenario ``mtls-pair``: a sidecar pair with mTLS between the two proxies (issue 4 bar 2).

    h2load --HTTP/1.1--> outbound proxy --mTLS, HTTP/1.1--> inbound proxy --HTTP/1.1--> nginx

Both proxies of a pair are the same product (ubimesh, or Envoy) with one worker each:

* **outbound**: a plain HTTP listener; its one cluster ``upstream`` points at the inbound
  proxy with an ``UpstreamTlsContext``: the client certificate of
  ``spiffe://bench.local/ns/default/sa/client``, ``trusted_ca`` the bench root and a URI SAN
  matcher (exact) for the server's ID;
* **inbound**: a listener with a ``DownstreamTlsContext`` (``require_client_certificate``,
  the server certificate of ``spiffe://bench.local/ns/default/sa/server``, ``trusted_ca`` and
  an exact URI SAN matcher for the client's ID) and x-forwarded-client-cert ``SANITIZE_SET``
  with the URI, as a mesh inbound listener has (issue 4 item 5); its cluster ``upstream`` is
  the plain nginx upstream.

Both products get the same document, generated from the S1 bootstraps (``configs``) plus the
same TLS and XFCC fields; Envoy keeps its "bare" additions. ``tls_params`` is spelled out on
every TLS context (TLS 1.2 to 1.3) because Envoy's upstream default stops at TLS 1.2 while
ubimesh's reaches 1.3: with both set, every hop negotiates TLS 1.3 for both products.

Certificates are minted once per run into the work directory with ``tests/support/pki.py``
(imported from the repository: the benchmark runs from a checkout, and the test PKI builder
already writes X.509-SVIDs as specs.md section 2 requires). Leaves live 24 h, the CA's
default lifetime, so that a full run never outlives them.
"""

from __future__ import annotations

import copy
import datetime as dt
import importlib
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchlib import configs

REPO_DIR = Path(__file__).resolve().parents[2]
TRUST_DOMAIN = "bench.local"
CLIENT_ID = f"spiffe://{TRUST_DOMAIN}/ns/default/sa/client"
SERVER_ID = f"spiffe://{TRUST_DOMAIN}/ns/default/sa/server"
PRODUCTS = ("ubimesh", "envoy")
TARGET_SUFFIX = "-pair"
_TLS_V3 = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
_TLS_PARAMS = {"tls_minimum_protocol_version": "TLSv1_2", "tls_maximum_protocol_version": "TLSv1_3"}
LEAF_TTL = dt.timedelta(hours=24)


def target_name(product: str) -> str:
    """``ubimesh`` -> ``ubimesh-pair``: the name a pair has in the results."""
    return product + TARGET_SUFFIX


def product_of(target: str) -> str:
    """The inverse of ``target_name``."""
    return target.removesuffix(TARGET_SUFFIX)


@dataclass(frozen=True)
class PairCerts:
    """Paths of the files minted for one run (keys are 0600)."""

    bundle: Path
    client_chain: Path
    client_key: Path
    server_chain: Path
    server_key: Path


def mint_certs(directory: Path) -> PairCerts:
    """A root + intermediate for ``bench.local`` and the two leaves, written to ``directory``.

    The PKI builder is ``tests/support/pki.py``; the repository root is put on ``sys.path``
    for the import when it is not there already.
    """
    if str(REPO_DIR) not in sys.path:
        sys.path.append(str(REPO_DIR))
    pki_module = importlib.import_module("tests.support.pki")
    pki = pki_module.Pki(TRUST_DOMAIN)
    directory.mkdir(parents=True, exist_ok=True)
    bundle = directory / "bench-bundle.pem"
    bundle.write_bytes(pki.bundle_pem)
    not_after = dt.datetime.now(dt.UTC) + LEAF_TTL
    client = pki.write_leaf(directory, "bench-client", pki.leaf(CLIENT_ID, not_after=not_after))
    server = pki.write_leaf(directory, "bench-server", pki.leaf(SERVER_ID, not_after=not_after))
    return PairCerts(bundle, client[0], client[1], server[0], server[1])


def _tls_socket(kind: str, chain: Path, key: Path, bundle: Path, peer_id: str) -> dict[str, Any]:
    typed: dict[str, Any] = {
        "@type": _TLS_V3 + kind,
        "common_tls_context": {
            "tls_params": dict(_TLS_PARAMS),
            "tls_certificates": [
                {
                    "certificate_chain": {"filename": str(chain)},
                    "private_key": {"filename": str(key)},
                }
            ],
            "validation_context": {
                "trusted_ca": {"filename": str(bundle)},
                "match_typed_subject_alt_names": [
                    {"san_type": "URI", "matcher": {"exact": peer_id}}
                ],
            },
        },
    }
    if kind == "DownstreamTlsContext":
        typed["require_client_certificate"] = True
    return {"name": "envoy.transport_sockets.tls", "typed_config": typed}


def _base(product: str, listen: int, admin: int, upstream: int) -> dict[str, Any]:
    if product == "ubimesh":
        return configs.ubimesh_bootstrap(listen, admin, upstream)
    if product == "envoy":
        return configs.envoy_bare_bootstrap(listen, admin, upstream)
    raise ValueError(f"product {product!r} has no mTLS pair; use one of {', '.join(PRODUCTS)}")


def outbound_bootstrap(
    product: str, listen: int, admin: int, inbound_port: int, certs: PairCerts
) -> dict[str, Any]:
    """Plain listener -> cluster ``upstream`` = the inbound proxy, over mTLS as the client."""
    cfg = copy.deepcopy(_base(product, listen, admin, inbound_port))
    cluster = cfg["static_resources"]["clusters"][0]
    cluster["transport_socket"] = _tls_socket(
        "UpstreamTlsContext", certs.client_chain, certs.client_key, certs.bundle, SERVER_ID
    )
    return cfg


def inbound_bootstrap(
    product: str, listen: int, admin: int, upstream_port: int, certs: PairCerts
) -> dict[str, Any]:
    """mTLS listener (client certificate required, client ID matched) -> plain upstream."""
    cfg = copy.deepcopy(_base(product, listen, admin, upstream_port))
    chain = cfg["static_resources"]["listeners"][0]["filter_chains"][0]
    chain["transport_socket"] = _tls_socket(
        "DownstreamTlsContext", certs.server_chain, certs.server_key, certs.bundle, CLIENT_ID
    )
    hcm = chain["filters"][0]["typed_config"]
    # What a mesh inbound listener does with the caller's identity (issue 4 item 5).
    hcm["forward_client_cert_details"] = "SANITIZE_SET"
    hcm["set_current_client_cert_details"] = {"uri": True}
    return cfg


# The outbound proxy's counter of TLS handshakes to the inbound one: Envoy's name, which
# ubimesh mirrors for clusters with a TLS transport socket. With keep-alive it should not move
# during a measured run.
HANDSHAKE_COUNTER = re.compile(
    rf"^cluster\.{configs.CLUSTER_NAME}\.ssl\.handshake:\s*(\d+)\s*$", re.M
)


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def _median(values: list[float]) -> float | None:
    values = sorted(values)
    if not values:
        return None
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def _f(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def verdict(subject: dict[str, Any] | None, peer: dict[str, Any] | None) -> str:
    """PASS when the subject pair's added p99 is no worse than the peer pair's."""
    if subject is None or peer is None:
        return "n/a (both pairs must run)"
    mine, theirs = subject.get("added_p99_ms"), peer.get("added_p99_ms")
    if mine is None or theirs is None:
        return "n/a (no direct baseline)"
    word = "PASS" if mine <= theirs else "FAIL"
    return f"{word} ({mine:+.3f} ms vs {theirs:+.3f} ms)"


def pair_section(rows: list[dict[str, Any]], runs: list[dict[str, Any]]) -> str:
    """Markdown: per-proxy memory and handshakes of each pair, and the bar's verdict."""
    subject, peer = target_name("ubimesh"), target_name("envoy")
    out = [
        "## mTLS sidecar pair: per proxy, and the bar",
        "",
        "Bar (issue 4): at a fixed rate, the added p99 of the ubimesh pair (through both "
        "proxies, minus direct) is no worse than the Envoy pair's, in the same run. CPU µs/req "
        "above is summed over the two proxies of a pair; max mem above is their sum.",
        "",
    ]
    header = [
        "size", "load", "target", "+p99 ms", "CPU µs/req (2 proxies)",
        "outbound max RSS MB", "inbound max RSS MB", "outbound idle RSS MB",
        "inbound idle RSS MB", "TLS handshakes during run", "bar",
    ]  # fmt: skip
    lines = []
    fixed = [r for r in rows if r["kind"] == "fixed" and r["target"] != "direct"]
    for row in fixed:
        items = [
            r
            for r in runs
            if (r["target"], r["size"], r["load"]) == (row["target"], row["size"], row["load"])
        ]

        def part(name: str, key: str, items: list[dict[str, Any]] = items) -> float | None:
            values = [
                r["parts"][name][key]
                for r in items
                if r.get("parts") and r["parts"].get(name, {}).get(key) is not None
            ]
            return _median(values)

        shakes = [r["tls_handshakes"] for r in items if r.get("tls_handshakes") is not None]
        bar = ""
        if row["target"] == subject:
            other = next(
                (
                    r
                    for r in fixed
                    if (r["target"], r["size"], r["load"]) == (peer, row["size"], row["load"])
                ),
                None,
            )
            bar = verdict(row, other)
        added = row.get("added_p99_ms")
        lines.append([
            row["size"], row["load"], row["target"],
            "-" if added is None else f"{added:+.3f}", _f(row.get("cpu_us_per_req")),
            _f(part("outbound", "max_rss_mb")), _f(part("inbound", "max_rss_mb")),
            _f(part("outbound", "idle_rss_mb")), _f(part("inbound", "idle_rss_mb")),
            ",".join(str(s) for s in shakes) if shakes else "-", bar,
        ])  # fmt: skip
    out.append("| " + " | ".join(header) + " |")
    out.append("|" + "|".join("---" for _ in header) + "|")
    out += ["| " + " | ".join(line) + " |" for line in lines]
    return "\n".join(out) + "\n"
