"""docs/envoy-compat.md tells the truth: its tables list exactly the fields the translator
supports, for every message the translator walks, and only fields that exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from google.protobuf import symbol_database

from ubimesh.proxy.xds import ConfigErrors, extensions, load_bootstrap_dict
from ubimesh.proxy.xds.context import Ctx
from ubimesh.proxy.xds.parse import parse_message, parse_text
from ubimesh.proxy.xds.translate import translate_bootstrap

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "envoy-compat.md"
FULL = Path(__file__).parent / "configs" / "full.yaml"

_SECTION = re.compile(r"^### (?:[^`]*)`([\w.]+)`\s*$")
_ROW = re.compile(r"^\| (.+?) \| (yes|no) \|")


def doc_tables() -> dict[str, dict[str, set[str]]]:
    """Message full name -> {"yes": fields, "no": fields}, from the doc's tables."""
    tables: dict[str, dict[str, set[str]]] = {}
    current = None
    for line in DOC.read_text().splitlines():
        section = _SECTION.match(line)
        if section:
            current = tables.setdefault(section.group(1), {"yes": set(), "no": set()})
            continue
        if line.startswith("## "):
            current = None
        row = _ROW.match(line)
        if row and current is not None:
            current[row.group(2)].update(re.findall(r"`(\w+)`", row.group(1)))
    return tables


def translator_whitelists() -> dict[str, set[str]]:
    """The supported fields per message, as the translator met them translating full.yaml."""
    source = parse_text(FULL.read_text())
    bootstrap, errors, _quiet = parse_message(source, extensions.Bootstrap)
    assert errors == []
    ctx = Ctx()
    translate_bootstrap(bootstrap, source, ctx=ctx)
    return ctx.whitelists


@pytest.fixture(scope="module")
def tables() -> dict[str, dict[str, set[str]]]:
    return doc_tables()


@pytest.fixture(scope="module")
def whitelists() -> dict[str, set[str]]:
    return translator_whitelists()


def test_the_doc_has_tables(tables: dict[str, dict[str, set[str]]]) -> None:
    assert len(tables) > 40
    assert "hedge_policy" in tables["envoy.config.route.v3.RouteAction"]["no"]


def test_every_walked_message_is_documented_with_its_supported_fields(
    tables: dict[str, dict[str, set[str]]], whitelists: dict[str, set[str]]
) -> None:
    missing = sorted(set(whitelists) - set(tables))
    assert missing == [], f"messages without a table in {DOC.name}: {missing}"
    wrong = {
        name: {"doc": sorted(tables[name]["yes"]), "code": sorted(fields)}
        for name, fields in whitelists.items()
        if tables[name]["yes"] != fields
    }
    assert wrong == {}


def test_every_documented_message_is_walked_by_the_full_sample(
    tables: dict[str, dict[str, set[str]]], whitelists: dict[str, set[str]]
) -> None:
    assert sorted(set(tables) - set(whitelists)) == []


def test_documented_fields_exist_and_refused_ones_are_not_supported(
    tables: dict[str, dict[str, set[str]]], whitelists: dict[str, set[str]]
) -> None:
    pool = symbol_database.Default().pool
    for name, rows in tables.items():
        descriptor = pool.FindMessageTypeByName(name)
        known = set(descriptor.fields_by_name)
        assert rows["yes"] | rows["no"] <= known, (name, sorted((rows["yes"] | rows["no"]) - known))
        assert not rows["no"] & whitelists.get(name, set()), name


def test_a_refused_field_in_the_doc_is_refused_by_the_translator() -> None:
    # Spot check one "no" row end to end.
    source = parse_text(FULL.read_text())
    source["static_resources"]["clusters"][0]["upstream_connection_options"] = {}
    with pytest.raises(ConfigErrors) as info:
        load_bootstrap_dict(source)
    assert [e.path for e in info.value.errors] == [
        "static_resources.clusters[0].upstream_connection_options"
    ]
