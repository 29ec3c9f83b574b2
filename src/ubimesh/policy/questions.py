"""Policy questions answered before applying (docs/policy.md section 4): ``can``,
``blast_radius`` and ``diff``.

One evaluator, the code the proxies run: :class:`MeshPolicy` compiles each destination's
sidecar inbound listeners with the control plane's compiler (``compile_sidecar`` on the
workload with its inbound ports only: the same listeners, RBAC filters included, that its
proxy gets), translates every RBAC filter with the proxy's translator (``ubimesh.proxy.xds.rbac``:
``rbac_config_from_proto`` and the functions it is made of) and decides with
``ubimesh.policy.rbac.evaluate``.

- ``can``: a concrete request (or connection, on a tcp port) from an identity to every
  destination workload of a service: allowed or denied, and the deciding policy.
- ``blast_radius``: every (service, port, route) an identity can reach directly, then
  transitively, breadth-first over the identities of the destinations it reaches.
- ``diff``: every (source identity, destination, port, route) whose decision flips between two
  meshes.

"Can reach a route" is decided per policy: ``evaluate`` on that policy alone, for a request
from the identity to the listener's port, with the request-dependent conditions (header and
url_path permissions, and a ``not`` over them) taken as satisfiable, because the caller
chooses its method, path and headers; principals that depend on where the caller runs or what
it sends (source IPs, headers) are taken as matching too. So ``blast_radius`` and ``diff``
over-approximate reach rather than miss any; for the SMI policies the compiler writes (exact
principals, a port gate and route matches) the answer is exact. The routes of a policy are the
HTTPRouteGroup matches its TrafficTarget rule names (``<group>/<match>``), or ``*`` (a
TCPRoute rule, a tcp port, a destination with no RBAC, a policy not written by the compiler).

Caches (they keep ``blast_radius`` on 1,000 services and 5,000 rules under 2 s,
``bench/policy_blast_radius.py``): a destination's listeners are compiled once per (namespace,
service, service account, inbound ports), as every workload with those compiles to the same
listeners but for their address; each distinct permission and principal message is translated
once (the compiler repeats them: one route group, one source identity); each (policy,
identity, port) is evaluated once; and the source identities a policy names exactly are
indexed, so a question about one identity evaluates only the policies that name it (and the
few that do not name identities exactly).
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.rbac.v3 import rbac_pb2 as network_rbac_pb2

from ubimesh.control.compiler.context import Context
from ubimesh.control.compiler.index import (
    Index,
    Service,
    Sidecar,
    TrafficRule,
    Workload,
    build_index,
)
from ubimesh.control.compiler.model import LISTENER_TYPE, TYPE_URLS, Message, XdsSet
from ubimesh.control.compiler.mtls import service_identities, spiffe_id
from ubimesh.control.compiler.sidecar import compile_sidecar
from ubimesh.control.resources.model import DEFAULT_NAMESPACE, Resource
from ubimesh.policy import rbac, split
from ubimesh.policy.errors import QuestionError
from ubimesh.proto.path import PathAction, normalize_request_path
from ubimesh.proxy.snapshot.types import PathWithEscapedSlashesAction, StringMatchKind
from ubimesh.proxy.xds import rbac as xds_rbac
from ubimesh.proxy.xds.context import Ctx, entry, item, join
from ubimesh.proxy.xds.errors import ConfigErrors
from ubimesh.proxy.xds.rbac import rbac_config_from_proto

#: Where a caller with no workload of its own is taken to connect from.
UNKNOWN_SOURCE_IP = "127.0.0.1"
SPIFFE_SCHEME = "spiffe://"


# ---------------------------------------------------------------------------------------------
# Answers (plain data; formatting is the CLI's job)


class Route(NamedTuple):
    """One HTTPRouteGroup match a policy allows (``name`` ``<group>/<match>``), or ``*``.
    (Routes and destinations are named tuples: they are dictionary keys in the hot loops.)"""

    name: str
    methods: tuple[str, ...] = ()
    path_regex: str = ""
    headers: tuple[tuple[str, str], ...] = ()


ANY_ROUTE = Route("*")


class Destination(NamedTuple):
    """A service port as served by the workloads of one identity (service account)."""

    namespace: str
    service: str
    identity: str
    port: int  # the service port
    port_name: str
    protocol: str  # "http" | "tcp"


@dataclass(frozen=True)
class CanRow:
    """The answer for one destination workload and port."""

    source: str
    destination: Destination
    workload: str
    allowed: bool
    policy: str  # the deciding policy, "" for none
    note: str = ""


@dataclass(frozen=True)
class CanAnswer:
    rows: tuple[CanRow, ...]

    @property
    def allowed(self) -> bool:
        """True when every row is allowed (and there is at least one)."""
        return bool(self.rows) and all(r.allowed for r in self.rows)


@dataclass(frozen=True)
class Reach:
    """One step of a blast radius: ``source`` reaches ``route`` of ``destination`` at ``hops``
    (1: the identity asked about), allowed by ``policy`` ("" when no RBAC filter applies)."""

    hops: int
    source: str
    destination: Destination
    route: Route
    policy: str


@dataclass(frozen=True)
class BlastRadius:
    identity: str
    reached: tuple[Reach, ...]  # by hops, then destination and route
    identities: tuple[tuple[str, int], ...]  # every identity reached, with its hop count


@dataclass(frozen=True)
class Flip:
    """A (source, destination, route) whose decision differs between the two meshes."""

    source: str
    destination: Destination
    route: Route
    before: bool
    after: bool
    policy_before: str
    policy_after: str

    @property
    def kind(self) -> str:
        return "new-allow" if self.after else "new-deny"


@dataclass(frozen=True)
class PolicyDiff:
    flips: tuple[Flip, ...]

    def count(self, kind: str) -> int:
        return sum(1 for f in self.flips if f.kind == kind)


# ---------------------------------------------------------------------------------------------
# One mesh's policy: compiled, translated, evaluated


@dataclass(frozen=True)
class _Filter:
    """One enforcing RBAC filter of a listener, translated."""

    rules: rbac.RbacRules
    network: bool


@dataclass
class _Listener:
    """A workload's inbound listener for one service port, with what authorizes on it."""

    destination: Destination
    workload: str
    address: str
    listener_port: int
    #: The enforcing RBAC filters in order (network filters, then HTTP filters); () when
    #: nothing authorizes (no RBAC filter, or filters with no ``rules``).
    filters: tuple[_Filter, ...]
    #: The HCM's path options (HTTP listeners): normalize_path, merge_slashes, escaped slashes.
    path_options: tuple[bool, bool, PathWithEscapedSlashesAction] | None
    note: str = ""


@dataclass
class _Grant:
    """A policy of a filter, with the identities it names exactly (None: not indexable)."""

    filter: _Filter
    index: int  # position in filter.rules.policies
    names: frozenset[str] | None
    listeners: list[_Listener] = field(default_factory=list)
    #: With ``names``: the listeners it admits any of them to, with the routes (the same for
    #: every name: the principals match each of them). Filled on first use.
    reach: list[tuple[_Listener, tuple[Route, ...]]] | None = None


#: From how many services ``load_listeners`` shares the work with a forked child (below, the
#: fork and the pickling cost more than they save).
_PARALLEL_MIN_SERVICES = 200
#: Into how many chunks of services it cuts the work: enough for both processes to end
#: together (each takes the next chunk when done with one), few enough to cost nothing.
_CHUNKS = 32


class _AuthorizationContext(Context):
    """The compiler's context for compiling listeners only to read their authorization: the
    listeners' filter chains are the compiler's own, but nothing is spent on what only labels
    or versions them. Telemetry ``peers`` (a map per destination account, built by walking
    every workload of the mesh) go to listener metadata, and the set's version digests (a
    serialization and a hash per resource) to the xDS versions: the questions read neither
    (``tests/unit/test_policy_context.py`` checks the filter chains are the same)."""

    def telemetry_peers(self, namespace: str, account: str) -> dict[str, str]:
        return {}

    def xds_set(
        self,
        listeners: Mapping[str, Message],
        routes: Mapping[str, Message],
        clusters: Iterable[str],
        local_clusters: Mapping[str, Message],
        site: str,
    ) -> XdsSet:
        resources: dict[str, Mapping[str, Message]] = {url: {} for url in TYPE_URLS}
        resources[LISTENER_TYPE] = dict(listeners)
        return XdsSet(resources=resources, versions={url: "" for url in TYPE_URLS})


class MeshPolicy:
    """The policy of one set of resources (as stored: validated, defaults filled)."""

    def __init__(self, resources: Sequence[Resource]) -> None:
        self.resources = list(resources)
        self.index: Index = build_index(self.resources)
        self.ctx: Context = _AuthorizationContext(self.index)
        # Only the inbound listeners' authorization matters here: no access log decoration
        # (tracing is off in a bare Context too), which would cost most of the compile time.
        self.ctx.access_log = None
        self.trust_domain = self.index.mesh.trust_domain
        self._targets = {(t.namespace, t.name): t for t in self.index.traffic_targets}
        self._compiled: dict[tuple[Any, ...], dict[str, Any]] = {}
        self._authorizers: dict[int, tuple[tuple[_Filter, ...], Any]] = {}
        self._leaves: dict[tuple[str, bool, bytes], tuple[Any, bool]] = {}
        self._listeners: dict[tuple[str, str], list[_Listener]] = {}
        self._grants: tuple[dict[str, list[_Grant]], list[_Grant], list[_Listener]] | None = None
        self._single: dict[tuple[int, int, bool], tuple[rbac.RbacRules, bool]] = {}
        self._admitted: dict[tuple[tuple[int, int, bool], str, int, str], bool] = {}
        self._routes: dict[tuple[str, bool], tuple[Route, ...]] = {}
        self._relaxed: dict[tuple[int, bool], tuple[Any, bool]] = {}
        self._rule_routes: dict[tuple[str, TrafficRule], tuple[Route, ...]] = {}
        self._direct: dict[str, list[tuple[_Listener, Route, str]]] = {}
        self._addresses: dict[str, str] | None = None

    # -- names --------------------------------------------------------------------------------

    def identity_of(self, workload: Workload) -> str:
        return spiffe_id(self.trust_domain, workload.namespace, workload.service_account)

    def identities(self) -> list[str]:
        """Every identity the mesh names: its workloads' and its TrafficTargets' sources."""
        found = {self.identity_of(w) for w in self.index.workloads}
        for target in self._targets.values():
            for source in target.sources:
                if source.kind == "ServiceAccount":
                    found.add(spiffe_id(self.trust_domain, source.namespace, source.name))
        return sorted(found)

    def service(self, ref: str, namespace: str, flag: str) -> Service:
        """The service ``ref`` (``NAME`` in ``namespace``, or ``NAME.NAMESPACE``)."""
        name, _, ns = ref.partition(".")
        key = (ns or namespace, name)
        found = self.index.services.get(key)
        if found is None:
            known = sorted(f"{n}.{s}" for s, n in self.index.services)
            hint = ", ".join(known[:8]) + (", ..." if len(known) > 8 else "")
            raise QuestionError(
                f"{flag} {ref!r}: no service {key[1]!r} in namespace {key[0]!r}; give NAME "
                f"(with -n NAMESPACE) or NAME.NAMESPACE of a Service"
                + (f" (services: {hint})" if hint else " (the mesh has no services)")
            )
        return found

    def sources(self, ref: str, namespace: str, flag: str = "--from") -> list[str]:
        """The identities ``ref`` means: a SPIFFE ID, or every identity of a service's
        workloads."""
        if ref.startswith(SPIFFE_SCHEME):
            return [ref]
        try:
            service = self.service(ref, namespace, flag)
        except QuestionError as exc:
            raise QuestionError(
                f"{exc}; or give an identity: spiffe://{self.trust_domain}/ns/<namespace>/sa/"
                "<service account>"
            ) from None
        ids = service_identities(self.index, service)
        if not ids:
            raise QuestionError(
                f"{flag} {ref!r}: service {service.fqdn} has no workloads, so no identity; "
                f"give a SPIFFE ID (spiffe://{self.trust_domain}/ns/<ns>/sa/<account>)"
            )
        return ids

    # -- compiling and translating --------------------------------------------------------------

    def _compile(self, workload: Workload) -> dict[str, Any]:
        """The workload's inbound listeners, as its sidecar gets them (by name)."""
        sidecar = workload.sidecar
        assert sidecar is not None
        inbound = tuple(sorted(sidecar.inbound_ports.items()))
        key = (workload.namespace, workload.service, workload.service_account, inbound)
        listeners = self._compiled.get(key)
        if listeners is None:
            # Only what authorization needs: the outbound listener and upstreams of a sidecar
            # reach every service and cost the most; the inbound listeners do not depend on
            # them.
            only_inbound = dataclasses.replace(workload, sidecar=Sidecar(dict(inbound), None, ()))
            xds = compile_sidecar(self.ctx, only_inbound)
            listeners = dict(xds.resources[LISTENER_TYPE])
            self._compiled[key] = listeners
        return listeners

    def _translate(self, message: Any, kind: str) -> rbac.RbacConfig:
        """The proxy's translation of one RBAC filter message, piece by piece: the filter's
        own fields (and its shadow rules) by ``rbac_config_from_proto`` on the message without
        its ``rules``; the rules' fields and each policy's by ``rbac_rules`` and ``policy`` on
        them without their policies, permissions and principals; each permission and
        principal by ``permission`` and ``principal``. Each distinct piece is translated once
        (the compiler repeats them across destinations: one route group, one source
        identity). Raises ``ConfigErrors`` as ``rbac_config_from_proto`` does."""
        network = kind == "network"
        ctx = Ctx()
        config: rbac.RbacConfig = self._leaf(ctx, _filter_fields, _without(message, "rules"),
                                             "", network)
        if message.HasField("rules"):
            config = dataclasses.replace(
                config, rules=self._rules(ctx, message.rules, "rules", network)
            )
        if ctx.errors:
            raise ConfigErrors(ctx.errors)
        return config

    def _rules(self, ctx: Ctx, msg: Any, path: str, network: bool) -> rbac.RbacRules:
        action = self._leaf(ctx, xds_rbac.rbac_rules, _without(msg, "policies"), path,
                            network).action
        policies = []
        for name in sorted(msg.policies):
            one = msg.policies[name]
            ppath = entry(join(path, "policies"), name)
            bare = _without(one, "permissions", "principals")
            # One cheap stand-in each where the policy has some, so that the policy's own
            # checks (at least one of each) see what the real policy has.
            if one.permissions:
                bare.permissions.add(any=True)
            if one.principals:
                bare.principals.add(any=True)
            self._leaf(ctx, _policy_fields, bare, ppath, network)
            policies.append(rbac.Policy(
                name,
                tuple(self._leaf(ctx, xds_rbac.permission, p, item(join(ppath, "permissions"), i),
                                 network) for i, p in enumerate(one.permissions)),
                tuple(self._leaf(ctx, xds_rbac.principal, p, item(join(ppath, "principals"), i),
                                 network) for i, p in enumerate(one.principals)),
            ))
        return rbac.sorted_rules(action, policies)

    def _leaf(self, ctx: Ctx, translate: Any, msg: Any, path: str, network: bool) -> Any:
        """``translate(ctx, msg, path, network=network)``, once per distinct message; a
        message with problems is translated again for each path it appears at, so that every
        error names its own path."""
        key = (translate.__name__, network, msg.SerializeToString(deterministic=True))
        found = self._leaves.get(key)
        if found is None or found[1]:
            mine = Ctx()
            found = (translate(mine, msg, path, network=network), bool(mine.errors))
            self._leaves[key] = found
            ctx.errors.extend(mine.errors)
        return found[0]

    def listeners(self, service: Service) -> list[_Listener]:
        """Every (workload, service port) of ``service``: its inbound listener's RBAC."""
        key = (service.namespace, service.name)
        found = self._listeners.get(key)
        if found is not None:
            return found
        out = []
        for workload in self.index.workloads_of.get(key, ()):
            compiled = self._compile(workload) if workload.sidecar is not None else {}
            for port in service.ports:
                destination = Destination(
                    service.namespace, service.name, self.identity_of(workload), port.port,
                    port.name, port.protocol,
                )
                inbound = (
                    workload.sidecar.inbound_ports.get(port.name)
                    if workload.sidecar is not None
                    else None
                )
                listener = compiled.get(f"inbound_{inbound}") if inbound is not None else None
                if listener is None:
                    note = (
                        "no sidecar: nothing authorizes"
                        if workload.sidecar is None
                        else f"no sidecar inbound port for {port.name!r}: nothing authorizes"
                    )
                    out.append(_Listener(destination, workload.name, workload.address,
                                         port.port, (), None, note))
                    continue
                out.append(self._listener(destination, workload, listener))
        self._listeners[key] = out
        return out

    def _listener(self, destination: Destination, workload: Workload, msg: Any) -> _Listener:
        # The compiled listener is shared by the workloads of one compile key (and kept alive
        # by self._compiled, so its id is not reused).
        found = self._authorizers.get(id(msg))
        if found is None:
            found = self._authorizer(msg)
            self._authorizers[id(msg)] = found
        filters, path_options = found
        return _Listener(destination, workload.name, workload.address,
                         int(msg.address.socket_address.port_value), filters, path_options)

    def _authorizer(
        self, msg: Any
    ) -> tuple[tuple[_Filter, ...], tuple[bool, bool, PathWithEscapedSlashesAction] | None]:
        """The enforcing RBAC filters of a listener, and its HCM's path options."""
        chains = list(msg.filter_chains)
        # PERMISSIVE has a plaintext chain and an mTLS one; a caller with an identity takes
        # the mTLS one.
        chain = next(
            (c for c in chains if c.filter_chain_match.transport_protocol == "tls"), chains[0]
        )
        filters: list[_Filter] = []
        path_options = None
        for f in chain.filters:
            if f.typed_config.Is(network_rbac_pb2.RBAC.DESCRIPTOR):
                network = network_rbac_pb2.RBAC()
                f.typed_config.Unpack(network)
                self._add(filters, self._translate(network, "network"), network=True)
            elif f.typed_config.Is(hcm_pb2.HttpConnectionManager.DESCRIPTOR):
                hcm = hcm_pb2.HttpConnectionManager()
                f.typed_config.Unpack(hcm)
                path_options = _path_options(hcm)
                for http_filter in hcm.http_filters:
                    if http_filter.typed_config.Is(http_rbac_pb2.RBAC.DESCRIPTOR):
                        http = http_rbac_pb2.RBAC()
                        http_filter.typed_config.Unpack(http)
                        self._add(filters, self._translate(http, "http"), network=False)
        return tuple(filters), path_options

    @staticmethod
    def _add(filters: list[_Filter], config: rbac.RbacConfig, *, network: bool) -> None:
        if config.rules is not None:  # shadow rules are counted, never enforced
            filters.append(_Filter(config.rules, network))

    def _all_listeners(self) -> Iterator[_Listener]:
        self.load_listeners()
        for service in self.index.services.values():
            yield from self.listeners(service)

    def load_listeners(self, meanwhile: Callable[[], object] | None = None) -> None:
        """Compile and translate every service's inbound listeners now (``listeners`` then
        only reads the cache). Questions about the whole mesh need them all, and on a large
        mesh this is most of their time: CPU-bound Python, so with more than one CPU a
        forked child takes chunks of the services too and sends their listeners back
        pickled (``split.share``). The answers are the same either way; what the child does
        not deliver this process does itself, which also reports any error with its own
        message. ``meanwhile`` is called once, by this process, while the child has already
        started (the CLI validates the resource set then)."""
        todo = [s for s in self.index.services.values()
                if (s.namespace, s.name) not in self._listeners]
        if len(todo) < _PARALLEL_MIN_SERVICES:
            if meanwhile is not None:
                meanwhile()
            for service in todo:
                self.listeners(service)
            return
        size = -(-len(todo) // _CHUNKS)
        chunks = [todo[i:i + size] for i in range(0, len(todo), size)]

        def work(i: int) -> dict[tuple[str, str], list[_Listener]]:
            return {(s.namespace, s.name): self.listeners(s) for s in chunks[i]}

        for found in split.share(len(chunks), work, meanwhile).values():
            self._listeners.update(found)

    # -- can ------------------------------------------------------------------------------------

    def can(
        self,
        sources: Sequence[str],
        service: Service,
        *,
        port: str | int | None = None,
        method: str = "GET",
        path: str = "/",
        headers: Sequence[tuple[str, str]] = (),
    ) -> CanAnswer:
        """The decision for one request (HTTP port) or connection (tcp port) from each of
        ``sources`` to every workload of ``service`` at ``port`` (every port when None)."""
        listeners = self.listeners(service)
        if port is not None:
            wanted = service.find_port(port)
            if wanted is None:
                ports = ", ".join(f"{p.name}:{p.port}" for p in service.ports)
                raise QuestionError(
                    f"--port {port!r}: service {service.fqdn} has no such port; give one of "
                    f"its ports by number or name ({ports})"
                )
            listeners = [x for x in listeners if x.destination.port_name == wanted.name]
        if not listeners:
            raise QuestionError(
                f"--to {service.fqdn}: the service has no workloads, so nothing to ask; add a "
                "Workload of the service (or ask about another service)"
            )
        rows = []
        for source in sources:
            for listener in listeners:
                allowed, policy, note = self._decide(source, listener, method, path, headers)
                rows.append(CanRow(source, listener.destination, listener.workload, allowed,
                                   policy, note))
        return CanAnswer(tuple(rows))

    def _decide(
        self, source: str, listener: _Listener, method: str, path: str,
        headers: Sequence[tuple[str, str]],
    ) -> tuple[bool, str, str]:
        if not listener.filters:
            return True, "", listener.note or "no RBAC filter: everything is allowed"
        source_ip = self._source_ip(source)
        principals = (source,)
        http = listener.destination.protocol == "http" and listener.path_options is not None
        note = ""
        if http:
            assert listener.path_options is not None
            normalize, merge, escaped = listener.path_options
            normalized = normalize_request_path(path, normalize=normalize, merge_slashes=merge,
                                                escaped_slashes=escaped)
            if normalized.action is PathAction.REJECT:
                return False, "", "the proxy answers 400 (invalid path) before authorization"
            if normalized.action is PathAction.REDIRECT:
                note = "the proxy redirects (307) to the unescaped path before authorization"
            forwarded = normalized.path
            authority = f"{listener.destination.service}.{listener.destination.namespace}"
            values: dict[str, list[str]] = defaultdict(list)
            for name, value in headers:
                values[name.lower()].append(value)
            # What the proxy's RBAC filter sees besides the caller's headers (the caller has
            # an identity, so it came over TLS).
            values[":method"] = [method]
            values[":path"] = [forwarded]
            values[":scheme"] = ["https"]
            values.setdefault(":authority", values.get("host") or [authority])
            values["host"] = values[":authority"]
            table = {k: tuple(v) for k, v in values.items()}
            request = rbac.RbacInput(
                method=method, path=forwarded.partition("?")[0],
                headers=lambda name: table.get(name, ()),
                destination_ip=listener.address, destination_port=listener.listener_port,
                direct_remote_ip=source_ip, remote_ip=source_ip, principals=principals,
            )
        else:
            if listener.destination.protocol == "tcp":
                note = "tcp port: a connection (method, path and headers do not apply)"
            request = rbac.RbacInput(
                method="", path="", headers=_no_headers, destination_ip=listener.address,
                destination_port=listener.listener_port, direct_remote_ip=source_ip,
                remote_ip=source_ip, principals=principals,
            )
        policy = ""
        for f in listener.filters:
            # A network filter (before the HCM) sees the connection only.
            decision = rbac.evaluate(f.rules, _connection(request) if f.network else request)
            if not decision.allowed:
                return False, decision.policy, note
            policy = decision.policy
        return True, policy, note

    def _source_ip(self, identity: str) -> str:
        """Where a caller with ``identity`` connects from: its first workload's address."""
        if self._addresses is None:
            self._addresses = {}
            for w in self.index.workloads:
                self._addresses.setdefault(self.identity_of(w), w.address)
        return self._addresses.get(identity, UNKNOWN_SOURCE_IP)

    # -- reach ----------------------------------------------------------------------------------

    def _index_grants(self) -> tuple[dict[str, list[_Grant]], list[_Grant], list[_Listener]]:
        """(grants by the identity they name, grants naming no identity exactly, listeners
        open to everyone)."""
        if self._grants is not None:
            return self._grants
        by_filter: dict[int, list[_Grant]] = {}
        by_name: dict[str, list[_Grant]] = defaultdict(list)
        wildcard: list[_Grant] = []
        open_listeners: list[_Listener] = []
        for listener in self._all_listeners():
            allow = [f for f in listener.filters if f.rules.action is rbac.RbacAction.ALLOW]
            if not allow:
                # No filter, or only DENY/LOG filters: reachable by anyone on some request
                # (a DENY rule denies some requests; blast radius over-approximates).
                open_listeners.append(listener)
                continue
            # Several ALLOW filters would all have to allow; the compiler writes one per
            # listener, and the first one decides reach here.
            first = allow[0]
            grants = by_filter.get(id(first.rules))
            if grants is None:
                grants = []
                for i, policy in enumerate(first.rules.policies):
                    names = _exact_names(policy.principals)
                    grant = _Grant(first, i, names)
                    grants.append(grant)
                    if names is None:
                        wildcard.append(grant)
                    else:
                        for name in names:
                            by_name[name].append(grant)
                by_filter[id(first.rules)] = grants
            for grant in grants:
                grant.listeners.append(listener)
        self._grants = (dict(by_name), wildcard, open_listeners)
        return self._grants

    def _admits(self, grant: _Grant, identity: str, listener: _Listener) -> bool:
        single_key = (id(grant.filter.rules), grant.index, grant.filter.network)
        single = self._single.get(single_key)
        if single is None:
            policy = grant.filter.rules.policies[grant.index]
            network = grant.filter.network
            permissions = [self._relaxed_permission(p, network) for p in policy.permissions]
            relaxed = rbac.Policy(
                policy.name,
                tuple(p for p, _ in permissions),
                tuple(_relax_principal(p, network) for p in policy.principals),
            )
            single = (rbac.RbacRules(rbac.RbacAction.ALLOW, (relaxed,)),
                      any(uses_ip for _, uses_ip in permissions))
            self._single[single_key] = single
        rules, by_address = single
        # The answer depends on the listener's address only through destination_ip rules.
        key = (single_key, identity, listener.listener_port,
               listener.address if by_address else "")
        known = self._admitted.get(key)
        if known is not None:
            return known
        probe = rbac.RbacInput(
            method="GET", path="/", headers=_no_headers, destination_ip=listener.address,
            destination_port=listener.listener_port, direct_remote_ip=UNKNOWN_SOURCE_IP,
            remote_ip=UNKNOWN_SOURCE_IP, principals=(identity,),
        )
        allowed = rbac.evaluate(rules, probe).allowed
        self._admitted[key] = allowed
        return allowed

    def _relaxed_permission(self, permission: Any, network: bool) -> tuple[Any, bool]:
        """(``permission`` relaxed, whether it tests the destination IP), once per permission
        object: the translation shares one object among the policies with the same route
        matches (kept alive by the translation cache, so ids are not reused)."""
        key = (id(permission), network)
        found = self._relaxed.get(key)
        if found is None:
            relaxed = _relax_permission(permission, network)
            found = (relaxed, _uses_destination_ip(relaxed))
            self._relaxed[key] = found
        return found

    def routes_of(self, policy: str, network: bool) -> tuple[Route, ...]:
        """The routes policy ``<ns>/<traffic target>/<rule index>`` allows: its rule's
        HTTPRouteGroup matches (none when the group or a match does not exist: fail closed),
        else ``*``."""
        key = (policy, network)
        found = self._routes.get(key)
        if found is not None:
            return found
        routes: tuple[Route, ...] = (ANY_ROUTE,)
        parts = policy.split("/")
        target = self._targets.get((parts[0], parts[1])) if len(parts) == 3 else None
        if target is not None and not network and parts[2].isdigit():
            i = int(parts[2])
            if i < len(target.rules) and target.rules[i].kind == "HTTPRouteGroup":
                routes = self._group_routes(target.namespace, target.rules[i])
        self._routes[key] = routes
        return routes

    def _group_routes(self, namespace: str, rule: TrafficRule) -> tuple[Route, ...]:
        key = (namespace, rule)
        found = self._rule_routes.get(key)
        if found is None:
            found = self._rule_routes[key] = self._build_group_routes(namespace, rule)
        return found

    def _build_group_routes(self, namespace: str, rule: TrafficRule) -> tuple[Route, ...]:
        group = rule.name
        matches = self.index.route_groups.get((namespace, group))
        if matches is None:
            return ()
        wanted = rule.matches
        out = []
        for m in matches:
            if wanted and m.get("name") not in wanted:
                continue
            methods = tuple(str(x) for x in m.get("methods") or ())
            out.append(Route(
                f"{group}/{m.get('name')}",
                () if "*" in methods else methods,
                str(m.get("pathRegex") or ""),
                tuple(sorted((str(k), str(v)) for k, v in (m.get("headers") or {}).items())),
            ))
        # A match name the group does not have matches nothing; the others still do.
        return tuple(out)

    def direct(self, identity: str) -> list[tuple[_Listener, Route, str]]:
        """Every (listener, route, deciding policy) ``identity`` reaches in one step; per
        listener and route the first policy by name (the one ``evaluate`` would report)."""
        found = self._direct.get(identity)
        if found is not None:
            return found
        by_name, wildcard, open_listeners = self._index_grants()
        out: list[tuple[_Listener, Route, str]] = [
            (listener, ANY_ROUTE, "") for listener in open_listeners
        ]
        seen: set[tuple[int, Route]] = set()
        candidates = sorted(
            [*by_name.get(identity, ()), *wildcard],
            key=lambda g: g.filter.rules.policies[g.index].name,
        )
        for grant in candidates:
            name = grant.filter.rules.policies[grant.index].name
            for listener, routes in self._grant_reach(grant, identity):
                for route in routes:
                    mark = (id(listener), route)
                    if mark not in seen:
                        seen.add(mark)
                        out.append((listener, route, name))
        self._direct[identity] = out
        return out

    def _grant_reach(
        self, grant: _Grant, identity: str
    ) -> list[tuple[_Listener, tuple[Route, ...]]]:
        """The listeners ``grant`` admits ``identity`` to, with the routes it allows there.
        For a grant naming identities exactly (``identity`` is one of them: ``direct`` finds
        it by name) the principals match whichever of them asks, so the answer is the same
        for all and computed once."""
        if grant.reach is not None:
            return grant.reach
        name = grant.filter.rules.policies[grant.index].name
        out = []
        for listener in grant.listeners:
            if self._admits(grant, identity, listener):
                network = grant.filter.network or listener.destination.protocol != "http"
                out.append((listener, self.routes_of(name, network)))
        if grant.names is not None:
            grant.reach = out
        return out

    def reach_map(self, identity: str) -> dict[tuple[Destination, Route], str]:
        """(destination, route) -> the policy allowing it (first by name over the
        destination's workloads), for what ``identity`` reaches in one step."""
        out: dict[tuple[Destination, Route], str] = {}
        for listener, route, policy in self.direct(identity):
            key = (listener.destination, route)
            if key not in out or (policy and (not out[key] or policy < out[key])):
                out[key] = policy
        return out


def _without(msg: Any, *names: str) -> Any:
    """A new message of ``msg``'s type with every field ``msg`` sets except ``names``."""
    out = type(msg)()
    for f, value in msg.ListFields():
        if f.name in names:
            continue
        if f.is_repeated or f.message_type is not None:
            getattr(out, f.name).MergeFrom(value)  # lists, maps and messages alike
        else:
            setattr(out, f.name, value)
    return out


def _filter_fields(ctx: Ctx, msg: Any, path: str, *, network: bool) -> rbac.RbacConfig:
    """The proxy's translation of an RBAC filter message (here: without its ``rules``)."""
    try:
        return rbac_config_from_proto(msg)
    except ConfigErrors as exc:
        ctx.errors.extend(exc.errors)
        return rbac.RbacConfig(None, None)


def _policy_fields(ctx: Ctx, msg: Any, path: str, *, network: bool) -> rbac.Policy:
    """The translator's checks of a Policy message's own fields (its name is in ``path``)."""
    return xds_rbac.policy(ctx, "", msg, path, network=network)


def _path_options(hcm: Any) -> tuple[bool, bool, PathWithEscapedSlashesAction]:
    escaped = PathWithEscapedSlashesAction.KEEP_UNCHANGED
    if hcm.path_with_escaped_slashes_action:  # 0 (IMPLEMENTATION_SPECIFIC_DEFAULT): keep
        escaped = PathWithEscapedSlashesAction(hcm.path_with_escaped_slashes_action)
    normalize = hcm.normalize_path.value if hcm.HasField("normalize_path") else False
    return bool(normalize), bool(hcm.merge_slashes), escaped


def _no_headers(name: str) -> Sequence[str]:
    return ()


def _connection(request: rbac.RbacInput) -> rbac.RbacInput:
    """What a network filter sees of ``request``: the connection only."""
    return dataclasses.replace(request, method="", path="", headers=_no_headers)


def _exact_names(principals: Iterable[Any]) -> frozenset[str] | None:
    """The identities that can match ``principals``, when each is ``authenticated`` with an
    exact, case-sensitive principal name (or an ``or`` of those); None otherwise."""
    names: set[str] = set()
    for principal in principals:
        found = _exact_principal(principal)
        if found is None:
            return None
        names |= found
    return frozenset(names)


def _exact_principal(principal: Any) -> set[str] | None:
    if isinstance(principal, rbac.IdAuthenticated):
        m = principal.matcher
        if m is not None and m.kind is StringMatchKind.EXACT and not m.ignore_case:
            return {m.value}
        return None
    if isinstance(principal, rbac.IdOr):
        names: set[str] = set()
        for inner in principal.ids:
            found = _exact_principal(inner)
            if found is None:
                return None
            names |= found
        return names
    return None


def _uses_destination_ip(permission: Any) -> bool:
    if isinstance(permission, rbac.PermDestinationIp):
        return True
    if isinstance(permission, rbac.PermAnd | rbac.PermOr):
        return any(_uses_destination_ip(p) for p in permission.rules)
    if isinstance(permission, rbac.PermNot):
        return _uses_destination_ip(permission.rule)
    return False


def _request_dependent(permission: Any) -> bool:
    if isinstance(permission, rbac.PermHeader | rbac.PermUrlPath):
        return True
    if isinstance(permission, rbac.PermAnd | rbac.PermOr):
        return any(_request_dependent(p) for p in permission.rules)
    if isinstance(permission, rbac.PermNot):
        return _request_dependent(permission.rule)
    return False


def _relax_permission(permission: Any, network: bool) -> Any:
    """``permission`` with what the caller's request decides taken as satisfied (HTTP only: a
    network filter never matches header or url_path permissions)."""
    if network:
        return permission
    if isinstance(permission, rbac.PermHeader | rbac.PermUrlPath):
        return rbac.PermAny()
    if isinstance(permission, rbac.PermAnd):
        return rbac.PermAnd(tuple(_relax_permission(p, network) for p in permission.rules))
    if isinstance(permission, rbac.PermOr):
        return rbac.PermOr(tuple(_relax_permission(p, network) for p in permission.rules))
    if isinstance(permission, rbac.PermNot) and _request_dependent(permission.rule):
        return rbac.PermAny()
    return permission


def _caller_dependent(principal: Any, network: bool) -> bool:
    if isinstance(principal, rbac.IdSourceIp | rbac.IdDirectRemoteIp | rbac.IdRemoteIp):
        return True
    if isinstance(principal, rbac.IdHeader):
        return not network
    if isinstance(principal, rbac.IdAnd | rbac.IdOr):
        return any(_caller_dependent(p, network) for p in principal.ids)
    if isinstance(principal, rbac.IdNot):
        return _caller_dependent(principal.id, network)
    return False


def _relax_principal(principal: Any, network: bool) -> Any:
    """``principal`` with what depends on where the caller runs (source addresses) or what it
    sends (headers, HTTP only) taken as matching."""
    if isinstance(principal, rbac.IdSourceIp | rbac.IdDirectRemoteIp | rbac.IdRemoteIp):
        return rbac.IdAny()
    if isinstance(principal, rbac.IdHeader):
        return principal if network else rbac.IdAny()
    if isinstance(principal, rbac.IdAnd):
        return rbac.IdAnd(tuple(_relax_principal(p, network) for p in principal.ids))
    if isinstance(principal, rbac.IdOr):
        return rbac.IdOr(tuple(_relax_principal(p, network) for p in principal.ids))
    if isinstance(principal, rbac.IdNot) and _caller_dependent(principal.id, network):
        return rbac.IdAny()
    return principal


# ---------------------------------------------------------------------------------------------
# The three questions


def can(
    mesh: MeshPolicy,
    source: str,
    to: str,
    *,
    namespace: str = DEFAULT_NAMESPACE,
    port: str | int | None = None,
    method: str = "GET",
    path: str = "/",
    headers: Sequence[tuple[str, str]] = (),
) -> CanAnswer:
    """``ubimesh policy can --from SOURCE --to TO``: ``source`` is a SPIFFE ID or a service
    (every identity of its workloads); ``to`` a service (``NAME`` or ``NAME.NAMESPACE``)."""
    if not path.startswith("/"):
        raise QuestionError(f"--path {path!r}: a request path starts with '/'; e.g. /api/v1")
    return mesh.can(mesh.sources(source, namespace), mesh.service(to, namespace, "--to"),
                    port=port, method=method, path=path, headers=headers)


def blast_radius(mesh: MeshPolicy, identity: str, *, max_hops: int = 0) -> BlastRadius:
    """Everything ``identity`` reaches: directly (hop 1), then through the identities of the
    destinations it reaches, breadth-first (``max_hops`` 0: no limit). Each (destination,
    route) is listed once, at its fewest hops, with the identity that takes that step and the
    policy that allows it."""
    if not identity.startswith(SPIFFE_SCHEME):
        raise QuestionError(
            f"IDENTITY {identity!r}: not a SPIFFE ID; give "
            f"spiffe://{mesh.trust_domain}/ns/<namespace>/sa/<service account>"
        )
    hops_of: dict[str, int] = {identity: 0}
    best: dict[tuple[Destination, Route], Reach] = {}
    frontier = [identity]
    hop = 1
    while frontier and (max_hops <= 0 or hop <= max_hops):
        following: set[str] = set()
        for source in frontier:
            for (destination, route), policy in mesh.reach_map(source).items():
                key = (destination, route)
                if key not in best:
                    best[key] = Reach(hop, source, destination, route, policy)
                if destination.identity not in hops_of:
                    hops_of[destination.identity] = hop
                    following.add(destination.identity)
        frontier = sorted(following)
        hop += 1
    reached = sorted(best.values(), key=lambda r: (r.hops, r.destination, r.route))
    identities = sorted(hops_of.items(), key=lambda item: (item[1], item[0]))
    return BlastRadius(identity, tuple(reached), tuple(identities))


def diff(before: MeshPolicy, after: MeshPolicy) -> PolicyDiff:
    """Every (source identity, destination, route) allowed in one mesh and not in the other.
    A route is allowed when it, or ``*``, is reachable at that destination."""
    flips = []
    for source in sorted(set(before.identities()) | set(after.identities())):
        old = before.reach_map(source)
        new = after.reach_map(source)
        for key in sorted(set(old) | set(new)):
            was = _lookup(old, key)
            now = _lookup(new, key)
            if (was is None) != (now is None):
                destination, route = key
                flips.append(Flip(source, destination, route, was is not None, now is not None,
                                  was or "", now or ""))
    return PolicyDiff(tuple(flips))


def _lookup(reach: Mapping[tuple[Destination, Route], str],
            key: tuple[Destination, Route]) -> str | None:
    found = reach.get(key)
    if found is None:
        found = reach.get((key[0], ANY_ROUTE))
    return found


__all__ = [
    "ANY_ROUTE",
    "BlastRadius",
    "CanAnswer",
    "CanRow",
    "Destination",
    "Flip",
    "MeshPolicy",
    "PolicyDiff",
    "QuestionError",
    "Reach",
    "Route",
    "blast_radius",
    "can",
    "diff",
]
