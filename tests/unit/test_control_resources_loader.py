"""Loading resource files: documents, JSON, Lists, sources, YAML errors, duplicates, round
trips (ubimesh.control.resources.loader)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

from ubimesh.control.resources import (
    KINDS,
    Key,
    Resource,
    ResourceError,
    ResourceErrors,
    load_files,
    parse_documents,
    validate_document,
    validate_set,
)

DATA = Path(__file__).parent / "control_resources"
SERVICE = """\
apiVersion: ubimesh.io/v1alpha1
kind: Service
metadata: {name: ledger, namespace: payments}
spec:
  ports: [{name: http, port: 8080, protocol: http}]
"""


def messages(text: str, source: str = "m.yaml") -> list[str]:
    with pytest.raises(ResourceErrors) as info:
        parse_documents(text, source)
    return [str(e) for e in info.value.errors]


def test_the_example_mesh_loads_with_every_kind_and_validates_as_a_set() -> None:
    path = DATA / "mesh.yaml"
    resources = load_files([path])
    assert {r.kind for r in resources} == set(KINDS)
    assert [r.source for r in resources] == [f"{path}#{i}" for i in range(1, 13)]
    validate_set(resources)
    by = {r.key: r for r in resources}
    assert by[Key("Mesh", "", "default")].spec["trustDomain"] == "example.org"
    workload = by[Key("Workload", "payments", "ledger-1")].spec
    assert workload["serviceAccount"] == "ledger"
    assert workload["sidecar"]["upstreams"][0] == {
        "service": "ledger-v2", "namespace": "payments", "localPort": 15200,
    }
    split = by[Key("TrafficSplit", "payments", "ledger-canary")].spec
    assert split["service"] == "ledger"  # the FQDN is normalized to the name


def test_empty_documents_are_skipped_and_still_counted_in_sources() -> None:
    text = "---\n# nothing\n---\n" + SERVICE + "---\n"
    [resource] = parse_documents(text, "m.yaml")
    assert resource.source == "m.yaml#2"
    assert parse_documents("", "empty.yaml") == []


def test_a_json_object_is_a_document() -> None:
    doc = yaml.safe_load(SERVICE)
    [resource] = parse_documents(json.dumps(doc), "svc.json")
    assert resource.key == Key("Service", "payments", "ledger")
    assert resource.source == "svc.json#1"


def test_a_list_yields_its_items_with_item_sources() -> None:
    item = yaml.safe_load(SERVICE)
    other = json.loads(json.dumps(item))
    other["metadata"]["name"] = "other"
    other["spec"]["ports"][0]["protocol"] = "udp"
    text = json.dumps({"apiVersion": "v1", "kind": "List", "items": [item, other]})
    assert messages(text, "l.json") == [
        "l.json#1.items[1] Service payments/other: spec.ports[0].protocol: 'udp' is not "
        "supported; expected one of: http, tcp"
    ]
    del text
    [resource] = parse_documents(json.dumps({"kind": "List", "items": [item]}), "l.json")
    assert resource.source == "l.json#1.items[0]"


def test_yaml_syntax_errors_name_the_document_and_line() -> None:
    text = SERVICE + "---\nkind: Service\nmetadata: {name: x\n"
    [message] = messages(text)
    assert message.startswith("m.yaml#2: line ")
    assert message.endswith("; expected a YAML or JSON document")


def test_a_key_given_twice_is_refused() -> None:
    [message] = messages(SERVICE.replace("kind: Service\n", "kind: Service\nkind: Service\n"))
    assert message == (
        "m.yaml#1: line 3, column 1: key 'kind' is given twice; expected a YAML or JSON document"
    )


def test_document_level_errors() -> None:
    assert messages("- a\n- b\n") == [
        "m.yaml#1: ['a', 'b'] is not a mapping; expected a resource {apiVersion, kind, "
        "metadata, spec}, or a kind: List with items"
    ]
    assert messages(SERVICE.replace("kind: Service", "kind: Pod")) == [
        "m.yaml#1: kind: 'Pod' is not a known kind; expected one of: Mesh, Service, Workload, "
        "Gateway, ExternalService, TrafficTarget, HTTPRouteGroup, TCPRoute, TrafficSplit, "
        "HTTPRoute"
    ]
    assert messages(SERVICE.replace("ubimesh.io/v1alpha1", "v1") + "status: {}\n") == [
        "m.yaml#1 Service payments/ledger: status: unknown field; expected one of: apiVersion, "
        "kind, metadata, spec",
        "m.yaml#1 Service payments/ledger: apiVersion: 'v1' is not the apiVersion of Service; "
        "expected ubimesh.io/v1alpha1",
    ]
    assert messages("apiVersion: ubimesh.io/v1alpha1\nkind: Service\nspec: {}\n") == [
        "m.yaml#1: metadata: required field is missing; expected a mapping {name, namespace, "
        "labels, annotations, resourceVersion}",
        "m.yaml#1: spec.ports: required field is missing; expected a list of at least 1 port "
        "{name, port, protocol, targetPort}",
    ]


def test_metadata_is_checked() -> None:
    text = SERVICE.replace(
        "{name: ledger, namespace: payments}",
        "{name: Ledger_1, namespace: payments, labels: {app: 3}, uid: x}",
    )
    assert messages(text) == [
        "m.yaml#1 Service payments/Ledger_1: metadata.name: 'Ledger_1' is not a DNS-1123 "
        "label; expected a DNS-1123 label (lower case letters, digits and '-', at most 63)",
        "m.yaml#1 Service payments/Ledger_1: metadata.labels.app: 3 is not a string; expected "
        "a label value",
        "m.yaml#1 Service payments/Ledger_1: metadata.uid: unknown field; expected one of: "
        "name, namespace, labels, annotations, resourceVersion",
    ]
    mesh = "apiVersion: ubimesh.io/v1alpha1\nkind: Mesh\nmetadata: {name: m, namespace: x}\n"
    assert messages(mesh) == [
        "m.yaml#1 Mesh m: metadata.namespace: 'x' is set; expected no namespace (Mesh is "
        "cluster-scoped)"
    ]


def test_metadata_fields_land_in_the_resource() -> None:
    text = SERVICE.replace(
        "{name: ledger, namespace: payments}",
        "{name: ledger, labels: {app.kubernetes.io/name: ledger}, annotations: {note: hi},"
        " resourceVersion: '7'}",
    )
    [r] = parse_documents(text, "m.yaml")
    assert (r.namespace, r.labels, r.annotations, r.resource_version) == (
        "default", {"app.kubernetes.io/name": "ledger"}, {"note": "hi"}, "7",
    )


def test_errors_of_every_document_and_every_file_are_collected(tmp_path: Path) -> None:
    bad = SERVICE.replace("8080", "0")
    a = tmp_path / "a.yaml"
    b = tmp_path / "b.yaml"
    a.write_text(bad + "---\n" + SERVICE)
    b.write_text(SERVICE.replace("http}", "tcp, extra: 1}"))
    with pytest.raises(ResourceErrors) as info:
        load_files([a, b, tmp_path / "missing.yaml"])
    text = str(info.value)
    assert text.splitlines()[0] == "3 resource errors:"
    assert [e.source for e in info.value.errors] == [f"{a}#1", f"{b}#1", f"{tmp_path}/missing.yaml"]
    assert "spec.ports[0].extra: unknown field" in text
    assert "cannot be read (No such file or directory)" in text


def test_duplicates_name_both_sources(tmp_path: Path) -> None:
    a = tmp_path / "a.yaml"
    b = tmp_path / "b.yaml"
    a.write_text(SERVICE)
    b.write_text("---\n---\n" + SERVICE)  # an explicit empty first document
    with pytest.raises(ResourceErrors) as info:
        load_files([a, b])
    assert str(info.value) == (
        f"{b}#2 Service payments/ledger: metadata.name: 'ledger' is defined twice (also at "
        f"{a}#1); expected each resource once in a set"
    )


def test_validate_document_takes_a_parsed_body() -> None:
    r = validate_document(yaml.safe_load(SERVICE), "api")
    assert r.spec["ports"][0]["targetPort"] == 8080
    with pytest.raises(ResourceErrors):
        validate_document({"kind": "Service"})


def test_round_trip_through_to_dict_from_dict_and_yaml() -> None:
    resources = load_files([DATA / "mesh.yaml"])
    for r in resources:
        again = Resource.from_dict(r.to_dict(), r.source)
        assert again == r
        [parsed] = parse_documents(yaml.safe_dump(r.to_dict()), "again.yaml")
        assert parsed.same_content(r), r.key
        assert parsed.to_dict() == r.to_dict()


def test_resource_errors_pickle_and_keep_their_fields() -> None:
    import pickle

    [error] = [*messages(SERVICE.replace("http}", "grpc}"))]
    with pytest.raises(ResourceErrors) as info:
        parse_documents(SERVICE.replace("http}", "grpc}"), "m.yaml")
    e = info.value.errors[0]
    assert (e.source, e.key, e.path, e.value, e.expected, e.problem) == (
        "m.yaml#1", Key("Service", "payments", "ledger"), "spec.ports[0].protocol", "grpc",
        "one of: http, tcp", "is not supported",
    )
    assert str(pickle.loads(pickle.dumps(info.value))) == error
    assert isinstance(e, ResourceError) and isinstance(e, ValueError)


def test_a_thousand_services_and_three_thousand_workloads_load_fast() -> None:
    docs = []
    for i in range(1000):
        docs.append(yaml.safe_load(SERVICE.replace("ledger", f"s{i}")))
        for j in range(3):
            docs.append({
                "apiVersion": "ubimesh.io/v1alpha1", "kind": "Workload",
                "metadata": {"name": f"s{i}-{j}", "namespace": "payments"},
                "spec": {"service": f"s{i}", "address": f"10.{i // 200}.{i % 200}.{j + 1}",
                         "sidecar": {"inboundPorts": {"http": 15006}}},
            })
    text = yaml.dump_all(docs, Dumper=yaml.CSafeDumper)
    start = time.perf_counter()
    resources = parse_documents(text, "big.yaml")
    validate_set(resources)
    elapsed = time.perf_counter() - start
    assert len(resources) == 4000
    # About 0.4 s on an idle core; the bound leaves room for a busy shared machine.
    assert elapsed < 2.5, elapsed


def test_every_example_in_the_reference_doc_is_valid() -> None:
    import re

    doc = Path(__file__).parents[2] / "docs" / "resources.md"
    blocks = re.findall(r"```yaml\n(.*?)```", doc.read_text(), re.S)
    assert len(blocks) == 11  # one example per kind, and an egress TrafficTarget
    kinds = {r.kind for i, block in enumerate(blocks) for r in parse_documents(block, f"#{i}")}
    assert kinds == set(KINDS)
