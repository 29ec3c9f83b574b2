"""The state of the world ADS state machine of one stream (specs.md 4.4), without any I/O.

Per type URL the stream remembers what the client asked for (names or wildcard), the nonce and
version of the last response, and what the client said about it (ACK or NACK).  From that and
the node's newest snapshot, :meth:`StreamState.responses` decides what to send:

* a response is owed when the type is first requested, when the request adds names (or turns on
  the wildcard), or when the snapshot's version of the type differs from the one last sent and
  from the one last NACKed (a NACKed version is never sent again; a new version is);
* at most one response per type is out at a time: the next waits for the client's ACK or NACK,
  so a client that falls behind gets the newest state once, not every state in between;
* make before break: a change is pushed type by type in the order CDS, EDS, SDS, LDS, RDS (others
  after), and the push of a type waits until every earlier type has no response in flight, that
  is until the client has applied (ACKed) or refused the clusters and endpoints that the new
  listeners and routes may use.  Envoy warms a new cluster only once its endpoints arrive, and
  routes are not warmed at all, so an RDS update sent as soon as CDS went out could send traffic
  to a cluster that is still warming (503s).  Responses owed to a request (first request, new
  names) are not held back: the client asked because it needs them, and may wait for them
  before it ACKs an earlier type;
* LDS and CDS responses are complete sets; other types carry the requested names that exist
  (a name that does not exist yet is remembered and sent once it appears; an empty response,
  a no-op for those types, is never sent);
* a request whose nonce is not the last one sent for its type is stale: it changes nothing.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2

from ubimesh.control.ads.cache import Snapshot
from ubimesh.control.ads.types import COMPLETE_SET_TYPES, ordered_types

__all__ = [
    "MAX_NAMES_PER_TYPE",
    "MAX_TYPES_PER_STREAM",
    "Outcome",
    "RequestError",
    "RequestKind",
    "StreamState",
    "TypeState",
]

# Bounds of what one stream may make the server remember.  A sidecar subscribes 4 types; a
# large mesh has thousands of clusters, each an EDS name.
MAX_TYPES_PER_STREAM = 16
MAX_NAMES_PER_TYPE = 50_000
MAX_TYPE_URL_LENGTH = 256
WILDCARD = "*"


class RequestError(Exception):
    """A request the server refuses; the stream ends with ``code`` and this message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class RequestKind(enum.Enum):
    FIRST = "first"  # first request of the type on this stream
    ACK = "ack"
    NACK = "nack"
    STALE = "stale"  # nonce is not the last one sent: ignored
    UPDATE = "update"  # no nonce, type already known: a new subscription set


@dataclass(frozen=True)
class Outcome:
    """What a request was, for logs and counters."""

    kind: RequestKind
    type_url: str
    version: str | None = None  # ACK: the version applied; NACK: the version refused
    error: str = ""  # NACK: the client's error_detail message


@dataclass
class TypeState:
    names: set[str] = field(default_factory=set)
    wildcard: bool = False
    named_ever: bool = False  # explicit names were requested once (then "" is not wildcard)
    last_nonce: str | None = None
    sent_version: str | None = None
    acked_version: str | None = None
    nacked_version: str | None = None
    pending: bool = False  # a response is out and neither ACKed nor NACKed
    owed: bool = True  # a response is due whatever the version (first request, new names)

    @property
    def subscribed(self) -> bool:
        return self.wildcard or bool(self.names)


class StreamState:
    """One ADS stream's per-type state; feed it requests, ask it for responses."""

    def __init__(self, node_id: str, identifier: str) -> None:
        self.node_id = node_id
        self.types: dict[str, TypeState] = {}
        self._control_plane = base_pb2.ControlPlane(identifier=identifier)
        self._nonces = itertools.count(1)

    def on_request(self, request: discovery_pb2.DiscoveryRequest) -> Outcome:
        """Record ``request``; raises :class:`RequestError` for one the server refuses."""
        type_url = request.type_url
        if not type_url:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"node {self.node_id!r}: DiscoveryRequest.type_url is empty; on ADS every "
                "request must name its type, e.g. type.googleapis.com/envoy.config.cluster.v3."
                "Cluster",
            )
        if len(type_url) > MAX_TYPE_URL_LENGTH:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"node {self.node_id!r}: type_url is {len(type_url)} characters long; "
                f"at most {MAX_TYPE_URL_LENGTH} are accepted",
            )
        if len(request.resource_names) > MAX_NAMES_PER_TYPE:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"node {self.node_id!r}: {len(request.resource_names)} resource_names for "
                f"{type_url}; at most {MAX_NAMES_PER_TYPE} are accepted per type",
            )
        state = self.types.get(type_url)
        nonce = request.response_nonce
        if state is None:
            if nonce:
                # A nonce for a type this stream never answered cannot be the latest one.
                return Outcome(RequestKind.STALE, type_url)
            if len(self.types) >= MAX_TYPES_PER_STREAM:
                raise RequestError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"node {self.node_id!r}: more than {MAX_TYPES_PER_STREAM} type URLs "
                    f"requested on one stream (the next was {type_url})",
                )
            state = self.types[type_url] = TypeState()
            self._subscribe(state, request.resource_names, first=True)
            return Outcome(RequestKind.FIRST, type_url)
        if nonce and nonce != state.last_nonce:
            return Outcome(RequestKind.STALE, type_url)
        # Not stale: this request supersedes whatever response it did or did not answer.
        state.pending = False
        if not nonce:
            outcome = Outcome(RequestKind.UPDATE, type_url)
        elif request.HasField("error_detail"):
            # A NACK is told by error_detail; version_info is the last good version, not ours.
            state.nacked_version = state.sent_version
            outcome = Outcome(
                RequestKind.NACK, type_url, state.sent_version, request.error_detail.message
            )
        else:
            state.acked_version = request.version_info
            outcome = Outcome(RequestKind.ACK, type_url, request.version_info)
        self._subscribe(state, request.resource_names, first=False)
        return outcome

    @staticmethod
    def _subscribe(state: TypeState, requested: Iterable[str], *, first: bool) -> None:
        names = set(requested)
        if WILDCARD in names:
            names.discard(WILDCARD)
            wildcard = True
        elif names:
            wildcard = False
        else:
            # Empty: wildcard on the first request, and later as long as the stream never named
            # resources; once it has, an empty list means "unsubscribe from everything".
            wildcard = first or not state.named_ever
        if names:
            state.named_ever = True
        if (wildcard and not state.wildcard) or not names <= state.names:
            state.owed = True
        state.names = names
        state.wildcard = wildcard

    def responses(self, snapshot: Snapshot | None) -> list[discovery_pb2.DiscoveryResponse]:
        """The responses owed now, in push order; marks them sent (the caller must send them)."""
        if snapshot is None:
            return []  # the node has no snapshot yet: requests wait for one
        out = []
        in_flight = False  # an earlier type (in push order) awaits the client's ACK or NACK
        for type_url in ordered_types(self.types):
            state = self.types[type_url]
            if not state.subscribed:
                state.owed = False
                in_flight = in_flight or state.pending
                continue
            version = snapshot.version(type_url)
            changed = version not in (state.sent_version, state.nacked_version)
            if state.pending or not (state.owed or (changed and not in_flight)):
                # Nothing to send, or a version push that waits for this type's own last
                # response or for an earlier type's (make before break).
                in_flight = in_flight or state.pending
                continue
            if state.wildcard:
                names = sorted(snapshot.names(type_url))
            else:
                names = sorted(n for n in state.names if snapshot.has(type_url, n))
            if not names and type_url not in COMPLETE_SET_TYPES:
                state.owed = False
                continue
            nonce = str(next(self._nonces))
            out.append(
                discovery_pb2.DiscoveryResponse(
                    version_info=version,
                    resources=snapshot.packed(type_url, names),
                    type_url=type_url,
                    nonce=nonce,
                    control_plane=self._control_plane,
                )
            )
            state.last_nonce = nonce
            state.sent_version = version
            state.pending = True
            state.owed = False
            in_flight = True
        return out
