"""Property tests for resource loading: valid Services round-trip through to_dict -> YAML ->
parse_documents unchanged, and an unknown field anywhere is refused with its path."""

from __future__ import annotations

import copy
from typing import Any

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from ubimesh.control.resources import ResourceErrors, parse_documents, validate_document

label = st.from_regex(r"[a-z]([-a-z0-9]{0,10}[a-z0-9])?", fullmatch=True)
port = st.integers(1, 65535)
duration = st.sampled_from(["1s", "250ms", "1m30s", "1.5s", "2h", "0"])


@st.composite
def services(draw: st.DrawFn) -> dict[str, Any]:
    names = draw(st.lists(label, min_size=1, max_size=5, unique=True))
    numbers = draw(st.lists(port, min_size=len(names), max_size=len(names), unique=True))
    ports = []
    for name, number in zip(names, numbers, strict=True):
        p: dict[str, Any] = {"name": name, "port": number,
                             "protocol": draw(st.sampled_from(["http", "tcp"]))}
        if draw(st.booleans()):
            p["targetPort"] = draw(port)
        ports.append(p)
    spec: dict[str, Any] = {"ports": ports}
    for field, values in (("lbPolicy", st.sampled_from(["ROUND_ROBIN", "RANDOM",
                                                        "LEAST_REQUEST"])),
                          ("connectTimeout", duration), ("requestTimeout", duration)):
        if draw(st.booleans()):
            spec[field] = draw(values)
    metadata: dict[str, Any] = {"name": draw(label), "namespace": draw(label)}
    if draw(st.booleans()):
        metadata["labels"] = draw(st.dictionaries(label, label, max_size=3))
    return {"apiVersion": "ubimesh.io/v1alpha1", "kind": "Service", "metadata": metadata,
            "spec": spec}


@settings(max_examples=80, deadline=None)
@given(doc=services())
def test_a_valid_service_round_trips_unchanged(doc: dict[str, Any]) -> None:
    first = validate_document(doc, "gen")
    # Defaults are filled: every port has a targetPort, the given one or the port.
    for given_port, port_out in zip(doc["spec"]["ports"], first.spec["ports"], strict=True):
        assert port_out["targetPort"] == given_port.get("targetPort", given_port["port"])
    text = yaml.safe_dump(first.to_dict())
    [again] = parse_documents(text, "again.yaml")
    assert again == first
    assert again.to_dict() == first.to_dict()


def _object_paths(value: Any, path: str) -> list[tuple[str, dict[str, Any]]]:
    """Every mapping in ``value`` that a schema declares fields for, with its path."""
    out: list[tuple[str, dict[str, Any]]] = []
    if isinstance(value, dict):
        out.append((path, value))
        for k, v in value.items():
            if k not in ("labels", "annotations"):  # free-form maps accept any key
                out.extend(_object_paths(v, f"{path}.{k}" if path else k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out.extend(_object_paths(v, f"{path}[{i}]"))
    return out


@settings(max_examples=80, deadline=None)
@given(doc=services(), data=st.data(),
       junk=st.from_regex(r"x[A-Za-z]{1,8}", fullmatch=True),
       value=st.one_of(st.integers(), st.text(max_size=5), st.none(), st.booleans()))
def test_an_unknown_field_anywhere_is_refused_with_its_path(
    doc: dict[str, Any], data: st.DataObject, junk: str, value: Any
) -> None:
    doc = copy.deepcopy(doc)
    targets = _object_paths(doc, "")
    path, target = data.draw(st.sampled_from(targets))
    target[junk] = value
    text = yaml.safe_dump(doc)
    try:
        parse_documents(text, "junk.yaml")
    except ResourceErrors as exc:
        expected = f"{path}.{junk}" if path else junk
        assert [(e.path, e.problem) for e in exc.errors] == [(expected, "unknown field")]
    else:
        raise AssertionError(f"{path}.{junk} was accepted")
