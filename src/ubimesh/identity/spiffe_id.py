"""SPIFFE IDs (specs.md 2.1): a strict parser mirroring go-spiffe's ``FromString``.

Only the canonical form is accepted (lowercase ``spiffe://`` and trust domain, no
percent-encoding, no query, fragment, userinfo or port), so two IDs are equal exactly when
their strings are. This module imports nothing heavy: the proxy's serving process may use it.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MAX_ID_BYTES", "MAX_TRUST_DOMAIN_BYTES", "SpiffeId", "SpiffeIdError"]

SCHEME_PREFIX = "spiffe://"
MAX_ID_BYTES = 2048
MAX_TRUST_DOMAIN_BYTES = 255

_TD_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789.-_")
_PATH_CHARS = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_"
)

# go-spiffe's error wording (spiffeid/errors.go), so messages match what operators search for.
ERR_EMPTY = "cannot be empty"
ERR_SCHEME = "scheme is missing or invalid"
ERR_TD_CHAR = (
    "trust domain characters are limited to lowercase letters, numbers, dots, dashes, and "
    "underscores"
)
ERR_TD_MISSING = "trust domain is missing"
ERR_PATH_CHAR = (
    "path segment characters are limited to letters, numbers, dots, dashes, and underscores"
)
ERR_DOT_SEGMENT = "path cannot contain dot segments"
ERR_LEADING_SLASH = "path must have a leading slash"
ERR_EMPTY_SEGMENT = "path cannot contain empty segments"
ERR_TRAILING_SLASH = "path cannot have a trailing slash"
ERR_TOO_LONG = f"is longer than {MAX_ID_BYTES} bytes"
ERR_TD_TOO_LONG = f"trust domain is longer than {MAX_TRUST_DOMAIN_BYTES} bytes"


class SpiffeIdError(ValueError):
    """``text`` is not a SPIFFE ID; ``reason`` is the rule it breaks (go-spiffe's words)."""

    def __init__(self, text: str, reason: str) -> None:
        shown = text if len(text) <= 120 else text[:117] + "..."
        super().__init__(f"invalid SPIFFE ID {shown!r}: {reason}")
        self.text = text
        self.reason = reason


def validate_trust_domain(name: str) -> str:
    """``name`` if it is a valid trust domain name (no scheme); SpiffeIdError otherwise."""
    if not name:
        raise SpiffeIdError(name, ERR_TD_MISSING)
    if any(c not in _TD_CHARS for c in name):
        raise SpiffeIdError(name, ERR_TD_CHAR)
    if len(name) > MAX_TRUST_DOMAIN_BYTES:
        raise SpiffeIdError(name, ERR_TD_TOO_LONG)
    return name


def validate_path(path: str) -> str | None:
    """The go-spiffe reason ``path`` is not a SPIFFE ID path, or None when it is one."""
    if path == "":
        return None
    if path[0] != "/":
        return ERR_LEADING_SLASH
    start = 0
    for end, c in enumerate(path):
        if c == "/":
            if end == 0:
                continue
            segment = path[start:end]
            if segment == "/":
                return ERR_EMPTY_SEGMENT
            if segment in ("/.", "/.."):
                return ERR_DOT_SEGMENT
            start = end
        elif c not in _PATH_CHARS:
            return ERR_PATH_CHAR
    last = path[start:]
    if last == "/":
        return ERR_TRAILING_SLASH
    if last in ("/.", "/.."):
        return ERR_DOT_SEGMENT
    return None


@dataclass(frozen=True, slots=True)
class SpiffeId:
    """``spiffe://<trust_domain><path>``; ``path`` is "" (the trust domain's own ID) or
    starts with "/". Build with :meth:`parse` or :meth:`for_service_account`."""

    trust_domain: str
    path: str

    def __str__(self) -> str:
        return f"{SCHEME_PREFIX}{self.trust_domain}{self.path}"

    @property
    def is_workload(self) -> bool:
        """True for a non-root path (what a leaf SVID must carry)."""
        return self.path != ""

    @classmethod
    def parse(cls, text: str) -> SpiffeId:
        """Parse ``text``; raises SpiffeIdError naming the rule broken."""
        if not text:
            raise SpiffeIdError(text, ERR_EMPTY)
        if not text.startswith(SCHEME_PREFIX):
            raise SpiffeIdError(text, ERR_SCHEME)
        rest = text[len(SCHEME_PREFIX):]
        slash = rest.find("/")
        td, path = (rest, "") if slash < 0 else (rest[:slash], rest[slash:])
        if any(c not in _TD_CHARS for c in td):
            raise SpiffeIdError(text, ERR_TD_CHAR)
        if not td:
            raise SpiffeIdError(text, ERR_TD_MISSING)
        reason = validate_path(path)
        if reason is not None:
            raise SpiffeIdError(text, reason)
        if len(text.encode()) > MAX_ID_BYTES:
            raise SpiffeIdError(text, ERR_TOO_LONG)
        if len(td) > MAX_TRUST_DOMAIN_BYTES:
            raise SpiffeIdError(text, ERR_TD_TOO_LONG)
        return cls(td, path)

    @classmethod
    def for_service_account(
        cls, trust_domain: str, namespace: str, service_account: str
    ) -> SpiffeId:
        """``spiffe://<td>/ns/<namespace>/sa/<service_account>`` (validated)."""
        return cls.parse(f"{SCHEME_PREFIX}{trust_domain}/ns/{namespace}/sa/{service_account}")

    def member_of(self, trust_domain: str) -> bool:
        return self.trust_domain == trust_domain
