"""HTTP header multimap used on the request path.

Names are stored lower-case (as Envoy's HTTP/1 codec emits them); values are latin-1 ``str`` so
that any byte an HTTP/1.1 peer sends survives a round trip (``str.encode("latin-1")``). Order is
preserved and repeated names are kept as separate entries.

This is deliberately a thin wrapper over a list of pairs: most requests carry under 20 headers,
where a linear scan beats building a dict for every request.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

#: Hop-by-hop headers (RFC 9110 section 7.6.1) plus the ones Envoy strips when proxying HTTP/1.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)


class Headers:
    """An ordered multimap of lower-case header names to latin-1 string values."""

    __slots__ = ("items",)

    def __init__(self, items: Iterable[tuple[str, str]] | None = None) -> None:
        self.items: list[tuple[str, str]] = list(items) if items is not None else []

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def __contains__(self, name: object) -> bool:
        return any(k == name for k, _ in self.items)

    def __repr__(self) -> str:
        return f"Headers({self.items!r})"

    def get(self, name: str) -> str | None:
        """The value of ``name``; repeated headers are joined with "," as Envoy does."""
        found: str | None = None
        for k, v in self.items:
            if k == name:
                found = v if found is None else found + "," + v
        return found

    def get_first(self, name: str) -> str | None:
        for k, v in self.items:
            if k == name:
                return v
        return None

    def get_all(self, name: str) -> list[str]:
        return [v for k, v in self.items if k == name]

    def add(self, name: str, value: str) -> None:
        self.items.append((name, value))

    def set(self, name: str, value: str) -> None:
        """Replace every ``name`` entry with one, keeping the first one's position."""
        items = self.items
        for i, (k, _) in enumerate(items):
            if k == name:
                items[i] = (name, value)
                self.items = items[: i + 1] + [kv for kv in items[i + 1 :] if kv[0] != name]
                return
        items.append((name, value))

    def remove(self, name: str) -> bool:
        """Remove every ``name`` entry; True when something was removed."""
        items = self.items
        kept = [kv for kv in items if kv[0] != name]
        if len(kept) == len(items):
            return False
        self.items = kept
        return True

    def copy(self) -> Headers:
        return Headers(self.items)
