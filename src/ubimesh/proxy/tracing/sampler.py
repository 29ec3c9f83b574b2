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

#: The nibble of each reason, indexed by it (a str: compiled, indexing a tuple constant by a
#: variable boxes the whole tuple first).
_NIBBLE_OF: Final = "49ab"
_UUID_LENGTH: Final = 36
_TRACE_BYTE: Final = 14


def percent_numerator(percent: float) -> int:
    """A Percent (0-100) as Envoy's FractionalPercent over TEN_THOUSAND."""
    return int(percent * 100)


def trace_reason(request_id: str) -> int:
    """The decision packed in a UUID request id (NOT_TRACEABLE when none or not a UUID)."""
    if len(request_id) != _UUID_LENGTH:
        return NOT_TRACEABLE
    # Compares of one character code: compiled, no string or dict is touched.
    c = ord(request_id[_TRACE_BYTE])
    if c == 57:  # "9"
        return SAMPLING
    if c == 97:  # "a"
        return SERVICE_FORCED
    if c == 98:  # "b"
        return CLIENT_FORCED
    return NOT_TRACEABLE


def with_reason(request_id: str, reason: int) -> str:
    """``request_id`` carrying ``reason`` (unchanged when it is not a 36-character UUID)."""
    if len(request_id) != _UUID_LENGTH:
        return request_id
    # One string built from the two slices (concatenation made two more).
    return f"{request_id[:_TRACE_BYTE]}{_NIBBLE_OF[reason]}{request_id[_TRACE_BYTE + 1 :]}"


def request_id_integer(request_id: str) -> int | None:
    """Envoy's UUID getInteger: the first 8 hex digits, None when they are not hex."""
    value = _plain_hex8(request_id)
    if value >= 0:
        return value
    return _int_prefix(request_id)


def _int_prefix(request_id: str) -> int | None:
    """The first 8 characters by ``int``'s rules (signs, spaces, ``0x``), None when invalid:
    the slow way, for ids ``_plain_hex8`` does not take."""
    if len(request_id) < 8:
        return None
    try:
        return int(request_id[:8], 16)
    except ValueError:
        return None


def _plain_hex8(request_id: str) -> int:
    """The value of the first 8 characters when they are plain hex digits (every UUID's),
    else -1 (``request_id_integer`` then applies ``int``'s rules: signs, spaces, ``0x``).

    Compiled, reading the characters costs a few instructions each and makes no object,
    where ``int(request_id[:8], 16)`` made a slice and went through ``int``'s general
    parser (about 1k instructions a request)."""
    if len(request_id) < 8:
        return -1
    value = 0
    for i in range(8):
        c = ord(request_id[i])
        if 48 <= c <= 57:  # 0-9
            value = value * 16 + c - 48
        elif 97 <= c <= 102:  # a-f
            value = value * 16 + c - 87
        elif 65 <= c <= 70:  # A-F
            value = value * 16 + c - 55
        else:
            return -1
    return value


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
    value = _plain_hex8(request_id)
    if value < 0:
        general = _int_prefix(request_id)
        if general is None:
            return NOT_TRACEABLE, request_id
        value = general
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
