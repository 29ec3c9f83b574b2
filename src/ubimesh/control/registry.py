"""Workloads that proxies register by connecting (docs/control-plane.md, Workload).

A proxy whose node metadata carries ``ubimesh.workload`` (a Workload spec) and whose node id is
``<name>.<namespace>`` gets a Workload ``namespace/name`` in the store while it is connected,
annotated ``ubimesh.io/registered-by: <node id>`` and ``ubimesh.io/registered-via: <replica>``.
When its last stream closes, the Workload is deleted after ``grace`` seconds unless the node
reconnected in between, here or to another replica (the other replica re-registers and so
takes over ``registered-via``: the first replica then leaves it alone). A registration that
does not validate is refused and logged; the proxy still gets its configuration.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from ubimesh.control.ads import NodeInfo
from ubimesh.control.api import check_change
from ubimesh.control.resources import Key, ResourceErrors, parse_documents
from ubimesh.control.store import ConflictError, Store

log = logging.getLogger("ubimesh.control.registry")

REGISTERED_BY = "ubimesh.io/registered-by"
REGISTERED_VIA = "ubimesh.io/registered-via"
WORKLOAD_METADATA = "ubimesh.workload"
ROLE_METADATA = "ubimesh.role"
#: The proxy's admin HOST:PORT as it claims it (control/bootstrap.py ADMIN_ADDRESS_KEY).
ADMIN_ADDRESS_METADATA = "ubimesh.admin_address"
API_VERSION = "ubimesh.io/v1alpha1"
DEFAULT_GRACE_S = 5.0


@dataclass
class _Node:
    info: NodeInfo
    streams: int = 0
    since: float = field(default_factory=time.time)
    registered: Key | None = None
    error: str = ""

    @property
    def registration(self) -> str:
        """As ``GET /api/v1/proxies`` reports it: ``none`` (the node metadata names no
        workload), ``pending`` (the store has not answered yet), ``registered``, or
        ``refused`` (the latest answer; ``error`` says why, and a success clears it)."""
        if self.error:
            return "refused"
        if self.registered is not None:
            return "registered"
        return "none" if self.info.metadata.get(WORKLOAD_METADATA) is None else "pending"


def struct_ints(value: Any) -> Any:
    """Node metadata arrives as a protobuf Struct, whose numbers are all doubles: give whole
    numbers back their int type (ports, weights), deeply."""
    if isinstance(value, dict):
        return {k: struct_ints(v) for k, v in value.items()}
    if isinstance(value, list):
        return [struct_ints(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def split_node_id(node_id: str) -> tuple[str, str]:
    """``"web-dc.default"`` -> ``("web-dc", "default")``; ValueError when it has no dot.

    Namespaces hold no dot (DNS labels), so the last dot separates them.
    """
    name, sep, namespace = node_id.rpartition(".")
    if not sep or not name or not namespace:
        raise ValueError(
            f"node id {node_id!r} is not NAME.NAMESPACE; a registering proxy needs one "
            "(e.g. web-dc.default)"
        )
    return name, namespace


class Registry:
    """Connected proxies, and the Workloads registered on their behalf.

    ``on_connect``/``on_disconnect`` are the ADS server's callbacks; ``proxies()`` feeds
    ``GET /api/v1/proxies``. Every await is bounded by the store's own timeouts.
    """

    def __init__(self, store: Store, *, grace: float = DEFAULT_GRACE_S, replica: str = "") -> None:
        self.store = store
        self.grace = grace
        self.replica = replica or uuid.uuid4().hex[:12]
        self._nodes: dict[str, _Node] = {}
        self._expiry: dict[str, asyncio.Task[None]] = {}
        self._lock = asyncio.Lock()

    def proxies(self) -> list[dict[str, Any]]:
        out = []
        for node_id, node in sorted(self._nodes.items()):
            if node.streams <= 0:
                continue
            out.append(
                {
                    "id": node_id,
                    "cluster": node.info.cluster,
                    "role": str(node.info.metadata.get(ROLE_METADATA, "sidecar")),
                    "peer": node.info.peer,
                    "streams": node.streams,
                    "connectedSince": node.since,
                    "registration": node.registration,
                    "registered": str(node.registered) if node.registered else "",
                    "registrationError": node.error,
                    # "" when the bootstrap gave none (e.g. an Envoy of its own making).
                    "adminAddress": str(node.info.metadata.get(ADMIN_ADDRESS_METADATA) or ""),
                }
            )
        return out

    async def on_connect(self, info: NodeInfo) -> None:
        node = self._nodes.get(info.id)
        if node is None or node.streams <= 0:
            node = self._nodes[info.id] = _Node(info)
        node.streams += 1
        pending = self._expiry.pop(info.id, None)
        if pending is not None:
            pending.cancel()
        spec = info.metadata.get(WORKLOAD_METADATA)
        if spec is None:
            return
        try:
            node.registered = await self._register(info, spec)
            node.error = ""
        except (ResourceErrors, ValueError, ConflictError) as exc:
            node.error = str(exc)
            log.warning("proxy %s: its workload registration is refused:\n%s", info.id, exc)

    async def on_disconnect(self, info: NodeInfo) -> None:
        node = self._nodes.get(info.id)
        if node is None:
            return
        node.streams -= 1
        if node.streams > 0:
            return
        if node.registered is None:
            del self._nodes[info.id]
            return
        loop = asyncio.get_running_loop()
        self._expiry[info.id] = loop.create_task(self._expire(info.id, node.registered))

    async def close(self) -> None:
        """Cancel pending expiries: registrations stay for the next replica to take over."""
        tasks = list(self._expiry.values())
        self._expiry.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _register(self, info: NodeInfo, spec: Any) -> Key:
        if not isinstance(spec, dict):
            raise ValueError(
                f"node metadata {WORKLOAD_METADATA}: {type(spec).__name__} is not a Workload "
                "spec; expected a mapping"
            )
        name, namespace = split_node_id(info.id)
        document = {
            "apiVersion": API_VERSION,
            "kind": "Workload",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "annotations": {REGISTERED_BY: info.id, REGISTERED_VIA: self.replica},
            },
            "spec": struct_ints(spec),
        }
        # JSON is YAML: the same loader as every other resource validates it.
        (resource,) = parse_documents(json.dumps(document), f"node {info.id}")
        async with self._lock:
            current = await self.store.get(resource.key)
            if current is not None and current.annotations.get(REGISTERED_BY) != info.id:
                raise ValueError(
                    f"{resource.key} exists and was not registered by {info.id}; "
                    "rename the node or delete the resource"
                )
            await check_change(self.store, [resource])
            await self.store.apply(resource)
        log.info("proxy %s registered %s", info.id, resource.key)
        return resource.key

    async def _expire(self, node_id: str, key: Key) -> None:
        await asyncio.sleep(self.grace)
        self._expiry.pop(node_id, None)
        node = self._nodes.get(node_id)
        if node is not None and node.streams > 0:
            return
        self._nodes.pop(node_id, None)
        async with self._lock:
            current = await self.store.get(key)
            if current is None:
                return
            if (
                current.annotations.get(REGISTERED_BY) != node_id
                or current.annotations.get(REGISTERED_VIA) != self.replica
            ):
                return  # re-registered through another replica, or replaced by hand
            try:
                await self.store.delete(key, expected_version=current.resource_version)
            except ConflictError:
                return  # changed meanwhile (another replica took it over)
        log.info("proxy %s left; deregistered %s", node_id, key)
