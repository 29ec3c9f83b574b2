"""``ApiError``: one error answer of the control plane's API, on both ends of it.

The server (``api.py``) raises it to answer ``{"error": ..., "details": [...]}`` with
``status``; the client (``client.py``) raises it when it reads such an answer (``status`` 0:
no answer at all).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class ApiError(Exception):
    """An error answer: HTTP ``status``, a one-line ``error`` and a list of ``details``."""

    def __init__(self, status: int, error: str, details: Sequence[Any] = ()) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.details = list(details)

    def lines(self) -> list[str]:
        """The error and each detail, one a line (what the CLI prints)."""
        out = [d.get("message", str(d)) if isinstance(d, dict) else str(d) for d in self.details]
        return out or [self.error]
