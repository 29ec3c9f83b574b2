"""Outlier detection: the results the data path reports about each host.

Contract used by the router and the TCP proxy: when a host has a monitor (``host.outlier`` is
not None, i.e. its cluster has outlier_detection), report each attempt's outcome on it:

- ``put_http_status(status)`` for every upstream response status received (Envoy's
  putHttpResponseCode);
- ``put_local_origin(result)`` with one of the ``LOCAL_ORIGIN_*`` / ``EXT_ORIGIN_*`` results
  below (Envoy's putResult): connect failure, connect success, per-try or route timeout before
  the response, and reset of an established request.

With outlier detection off ``host.outlier`` is None and the data path does nothing more.
"""

from __future__ import annotations

from typing import Protocol

# Envoy's Upstream::Outlier::Result.
LOCAL_ORIGIN_TIMEOUT = 1
LOCAL_ORIGIN_CONNECT_FAILED = 2
LOCAL_ORIGIN_CONNECT_SUCCESS = 3
LOCAL_ORIGIN_CONNECT_SUCCESS_FINAL = 4
EXT_ORIGIN_REQUEST_FAILED = 5
EXT_ORIGIN_REQUEST_SUCCESS = 6


class HostMonitor(Protocol):
    """What the data path calls on ``host.outlier``."""

    def put_http_status(self, status: int) -> None: ...

    def put_local_origin(self, result: int) -> None: ...
