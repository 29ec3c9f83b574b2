"""Route retry policy (envoy.config.route.v3.RetryPolicy): the supported part.

Filled in by the translator (``xds/route.py``) and read by the router (``http/router.py`` and
``http/retry.py``). Everything the router asks per response is precomputed here, so that a
decision costs one bit test or one set lookup.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# retry_on conditions, as bits (Envoy's RetryPolicy::RETRY_ON_*).
RETRY_ON_5XX = 1
RETRY_ON_GATEWAY_ERROR = 2
RETRY_ON_CONNECT_FAILURE = 4
RETRY_ON_RETRIABLE_4XX = 8
RETRY_ON_REFUSED_STREAM = 16
RETRY_ON_RETRIABLE_STATUS_CODES = 32
RETRY_ON_RESET = 64
RETRY_ON_RESET_BEFORE_REQUEST = 128
RETRY_ON_ENVOY_RATE_LIMITED = 256

#: The retry_on names ubimesh implements (Envoy's x-envoy-retry-on values), and their bits.
RETRY_ON_NAMES: dict[str, int] = {
    "5xx": RETRY_ON_5XX,
    "gateway-error": RETRY_ON_GATEWAY_ERROR,
    "connect-failure": RETRY_ON_CONNECT_FAILURE,
    "retriable-4xx": RETRY_ON_RETRIABLE_4XX,
    "refused-stream": RETRY_ON_REFUSED_STREAM,
    "retriable-status-codes": RETRY_ON_RETRIABLE_STATUS_CODES,
    "reset": RETRY_ON_RESET,
    "reset-before-request": RETRY_ON_RESET_BEFORE_REQUEST,
    "envoy-ratelimited": RETRY_ON_ENVOY_RATE_LIMITED,
}

#: Conditions under which a reset, a connect failure or a per-try timeout is retried whatever
#: its reason (Envoy counts them as a 5xx).
RESET_ANY = RETRY_ON_5XX | RETRY_ON_GATEWAY_ERROR | RETRY_ON_RESET


def retriable_statuses(on: int, codes: frozenset[int]) -> frozenset[int]:
    """The response statuses that ``on`` (bits) and ``codes`` (retriable_status_codes) retry:
    any 5xx for 5xx, 502-504 for gateway-error, 409 for retriable-4xx, ``codes`` for
    retriable-status-codes."""
    out: set[int] = set()
    if on & RETRY_ON_5XX:
        out.update(range(500, 600))
    if on & RETRY_ON_GATEWAY_ERROR:
        out.update((502, 503, 504))
    if on & RETRY_ON_RETRIABLE_4XX:
        out.add(409)
    if on & RETRY_ON_RETRIABLE_STATUS_CODES:
        out.update(codes)
    return frozenset(out)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When and how often the router retries a request. ``num_retries`` 0 means no retries.

    ``on`` holds the ``retry_on`` conditions as RETRY_ON_* bits and ``statuses`` the response
    statuses they retry (see ``retriable_statuses``); times are seconds.
    """

    retry_on: frozenset[str] = frozenset()
    num_retries: int = 1
    on: int = 0
    statuses: frozenset[int] = frozenset()
    per_try_timeout: float | None = None
    """Per attempt, from the moment the attempt has a connection and the whole request was
    received; None: none."""
    base_interval: float = 0.025
    max_interval: float = 0.25
    previous_hosts: bool = False
    """``envoy.retry_host_predicates.previous_hosts``: avoid hosts already tried."""
    host_selection_max_attempts: int = 0
    """``host_selection_retry_max_attempts``: how many times a retry's host is chosen again
    when the predicate rejects it (Envoy's default is 0: the predicate alone does nothing)."""
    previous_priorities: int = 0
    """``envoy.retry_priorities.previous_priorities``'s ``update_frequency``: every that many
    attempts, retries leave out the priority levels already tried; 0: no retry priority."""
    hot: tuple[int, frozenset[int], float | None] = field(
        init=False, repr=False, compare=False
    )
    """(``on``, ``statuses``, ``per_try_timeout``): what the router reads on every request
    with this policy, in one attribute. This class is interpreted; each attribute read from
    the compiled router goes through Python's generic lookup (about 160 instructions under
    callgrind), so one read of a tuple replaces three."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "hot", (self.on, self.statuses, self.per_try_timeout))
