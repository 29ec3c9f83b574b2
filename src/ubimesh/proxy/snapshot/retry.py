"""Route retry policy (envoy.config.route.v3.RetryPolicy): the supported part.

Filled in by the translator (``xds/route.py``) and read by the router (``http/router.py``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When and how often the router retries a request. ``num_retries`` 0 means no retries."""

    retry_on: frozenset[str] = frozenset()
    num_retries: int = 1
