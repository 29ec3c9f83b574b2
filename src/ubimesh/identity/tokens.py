"""One-time join tokens: a workload's first certificate without any prior credential.

A token is 32 random bytes (URL-safe base64). Only its SHA-256 is stored (in sqlite), so a
copy of the database does not let anyone join. A token is bound to one SPIFFE ID, expires,
and is redeemed at most once (the redeem is one conditional UPDATE, so two concurrent
redeems cannot both win).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
import sqlite3
import threading
import time
from pathlib import Path
from typing import NoReturn

from ubimesh.identity.spiffe_id import SpiffeId

__all__ = ["JoinTokens", "TokenError"]

DEFAULT_TTL = dt.timedelta(hours=1)
MAX_TTL = dt.timedelta(days=30)
#: Unredeemed, unexpired tokens kept at most (a bound on the table; create refuses beyond).
MAX_OUTSTANDING = 100_000
#: Redeemed or expired rows are kept this long (so "already used" can be told from "unknown").
KEEP_USED_S = 7 * 24 * 3600.0


class TokenError(ValueError):
    """A token cannot be redeemed; ``reason`` is ``unknown``, ``used`` or ``expired``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class JoinTokens:
    """Join tokens kept in the sqlite file ``path`` (created if missing)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), timeout=5.0, check_same_thread=False,
                                   isolation_level=None)
        self.path.chmod(0o600)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS tokens (hash TEXT PRIMARY KEY, identity TEXT NOT NULL, "
            "created REAL NOT NULL, expires REAL NOT NULL, used REAL)"
        )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def create(self, identity: SpiffeId, ttl: dt.timedelta = DEFAULT_TTL) -> str:
        """A new token for ``identity``, valid for ``ttl``; returned once, never stored."""
        if not identity.is_workload:
            raise ValueError(f"identity: {identity} has no path; a token must name a workload "
                             "identity such as spiffe://<td>/ns/<ns>/sa/<sa>")
        if not dt.timedelta(seconds=1) <= ttl <= MAX_TTL:
            raise ValueError(f"ttl: {ttl} is outside 1s .. {MAX_TTL}")
        token = secrets.token_hex(32)  # never starts with "-", so it is safe as a CLI argument
        now = time.time()
        with self._lock:
            self._db.execute("DELETE FROM tokens WHERE expires < ?", (now - KEEP_USED_S,))
            (outstanding,) = self._db.execute(
                "SELECT COUNT(*) FROM tokens WHERE used IS NULL AND expires >= ?", (now,)
            ).fetchone()
            if outstanding >= MAX_OUTSTANDING:
                raise ValueError(f"{outstanding} unused tokens are outstanding (at most "
                                 f"{MAX_OUTSTANDING}); let some expire or be used first")
            self._db.execute(
                "INSERT INTO tokens (hash, identity, created, expires, used) "
                "VALUES (?, ?, ?, ?, NULL)",
                (_hash(token), str(identity), now, now + ttl.total_seconds()),
            )
        return token

    def expires(self, token: str) -> float | None:
        """The token's expiry (Unix time), or None when unknown."""
        with self._lock:
            row = self._db.execute("SELECT expires FROM tokens WHERE hash = ?",
                                   (_hash(token),)).fetchone()
        return None if row is None else float(row[0])

    def peek(self, token: str) -> SpiffeId:
        """The identity ``token`` would redeem to, without using it (TokenError as redeem)."""
        digest = _hash(token.strip())
        with self._lock:
            found = self._db.execute("SELECT identity, used, expires FROM tokens WHERE hash = ?",
                                     (digest,)).fetchone()
        if found is None or found[1] is not None or found[2] < time.time():
            self._refuse(None if found is None else (found[1], found[2]))
        return SpiffeId.parse(str(found[0]))

    def redeem(self, token: str) -> SpiffeId:
        """The identity ``token`` is bound to; marks it used. TokenError when it is unknown,
        already used or expired."""
        digest = _hash(token.strip())
        now = time.time()
        with self._lock:
            row = self._db.execute(
                "UPDATE tokens SET used = ? WHERE hash = ? AND used IS NULL AND expires >= ? "
                "RETURNING identity",
                (now, digest, now),
            ).fetchone()
            if row is None:
                found = self._db.execute("SELECT used, expires FROM tokens WHERE hash = ?",
                                         (digest,)).fetchone()
        if row is not None:
            return SpiffeId.parse(str(row[0]))
        self._refuse(found)

    @staticmethod
    def _refuse(found: tuple[float | None, float] | None) -> NoReturn:
        if found is None:
            raise TokenError("unknown", "join token: unknown (mistyped, or from another control "
                             "plane); create one with `ubimesh token create`")
        if found[0] is not None:
            raise TokenError("used", "join token: already used; tokens are single-use, create "
                             "a new one")
        raise TokenError("expired", "join token: expired; create a new one (--ttl sets how long "
                         "it lasts)")
