"""Certificate expiry for operators: Prometheus metrics and one warning per certificate.

- :func:`expiry_warning`: why one certificate needs attention ("" when it does not): expired,
  or less than :data:`WARN_FRACTION` of its lifetime left (CA certificates: or less than
  :data:`WARN_DAYS` days). ``ubimesh certs status`` shows it; the control plane logs it.
- :func:`render_metrics`: the text ``GET /metrics`` serves (Prometheus text format 0.0.4):
  ``ubimesh_ca_cert_expiry_seconds{kind="root|intermediate",subject=...}`` per CA certificate
  and ``ubimesh_issued_leaf_expiry_seconds{identity=...}``, the soonest expiry among an
  identity's live leaves (negative values never appear: expired leaves are not live).
- :class:`ExpiryWarner`: logs a WARNING the first time a certificate (by kind and serial)
  comes within its warning window; bounded memory.

Pure functions over the CA's status and the issued-leaf rows; no I/O but the log.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "WARN_DAYS",
    "WARN_FRACTION",
    "ExpiryWarner",
    "expiry_warning",
    "render_metrics",
    "rotation_stragglers",
]

log = logging.getLogger("ubimesh.control.identity")

#: A CA certificate warns this long before expiry at the latest; any certificate warns once
#: less than WARN_FRACTION of its lifetime is left.
WARN_DAYS = 7
WARN_FRACTION = 0.2
#: Certificates remembered as already warned about (oldest forgotten beyond).
MAX_WARNED = 10_000


def expiry_warning(not_before: dt.datetime, not_after: dt.datetime, *, ca: bool,
                   now: dt.datetime | None = None) -> str:
    """"" or why the certificate needs attention: EXPIRED, or expires within
    WARN_FRACTION of its lifetime (CA certificates: also within WARN_DAYS days)."""
    now = now or dt.datetime.now(dt.UTC)
    left = not_after - now
    if left <= dt.timedelta(0):
        return "EXPIRED"
    limit = (not_after - not_before) * WARN_FRACTION
    if ca:
        limit = max(limit, dt.timedelta(days=WARN_DAYS))
    if left < limit:
        hours = left.total_seconds() / 3600
        if hours >= 48:
            when = f"{hours / 24:.1f} d"
        elif hours >= 1:
            when = f"{hours:.1f} h"
        else:
            when = f"{left.total_seconds():.0f} s"
        return f"expires in {when}"
    return ""


def _time(value: Any) -> dt.datetime:
    if isinstance(value, int | float):
        return dt.datetime.fromtimestamp(value, dt.UTC)
    return dt.datetime.fromisoformat(str(value))


def _label(value: str) -> str:
    """A Prometheus label value, escaped (backslash, double quote, new line)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _ca_certs(status: Mapping[str, Any]) -> Iterable[tuple[str, Mapping[str, Any]]]:
    for kind, key in (("root", "roots"), ("intermediate", "intermediates")):
        for item in status.get(key, []):
            yield kind, item


def render_metrics(status: Mapping[str, Any], leaves: Sequence[Mapping[str, Any]],
                   now: dt.datetime | None = None) -> str:
    """The Prometheus text for the CA's ``status()`` and the issued leaves (rows of
    ``IssuedLeaves.list()``: ``identity``, ``not_after`` in epoch seconds)."""
    now = now or dt.datetime.now(dt.UTC)
    lines = [
        "# HELP ubimesh_ca_cert_expiry_seconds Seconds until a CA certificate expires "
        "(negative: expired).",
        "# TYPE ubimesh_ca_cert_expiry_seconds gauge",
    ]
    for kind, item in _ca_certs(status):
        left = (_time(item["not_after"]) - now).total_seconds()
        lines.append(f'ubimesh_ca_cert_expiry_seconds{{kind="{kind}",'
                     f'subject="{_label(str(item["subject"]))}",'
                     f'serial="{_label(str(item.get("serial", "")))}"}} {left:.0f}')
    soonest: dict[str, float] = {}
    for row in leaves:
        left = (_time(row["not_after"]) - now).total_seconds()
        if left <= 0:
            continue  # expired: no longer a live leaf
        identity = str(row["identity"])
        soonest[identity] = min(left, soonest.get(identity, left))
    lines += [
        "# HELP ubimesh_issued_leaf_expiry_seconds Seconds until the soonest expiry among an "
        "identity's live leaf certificates.",
        "# TYPE ubimesh_issued_leaf_expiry_seconds gauge",
    ]
    lines += [f'ubimesh_issued_leaf_expiry_seconds{{identity="{_label(identity)}"}} {left:.0f}'
              for identity, left in sorted(soonest.items())]
    return "\n".join(lines) + "\n"


class ExpiryWarner:
    """Logs one WARNING per certificate that enters its warning window (:func:`expiry_warning`).

    :meth:`check` returns the messages logged this time (for tests). A certificate is known by
    its kind and serial, so a renewed one (new serial) warns again when its own time comes.
    """

    def __init__(self, logger: logging.Logger = log) -> None:
        self.log = logger
        self._warned: dict[tuple[str, str], None] = {}  # insertion-ordered, bounded

    def check(self, status: Mapping[str, Any], leaves: Sequence[Mapping[str, Any]],
              now: dt.datetime | None = None) -> list[str]:
        now = now or dt.datetime.now(dt.UTC)
        out: list[str] = []
        for kind, item in _ca_certs(status):
            reason = expiry_warning(_time(item["not_before"]), _time(item["not_after"]),
                                    ca=True, now=now)
            if reason:
                what = f"CA {kind} certificate {item['subject']} (serial {item.get('serial')})"
                fix = ("rotate the root: `ubimesh ca rotate begin`, then `finish`" if kind
                       == "root" else "the control plane renews it at half-life when it holds "
                       "the root key; otherwise import a new intermediate")
                self._warn((kind, str(item.get("serial"))), f"{what} {reason}; {fix}", out)
        for row in leaves:
            not_after = _time(row["not_after"])
            if not_after <= now:
                continue  # a workload that went away: its last leaf simply ran out
            reason = expiry_warning(_time(row["not_before"]), not_after, ca=False, now=now)
            if reason:
                node = row.get("node") or "unknown proxy"
                self._warn(("leaf", str(row.get("serial"))),
                           f"leaf certificate of {row['identity']} ({node}, serial "
                           f"{row.get('serial')}) {reason}: its renewal at half-life did not "
                           "happen; check that workload and its access to the control plane",
                           out)
        return out

    def _warn(self, key: tuple[str, str], message: str, out: list[str]) -> None:
        if key in self._warned:
            return
        if len(self._warned) >= MAX_WARNED:
            self._warned.pop(next(iter(self._warned)))
        self._warned[key] = None
        self.log.warning("%s", message)
        out.append(message)


def rotation_stragglers(status: Mapping[str, Any], leaves: Sequence[Mapping[str, Any]],
                        now: dt.datetime | None = None) -> list[Mapping[str, Any]]:
    """During a root rotation: the live leaves issued before it began (so chained to the old
    root), which would stop verifying once it finishes. [] when no rotation is under way.

    The rotation began when the new (``current``) root was made; every leaf issued since comes
    from the new intermediate. Both notBefores are backdated alike, so they compare directly.
    """
    if not status.get("rotating"):
        return []
    now = now or dt.datetime.now(dt.UTC)
    began = next((_time(r["not_before"]) for r in status.get("roots", []) if r.get("current")),
                 None)
    if began is None:
        return []
    return [row for row in leaves
            if _time(row["not_before"]) < began and _time(row["not_after"]) > now]
