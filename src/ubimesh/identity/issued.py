"""A bounded record of the leaf certificates the CA issued (for ``ubimesh certs status``).

One row per (identity, node): the latest leaf each workload got. Kept in sqlite next to the
join tokens so it survives restarts; rows whose certificate expired a day ago are dropped.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["IssuedLeaves"]

#: Rows kept at most; the oldest-expiring go first beyond it.
MAX_ROWS = 50_000
KEEP_EXPIRED_S = 24 * 3600.0


class IssuedLeaves:
    def __init__(self, path: Path | str) -> None:
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), timeout=5.0, check_same_thread=False,
                                   isolation_level=None)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS issued (identity TEXT NOT NULL, node TEXT NOT NULL, "
            "serial TEXT NOT NULL, not_before REAL NOT NULL, not_after REAL NOT NULL, "
            "PRIMARY KEY (identity, node))"
        )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def record(self, identity: str, node: str, serial: str, not_before: float,
               not_after: float) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO issued VALUES (?, ?, ?, ?, ?)",
                (identity, node, serial, not_before, not_after),
            )
            self._db.execute("DELETE FROM issued WHERE not_after < ?",
                             (time.time() - KEEP_EXPIRED_S,))
            self._db.execute(
                "DELETE FROM issued WHERE rowid NOT IN (SELECT rowid FROM issued ORDER BY "
                "not_after DESC LIMIT ?)", (MAX_ROWS,))

    def list(self) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT identity, node, serial, not_before, not_after FROM issued "
                "ORDER BY identity, node").fetchall()
        return [
            {"identity": r[0], "node": r[1], "serial": r[2], "not_before": r[3],
             "not_after": r[4]}
            for r in rows
        ]
