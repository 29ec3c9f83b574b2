"""Options of the interop suites (recognised when pytest is pointed at tests/interop)."""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("differential", "differential Envoy/ubimesh suite")
    group.addoption(
        "--differential-self",
        action="store_true",
        default=False,
        help="compare Envoy against a second Envoy instead of ubimesh "
        "(same as UBIMESH_DIFF_SUBJECT=envoy); proves the harness is deterministic",
    )
