"""``ubimesh policy can | blast-radius | diff`` on local files (``-f``, ``--base``): outputs,
exit codes (0 yes, 3 no, 1 errors, 2 usage) and error messages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tests.unit.test_policy_questions import API, BASE, DB, WEB, target

from ubimesh.cli.main import main


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    out = {}
    for name, text in {
        "base": BASE,
        "wider": target("web-to-api", "api", ["web"],
                        "[{kind: HTTPRouteGroup, name: api-routes, matches: [read, write]}]"),
        "narrower": target("web-to-api", "api", ["web"],
                           "[{kind: HTTPRouteGroup, name: api-routes, matches: [admin]}]"),
        "admin": target("web-admin", "api", ["web"],
                        "[{kind: HTTPRouteGroup, name: api-routes, matches: [admin]}]"),
        "same": target("web-to-api", "api", ["web"],
                       "[{kind: HTTPRouteGroup, name: api-routes, matches: [read]}]"),
        "closed": target("web-to-api", "api", ["web"], "[{kind: TCPRoute, name: pg}]"),
    }.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(text)
        out[name] = str(path)
    return out


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["policy", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_can_exits_0_when_allowed_and_3_when_denied(
    files: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "can", "-f", files["base"], "--from", "web", "--to", "api",
                       "--port", "8080", "--path", "/api/orders")
    assert code == 0
    header, *rows = out.splitlines()
    assert header.split() == ["SOURCE", "SERVICE", "WORKLOAD", "PORT", "DECISION", "POLICY",
                              "NOTE"]
    assert [r.split()[2:6] for r in rows] == [
        ["api-1", "http:8080/http", "allow", "default/web-to-api/0"],
        ["api-2", "http:8080/http", "allow", "default/web-to-api/0"],
    ]
    code, out, _ = run(capsys, "can", "-f", files["base"], "--from", WEB, "--to",
                       "api.default", "--port", "http", "--method", "POST", "--path",
                       "/api/items", "-o", "json")
    assert code == 3
    answer = json.loads(out)
    assert answer["allowed"] is False
    assert answer["request"] == {"method": "POST", "path": "/api/items", "headers": []}
    assert [(a["workload"], a["allowed"], a["policy"]) for a in answer["answers"]] == [
        ("api-1", False, "none"), ("api-2", False, "none")]
    assert answer["answers"][0]["identity"] == API


def test_can_takes_headers_and_answers_each_port(
    files: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "can", "-f", files["base"], "-f", files["admin"], "--from",
                       "web", "--to", "api", "--path", "/admin", "-H", "X-Role: admin",
                       "-o", "json")
    answers = json.loads(out)["answers"]
    assert {(a["port"], a["allowed"], a["policy"]) for a in answers} == {
        (8080, True, "default/web-admin/0"), (9000, False, "none")}
    assert code == 3  # the tcp port is denied


def test_blast_radius_table_and_json(
    files: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "blast-radius", "-f", files["base"], WEB)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["HOPS", "SERVICE", "PORT", "ROUTE", "POLICY", "VIA", "AS"]
    assert lines[1].split()[:4] == ["1", "api.default", "http:8080/http", "api-routes/read"]
    assert lines[2].split()[:5] == ["2", "db.default", "pg:5432/tcp", "*",
                                    "default/api-to-db/0"]
    assert lines[-1] == (f"{WEB} reaches 2 (service, port, route) in 2 services (1 directly),"
                         " through 2 other identities")
    code, out, _ = run(capsys, "blast-radius", "-f", files["base"], "web", "-o", "json")
    data = json.loads(out)
    assert code == 0 and data["identity"] == WEB
    assert data["reached"][0]["route"] == {"name": "api-routes/read", "methods": ["GET"],
                                           "pathRegex": "/api/.*", "headers": {}}
    assert data["reached"][1]["via"] == API and data["reached"][1]["policy"] == \
        "default/api-to-db/0"
    assert data["identities"] == [{"identity": WEB, "hops": 0}, {"identity": API, "hops": 1},
                                  {"identity": DB, "hops": 2}]


def test_diff_fail_on_new_allow_exits_3_only_for_a_new_allow(
    files: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["diff", "--base", files["base"]]
    code, out, _ = run(capsys, *base, "-f", files["wider"], "--fail-on", "new-allow")
    assert code == 3
    assert out.splitlines()[1].split()[:5] == ["new-allow", WEB, "api.default",
                                               "http:8080/http", "api-routes/write"]
    assert out.splitlines()[-1] == "1 decisions flip: 1 new-allow, 0 new-deny"
    # Without --fail-on, the same diff exits 0.
    assert run(capsys, *base, "-f", files["wider"])[0] == 0
    # Nothing flips: 0 even with --fail-on any.
    code, out, _ = run(capsys, *base, "-f", files["same"], "--fail-on", "any")
    assert (code, out) == (0, "0 decisions flip: 0 new-allow, 0 new-deny\n")
    # The port gate closes (pg is port 5432, not one of api's): only a new deny, so
    # new-allow passes...
    code, out, _ = run(capsys, *base, "-f", files["closed"], "--fail-on", "new-allow",
                       "-o", "json")
    data = json.loads(out)
    assert code == 0 and (data["newAllow"], data["newDeny"]) == (0, 1)
    assert data["flips"][0]["before"] == {"allowed": True, "policy": "default/web-to-api/0"}
    assert data["flips"][0]["after"] == {"allowed": False, "policy": "none"}
    # ...and any does not.
    assert run(capsys, *base, "-f", files["closed"], "--fail-on", "any")[0] == 3
    # Both kinds at once.
    code, out, _ = run(capsys, *base, "-f", files["narrower"], "--fail-on", "new-allow",
                       "-o", "json")
    data = json.loads(out)
    assert code == 3 and (data["newAllow"], data["newDeny"]) == (1, 1)


def test_usage_errors_name_the_flag_the_value_and_the_fix(
    files: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "can", "-f", files["base"], "--from", "web", "--to", "nope")
    assert code == 2
    assert "--to 'nope': no service 'nope' in namespace 'default'" in err
    assert "api.default" in err  # what exists
    code, _, err = run(capsys, "can", "-f", files["base"], "--from", "web", "--to", "api",
                       "-H", "x-role admin")
    assert code == 2 and "-H 'x-role admin': a header is 'NAME: VALUE'" in err
    code, _, err = run(capsys, "can", "-f", files["base"], "--from", "web", "--to", "api",
                       "--port", "7")
    assert code == 2 and "--port 7" in err and "http:8080" in err
    code, _, err = run(capsys, "blast-radius", "-f", files["base"], "ghost")
    assert code == 2 and "IDENTITY 'ghost'" in err


def test_invalid_files_and_unreachable_servers_exit_1(
    tmp_path: Path, files: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(target("x", "api", ["web"], "[{kind: Nope, name: y}]"))
    code, _, err = run(capsys, "diff", "--base", files["base"], "-f", str(bad))
    assert code == 1 and "validation error" in err and "spec.rules[0].kind" in err
    code, _, err = run(capsys, "can", "--server", "http://127.0.0.1:9", "--token", "t",
                       "--from", "web", "--to", "api")
    assert code == 1 and "cannot reach the control plane at http://127.0.0.1:9" in err
    # blast-radius checks the set while the listeners compile; an invalid set still gets its
    # validation errors, before any usage error about the identity.
    stray = tmp_path / "stray.yaml"
    stray.write_text(BASE + """
---
apiVersion: ubimesh.io/v1alpha1
kind: Workload
metadata: {name: stray-1}
spec: {service: nosuch, address: 10.0.0.9, sidecar: {inboundPorts: {http: 15001}}}
""")
    for identity in (WEB, "web", "ghost"):
        code, out, err = run(capsys, "blast-radius", "-f", str(stray), identity)
        assert code == 1 and not out, (identity, out)
        assert "1 validation error(s)" in err and "spec.service: 'nosuch'" in err, err
