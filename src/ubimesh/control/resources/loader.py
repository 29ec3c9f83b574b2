"""Reading resources: YAML or JSON text -> validated ``Resource`` objects.

A text holds several YAML documents ("---"); empty documents are skipped; a document may
also be a JSON object or a ``kind: List`` whose ``items`` are resources. Each resource's
``source`` is "FILE#N" (N: 1-based document index, empty documents counted) or
"FILE#N.items[I]" for an item of a List. Every problem of every document is collected and
raised as one ``ResourceErrors``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from os import PathLike
from pathlib import Path
from typing import Any, Final

import yaml

from ubimesh.control.resources import yamlio
from ubimesh.control.resources.errors import MISSING, ResourceError, ResourceErrors
from ubimesh.control.resources.kinds import KINDS
from ubimesh.control.resources.model import DEFAULT_NAMESPACE, Key, Resource
from ubimesh.control.resources.scalars import label_key_problem, label_value_problem
from ubimesh.control.resources.schema import NAME, AnyStr, Ctx, MapOf, Obj, Str, opt, req
from ubimesh.control.resources.spec_httproute import HTTP_ROUTE
from ubimesh.control.resources.spec_smi import (
    HTTP_ROUTE_GROUP,
    TCP_ROUTE,
    TRAFFIC_SPLIT,
    TRAFFIC_TARGET,
)
from ubimesh.control.resources.spec_ubimesh import (
    EXTERNAL_SERVICE,
    GATEWAY,
    MESH,
    SERVICE,
    WORKLOAD,
)

#: The spec schema of every kind.
SPECS: Final[Mapping[str, Obj]] = {
    "Mesh": MESH,
    "Service": SERVICE,
    "Workload": WORKLOAD,
    "Gateway": GATEWAY,
    "ExternalService": EXTERNAL_SERVICE,
    "TrafficTarget": TRAFFIC_TARGET,
    "HTTPRouteGroup": HTTP_ROUTE_GROUP,
    "TCPRoute": TCP_ROUTE,
    "TrafficSplit": TRAFFIC_SPLIT,
    "HTTPRoute": HTTP_ROUTE,
}
assert set(SPECS) == set(KINDS), "every kind needs a spec schema"

LABEL_KEY: Final = Str("a label key ([prefix/]name)", label_key_problem)
METADATA: Final = Obj(
    {
        "name": req(NAME),
        "namespace": opt(NAME),
        "labels": opt(
            MapOf(LABEL_KEY, Str("a label value", label_value_problem)),
        ),
        "annotations": opt(MapOf(LABEL_KEY, AnyStr())),
        "resourceVersion": opt(AnyStr()),
    },
    expected="a mapping {name, namespace, labels, annotations, resourceVersion}",
)
_TOP_FIELDS: Final = ("apiVersion", "kind", "metadata", "spec")
_DOCUMENT: Final = "a resource {apiVersion, kind, metadata, spec}, or a kind: List with items"
_KIND_NAMES: Final = "one of: " + ", ".join(KINDS)


def parse_documents(text: str, source: str) -> list[Resource]:
    """Every resource in ``text`` (YAML documents, JSON, or ``kind: List``), validated and
    with defaults filled. Raises ``ResourceErrors`` listing every problem, duplicates (one key
    twice) included. Cross-references are checked by ``validate_set``."""
    errors: list[ResourceError] = []
    resources, _ = _parse(text, source, errors)
    errors.extend(duplicate_errors(resources))
    if errors:
        raise ResourceErrors(errors)
    return resources


def parse_part(
    text: str, source: str, start: int
) -> tuple[list[Resource], list[ResourceError], int]:
    """``parse_documents``' work on a part of file ``source`` whose first document is the
    file's document ``start`` (1-based), for a caller that cuts a large file at document
    starts (``---`` lines) and reads the parts in parallel: the resources (sources numbered
    as in the whole file), the problems (duplicates not checked) and how many documents the
    part holds, empty ones included."""
    errors: list[ResourceError] = []
    resources, count = _parse(text, source, errors, start)
    return resources, errors, count


def load_files(paths: Iterable[str | PathLike[str]]) -> list[Resource]:
    """Every resource of every file, in order; sources name each file as it was given. Raises
    ``ResourceErrors`` listing every problem of every file (unreadable files, duplicates
    across files included)."""
    errors: list[ResourceError] = []
    resources: list[Resource] = []
    for path in paths:
        name = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else str(exc)
            errors.append(ResourceError(name, None, "", MISSING, "a readable UTF-8 file",
                                        f"cannot be read ({reason})"))
            continue
        resources.extend(_parse(text, name, errors)[0])
    errors.extend(duplicate_errors(resources))
    if errors:
        raise ResourceErrors(errors)
    return resources


def validate_document(data: Any, source: str = "") -> Resource:
    """One resource from its kubectl-shaped mapping (a parsed JSON body, say), validated and
    with defaults filled. Raises ``ResourceErrors``."""
    errors: list[ResourceError] = []
    resource = _document(data, source, errors)
    if errors or resource is None:
        raise ResourceErrors(errors)
    return resource


def duplicate_errors(resources: Iterable[Resource]) -> list[ResourceError]:
    """An error for each resource whose key an earlier one of ``resources`` already has."""
    first: dict[Key, Resource] = {}
    errors = []
    for resource in resources:
        earlier = first.get(resource.key)
        if earlier is None:
            first[resource.key] = resource
        else:
            errors.append(
                ResourceError(resource.source, resource.key, "metadata.name", resource.name,
                              "each resource once in a set",
                              f"is defined twice (also at {earlier.source or '<input>'})")
            )
    return errors


def _parse(
    text: str, source: str, errors: list[ResourceError], start: int = 1
) -> tuple[list[Resource], int]:
    """The resources of ``text`` (its first document is number ``start``) and its number of
    documents; problems go to ``errors``."""
    resources: list[Resource] = []
    index = start - 1
    try:
        for index, doc in enumerate(yamlio.load_all(text), start=start):
            if doc is None:
                continue
            where = f"{source}#{index}"
            if isinstance(doc, dict) and doc.get("kind") == "List":
                resources.extend(_list_items(doc, where, errors))
            else:
                resource = _document(doc, where, errors)
                if resource is not None:
                    resources.append(resource)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        errors.append(ResourceError(f"{source}#{index + 1}", None, "", MISSING,
                                    "a YAML or JSON document", f"{at}{problem}"))
    return resources, index - start + 1


def _list_items(doc: dict[str, Any], where: str, errors: list[ResourceError]) -> list[Resource]:
    out: list[Resource] = []
    for field in doc:
        if field not in ("apiVersion", "kind", "items", "metadata"):
            errors.append(ResourceError(where, None, str(field), MISSING,
                                        "one of: apiVersion, kind, items", "unknown field"))
    items = doc.get("items")
    if items is None:
        items = []
    if not isinstance(items, list):
        errors.append(ResourceError(where, None, "items", items, "a list of resources",
                                    "is not a list"))
        return out
    for i, item in enumerate(items):
        resource = _document(item, f"{where}.items[{i}]", errors)
        if resource is not None:
            out.append(resource)
    return out


def _document(doc: Any, source: str, errors: list[ResourceError]) -> Resource | None:
    if not isinstance(doc, dict):
        errors.append(ResourceError(source, None, "", doc, _DOCUMENT, "is not a mapping"))
        return None
    kind = doc.get("kind")
    info = KINDS.get(kind) if isinstance(kind, str) else None
    metadata = doc.get("metadata")
    raw_name = metadata.get("name") if isinstance(metadata, dict) else None
    raw_ns = metadata.get("namespace") if isinstance(metadata, dict) else None
    namespace = raw_ns if isinstance(raw_ns, str) and raw_ns else DEFAULT_NAMESPACE
    if info is not None and not info.namespaced:
        namespace = ""
    key = (
        Key(info.kind, namespace, raw_name)
        if info is not None and isinstance(raw_name, str) and raw_name
        else None
    )
    before = len(errors)

    def fail(path: str, value: Any, expected: str, problem: str = "") -> None:
        errors.append(ResourceError(source, key, path, value, expected, problem))

    for field in doc:
        if field not in _TOP_FIELDS:
            fail(str(field), MISSING, "one of: " + ", ".join(_TOP_FIELDS), "unknown field")
    if info is None:
        fail("kind", MISSING if kind is None else kind, _KIND_NAMES,
             "" if kind is None else "is not a known kind")
        return None
    api_version = doc.get("apiVersion")
    if api_version != info.api_version:
        fail("apiVersion", MISSING if api_version is None else api_version, info.api_version,
             "" if api_version is None else f"is not the apiVersion of {info.kind}")
    ctx = Ctx(namespace)
    meta: Any = None
    if metadata is None:
        ctx.fail("metadata", MISSING, METADATA.expected)
    else:
        meta = METADATA.check(metadata, "metadata", ctx)
    if not info.namespaced and raw_ns:
        ctx.fail("metadata.namespace", raw_ns, f"no namespace ({info.kind} is cluster-scoped)",
                 "is set")
    spec_in = doc.get("spec")
    spec = SPECS[info.kind].check({} if spec_in is None else spec_in, "spec", ctx)
    for issue in ctx.issues:
        fail(issue.path, issue.value, issue.expected, issue.problem)
    if len(errors) > before or key is None or not isinstance(meta, dict):
        return None
    return Resource(
        api_version=info.api_version,
        kind=info.kind,
        name=key.name,
        namespace=namespace,
        spec=spec,
        labels=meta.get("labels", {}),
        annotations=meta.get("annotations", {}),
        resource_version=meta.get("resourceVersion", ""),
        source=source,
    )
