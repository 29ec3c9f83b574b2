"""The HCM's trace decision, as Envoy makes it with its UUID request id extension.

Envoy keeps the decision in the x-request-id itself: character 14 of the UUID (its version
nibble, normally ``4``) becomes ``9`` (sampled), ``a`` (forced by x-envoy-force-trace) or ``b``
(forced by the client's x-client-trace-id), so that every hop that forwards the id sees the
same decision. The random draw is the id's first 8 hex digits modulo 10000, which makes the
decision stable for a request id. Envoy's ConnectionManagerUtility::mutateTracingRequestHeader:

* an id that already carries a decision keeps it;
* otherwise x-client-trace-id (with ``client_sampling``), then x-envoy-force-trace, then
  ``random_sampling`` set it;
* then ``overall_sampling`` (drawn on the same number) may clear any decision;
* a request without a usable x-request-id is not traced by this decision.
"""

from __future__ import annotations

import random
from typing import Final

# Final: compiled callers use the values directly instead of looking the names up.
NOT_TRACEABLE: Final = 0
SAMPLING: Final = 1
SERVICE_FORCED: Final = 2
CLIENT_FORCED: Final = 3

_REASON_OF = {"9": SAMPLING, "a": SERVICE_FORCED, "b": CLIENT_FORCED}
_NIBBLE_OF = ("4", "9", "a", "b")
_UUID_LENGTH: Final = 36
_TRACE_BYTE: Final = 14


def percent_numerator(percent: float) -> int:
    """A Percent (0-100) as Envoy's FractionalPercent over TEN_THOUSAND."""
    return int(percent * 100)


def trace_reason(request_id: str) -> int:
    """The decision packed in a UUID request id (NOT_TRACEABLE when none or not a UUID)."""
    if len(request_id) != _UUID_LENGTH:
        return NOT_TRACEABLE
    return _REASON_OF.get(request_id[_TRACE_BYTE], NOT_TRACEABLE)


def with_reason(request_id: str, reason: int) -> str:
    """``request_id`` carrying ``reason`` (unchanged when it is not a 36-character UUID)."""
    if len(request_id) != _UUID_LENGTH:
        return request_id
    return request_id[:_TRACE_BYTE] + _NIBBLE_OF[reason] + request_id[_TRACE_BYTE + 1 :]


def request_id_integer(request_id: str) -> int | None:
    """Envoy's UUID getInteger: the first 8 hex digits, None when they are not hex."""
    if len(request_id) < 8:
        return None
    try:
        return int(request_id[:8], 16)
    except ValueError:
        return None


def decide(
    request_id: str | None,
    *,
    client_trace_id: bool,
    force_trace: bool,
    client: int,
    random_: int,
    overall: int,
) -> tuple[int, str | None]:
    """(reason, the request id to forward) for one request. ``client``, ``random_`` and
    ``overall`` are numerators over 10000; ``force_trace`` is only ever true for a trusted
    (internal) downstream."""
    if request_id is None:
        return NOT_TRACEABLE, None
    value = request_id_integer(request_id)
    if value is None:
        return NOT_TRACEABLE, request_id
    draw = value % 10000
    status = trace_reason(request_id)
    reason = status
    if status == NOT_TRACEABLE:
        if client_trace_id and random.randrange(10000) < client:
            reason = CLIENT_FORCED
        elif force_trace:
            reason = SERVICE_FORCED
        elif draw < random_:
            reason = SAMPLING
    # overall_sampling caps every decision, one that came with the request included.
    if draw >= overall:
        reason = NOT_TRACEABLE
    if reason != status:
        request_id = with_reason(request_id, reason)
    return reason, request_id
