"""Envoy's response flags: the short names, their order, and how several are combined.

A stream (``ActiveStream.flags``) and a TCP proxy connection (``TcpProxyProtocol.flags``) keep
their flags as the text Envoy prints for ``%RESPONSE_FLAGS%``: "" when none, else the short
names joined with "," in Envoy's order (the order of its ``CoreResponseFlag`` bits, which is
the order of ``ALL`` below), e.g. ``"UF,URX"``. Istio's ``response_flags`` label is that text,
or ``-`` when it is empty (``label_text``).

Setting a flag is rare (errors only), so flags stay a string: no conversion when a log line,
a span tag or a metric label reads them. ``add_flag`` keeps the text in Envoy's order, each flag
once. Envoy's RBAC filters set no flag on a denial (only the response code details,
``rbac_access_denied_matched_policy[...]``), and neither does ubimesh.

Which ubimesh sets, and where:

====== =========================================== ===========================================
flag   meaning (Envoy)                             set by
====== =========================================== ===========================================
UH     no healthy upstream host                    router (503), tcp_proxy
UT     upstream request timeout                    router (504, or reset after the head)
UR     upstream remote reset                       router (reset reasons not listed here)
UF     upstream connection failure                 router (pool failure: 503), tcp_proxy
UC     upstream connection termination             router (connection closed by upstream)
UO     upstream overflow (circuit breaker)         router (503 on a pending or requests
                                                   overflow; a retry the retries breaker
                                                   refused), tcp_proxy (max_connections)
NR     no route                                    HCM (404)
DC     downstream connection termination           HCM (client went away mid-exchange)
URX    retry limit / TCP connect attempts          tcp_proxy (every host tried failed), router
                                                   (HTTP retries ran out on a failure)
SI     stream idle timeout                         HCM
DPE    downstream protocol error                   HCM (400, 426, 431 and codec errors)
UPE    upstream protocol error                     router (malformed upstream response)
NC     no cluster found                            router, tcp_proxy
DI     delay injected                              fault filter (proxy/http/fault.py)
FI     fault injected (abort)                      fault filter
RL     rate limited                                local rate limit filter
====== =========================================== ===========================================

The others are listed so that names and order stay Envoy's when a feature that sets them
arrives (rate limit service errors RLSE, ext_authz UAEX, max stream duration
UMSDR, max connection duration DT, overload OM, DNS failure DF, ...).
"""

from __future__ import annotations

import functools

LH = "LH"  # failed local health check
UH = "UH"  # no healthy upstream
UT = "UT"  # upstream request timeout
LR = "LR"  # connection local reset
UR = "UR"  # upstream remote reset
UF = "UF"  # upstream connection failure
UC = "UC"  # upstream connection termination
UO = "UO"  # upstream overflow (circuit breaking)
NR = "NR"  # no route found
DI = "DI"  # delay injected (fault filter)
FI = "FI"  # fault injected (fault filter)
RL = "RL"  # rate limited
UAEX = "UAEX"  # unauthorized by an external service (ext_authz)
RLSE = "RLSE"  # rate limit service error
DC = "DC"  # downstream connection termination
URX = "URX"  # upstream retry limit exceeded (HTTP) / max connect attempts (TCP)
SI = "SI"  # stream idle timeout
IH = "IH"  # invalid x-envoy-* request header value
DPE = "DPE"  # downstream protocol error
UMSDR = "UMSDR"  # upstream max stream duration reached
RFCF = "RFCF"  # response from the cache filter
NFCF = "NFCF"  # no filter config found
DT = "DT"  # duration timeout (max connection or stream duration)
UPE = "UPE"  # upstream protocol error
NC = "NC"  # no cluster found
OM = "OM"  # overload manager
DF = "DF"  # DNS resolution failed
DO = "DO"  # drop overload
DR = "DR"  # downstream remote reset
UDO = "UDO"  # unconditional drop overload

#: Every short name, in the order Envoy prints them (bit order of CoreResponseFlag).
ALL: tuple[str, ...] = (
    LH, UH, UT, LR, UR, UF, UC, UO, NR, DI, FI, RL, UAEX, RLSE, DC, URX, SI, IH, DPE, UMSDR,
    RFCF, NFCF, DT, UPE, NC, OM, DF, DO, DR, UDO,
)  # fmt: skip
_RANK = {name: i for i, name in enumerate(ALL)}

#: Istio's ``response_flags`` label value when no flag is set.
NONE_LABEL = "-"


@functools.lru_cache(maxsize=1024)
def add_flag(flags: str, flag: str) -> str:
    """``flags`` (Envoy's text, "" for none) with ``flag`` (one short name, or "" for none)
    added: each flag once, in Envoy's order. Unknown names are refused (``ValueError``), so a
    typo cannot reach logs and metrics."""
    if not flag:
        return flags
    if flag not in _RANK:
        raise ValueError(f"unknown response flag {flag!r}")
    if not flags:
        return flag
    names = flags.split(",")
    if flag in names:
        return flags
    names.append(flag)
    names.sort(key=_RANK.__getitem__)
    return ",".join(names)


def combine(*flags: str) -> str:
    """Several flags as Envoy prints them: ``combine("URX", "UF") == "UF,URX"``."""
    out = ""
    for f in flags:
        out = add_flag(out, f)
    return out


def label_text(flags: str) -> str:
    """Istio's ``response_flags`` label value: the flags, or ``-`` when there are none."""
    return flags or NONE_LABEL


def parse(text: str) -> tuple[str, ...]:
    """The flags in Envoy's text (``-`` and "" are none); ``ValueError`` for an unknown name."""
    if text in ("", NONE_LABEL):
        return ()
    names = tuple(text.split(","))
    for n in names:
        if n not in _RANK:
            raise ValueError(f"unknown response flag {n!r}")
    return names


# Pool failure and reset reasons (``ubimesh.proxy.http.pool``) -> flag, as Envoy's router maps
# its ConnectionPool::PoolFailureReason and StreamResetReason.
_POOL_FAILURE = {"overflow": UO}
_RESET = {
    "connection termination": UC,
    "connection failure": UF,
    "connection timeout": UF,
    "protocol error": UPE,
    "overflow": UO,
    "local reset": LR,
}


def pool_failure_flag(reason: str) -> str:
    """The flag for a pool that could not give a connection: UO on overflow, else UF."""
    return _POOL_FAILURE.get(reason, UF)


def reset_flag(reason: str) -> str:
    """The flag for an upstream stream reset with ``reason`` (UR when it is none of Envoy's
    specific reasons)."""
    return _RESET.get(reason, UR)
