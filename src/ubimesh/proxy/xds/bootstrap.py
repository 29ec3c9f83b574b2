"""Loading an Envoy v3 bootstrap file (what ``envoy -c`` and ``ubimesh proxy -c`` take)."""

from __future__ import annotations

from typing import Any

from ubimesh.proxy.snapshot.types import Snapshot
from ubimesh.proxy.xds import extensions
from ubimesh.proxy.xds.errors import ConfigError, ConfigErrors
from ubimesh.proxy.xds.parse import parse_message, parse_text
from ubimesh.proxy.xds.translate import translate_bootstrap


def load_bootstrap(
    path: str,
    *,
    service_node: str | None = None,
    service_cluster: str | None = None,
) -> Snapshot:
    """Read the bootstrap at ``path`` (YAML or JSON) and translate it into a Snapshot.

    ``service_node`` and ``service_cluster`` override ``node.id`` and ``node.cluster``, like
    Envoy's --service-node and --service-cluster. Raises ``ConfigErrors`` listing every problem
    (unreadable file, malformed text, unknown or unsupported fields, invalid values).
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        error = ConfigError("", f"cannot read {path}: {reason}")
        raise ConfigErrors([error], source=path) from None
    return load_bootstrap_text(
        text, source_name=path, service_node=service_node, service_cluster=service_cluster
    )


def load_bootstrap_text(
    text: str,
    *,
    source_name: str = "",
    service_node: str | None = None,
    service_cluster: str | None = None,
) -> Snapshot:
    """``load_bootstrap`` for config text already in memory."""
    try:
        source = parse_text(text)
    except ConfigError as exc:
        raise ConfigErrors([exc], source=source_name) from None
    return load_bootstrap_dict(
        source,
        source_name=source_name,
        service_node=service_node,
        service_cluster=service_cluster,
    )


def load_bootstrap_dict(
    source: dict[str, Any],
    *,
    source_name: str = "",
    service_node: str | None = None,
    service_cluster: str | None = None,
) -> Snapshot:
    """``load_bootstrap`` for a config already parsed into a plain dict."""
    bootstrap, errors, quiet = parse_message(source, extensions.Bootstrap)
    return translate_bootstrap(
        bootstrap,
        source,
        service_node=service_node,
        service_cluster=service_cluster,
        errors=errors,
        quiet=quiet,
        source_name=source_name,
    )
