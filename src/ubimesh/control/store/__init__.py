"""The control plane's store: SQLite (default) or etcd v3 (docs/control-plane.md, section 2).

``open_store(url)`` picks the backend; everything else codes against the ``Store`` protocol.
"""

from ubimesh.control.store.base import (
    ConflictError,
    Store,
    StoreError,
    StoreUnavailableError,
    WatchError,
    WatchEvent,
    open_store,
)

__all__ = [
    "ConflictError",
    "Store",
    "StoreError",
    "StoreUnavailableError",
    "WatchError",
    "WatchEvent",
    "open_store",
]
