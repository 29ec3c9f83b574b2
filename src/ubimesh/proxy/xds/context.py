"""The translator's working state: the errors found so far, and the field whitelist check.

Every translating function takes a ``Ctx``, the message and the message's path. It first calls
``ctx.fields(msg, path, SUPPORTED)``, which refuses every set field outside the whitelist (so no
configuration is ever ignored silently) and applies Envoy's proto constraints to the supported
ones, then reads the supported fields. Functions keep going after an error and return a
best-effort value, so that one pass finds every error of a config; the caller builds a snapshot
only when ``ctx.errors`` stays empty.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ubimesh.proxy.xds import rules
from ubimesh.proxy.xds.errors import ConfigError


def join(path: str, name: str) -> str:
    """The path of field ``name`` of the message at ``path``."""
    return f"{path}.{name}" if path else name


def item(path: str, index: int) -> str:
    return f"{path}[{index}]"


def entry(path: str, key: str) -> str:
    """The path of a map entry."""
    return f'{path}["{key}"]'


def is_within(path: str, prefix: str) -> bool:
    """Whether ``path`` is ``prefix`` or a path inside it."""
    return path == prefix or path.startswith((prefix + ".", prefix + "["))


E = TypeVar("E", bound=enum.Enum)
T = TypeVar("T")


@dataclass(slots=True)
class ClusterRef:
    """A cluster named somewhere in the config; checked once all clusters are known."""

    name: str
    path: str
    what: str
    checked: bool = True
    """False for a reference Envoy does not check (a route of an RDS route configuration
    without validate_clusters); still recorded, so that the ADS-only HTTP/2 cluster cannot
    carry traffic."""


@dataclass
class Ctx:
    """Collects errors. ``quiet`` holds paths whose own problems were already reported while
    parsing (and whose content was dropped); errors at or under them are not reported again."""

    errors: list[ConfigError] = field(default_factory=list)
    quiet: frozenset[str] = frozenset()
    cluster_refs: list[ClusterRef] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    """Paths of the fields refused as unsupported."""
    whitelists: dict[str, set[str]] = field(default_factory=dict)
    """Message full name -> the fields supported in it, as met during translation (what
    docs/envoy-compat.md must list; a test compares the two)."""
    ads_cluster: str | None = None
    """The static cluster that ``dynamic_resources.ads_config`` names, once known: the only
    cluster allowed HTTP/2 options (it carries the gRPC stream, never proxied traffic)."""
    dynamic: Any = None
    """The resources an ADS stream delivered (``dynamic.Resources``), or None when translating
    a bootstrap alone: then RDS and EDS references are only checked, not resolved."""
    http2_clusters: dict[str, str] = field(default_factory=dict)
    """Cluster name -> path of its accepted ``http2_protocol_options``."""
    route_cache: dict[str, Any] = field(default_factory=dict)
    """RDS name -> its translated RouteConfiguration (each is translated, and reported, once)."""
    static_secrets: dict[str, Any] = field(default_factory=dict)
    """static_resources.secrets by name (translated ``Secret`` contents), for SDS references
    without ``sds_config``."""
    sds_secrets: dict[str, Any] = field(default_factory=dict)
    """Secrets delivered over ADS that a TLS context names, translated once each."""

    def _is_quiet(self, path: str) -> bool:
        return any(is_within(path, prefix) for prefix in self.quiet)

    def is_refused(self, path: str) -> bool:
        """Whether ``path`` is a refused field or lies inside one."""
        return any(is_within(path, prefix) for prefix in self.refused)

    def error(self, path: str, message: str) -> None:
        if self._is_quiet(path):
            return
        error = ConfigError(path, message)
        if not any((e.path, e.message) == (path, message) for e in self.errors[-8:]):
            self.errors.append(error)

    def unsupported(self, path: str, detail: str = "") -> None:
        self.refused.append(path)
        if not self._is_quiet(path):
            self.errors.append(ConfigError.not_supported(path, detail))

    def fields(
        self,
        msg: Any,
        path: str,
        supported: Collection[str],
        hints: Mapping[str, str] | None = None,
        *,
        default_hint: str = "",
    ) -> None:
        """Refuse every set field of ``msg`` that is not in ``supported`` (``hints`` may explain
        why a field is refused, ``default_hint`` is for the others), then check Envoy's
        constraints on the supported ones."""
        self.whitelists.setdefault(msg.DESCRIPTOR.full_name, set()).update(supported)
        for fd, _value in msg.ListFields():
            if fd.name not in supported:
                hint = (hints or {}).get(fd.name, default_hint)
                self.unsupported(join(path, fd.name), hint)
        rules.check_message(msg, path, supported, self.error)

    def enum(self, msg: Any, name: str, path: str, cls: type[E], default: E) -> E:
        """The snapshot enum member for the enum field ``name`` of ``msg`` (same numbers), or
        ``default`` after an error when the number is not one of ``cls``'s."""
        value = getattr(msg, name)
        try:
            return cls(value)
        except ValueError:
            enum_name = msg.DESCRIPTOR.fields_by_name[name].enum_type.name
            self.error(join(path, name), f"{value} is not a value of {enum_name}")
            return default

    def refer_cluster(self, name: str, path: str, what: str, *, checked: bool = True) -> None:
        self.cluster_refs.append(ClusterRef(name, path, what, checked))


def seconds(value: Any) -> float:
    """A google.protobuf.Duration as float seconds."""
    return rules.duration_seconds(value)


def duration(msg: Any, name: str, default: T) -> float | T:
    """A Duration field in seconds, or ``default`` when it is unset (0 stays 0)."""
    return seconds(getattr(msg, name)) if msg.HasField(name) else default


def timeout(msg: Any, name: str, default: float | None) -> float | None:
    """A Duration field with Envoy's usual meaning: unset gives ``default``, 0 disables (None)."""
    if not msg.HasField(name):
        return default
    value = seconds(getattr(msg, name))
    return value if value > 0 else None


def wrapped(msg: Any, name: str, default: Any) -> Any:
    """The value of a google.protobuf wrapper field (UInt32Value, BoolValue, ...) or ``default``."""
    if msg.HasField(name):
        return getattr(msg, name).value
    return default
