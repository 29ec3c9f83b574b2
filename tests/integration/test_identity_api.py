"""The identity API of a real ``ubimesh control``: join tokens, signing, renewal, bundle,
status; and the ``ubimesh ca|token|certs`` commands against it."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from tests.support.control import ControlReplica, start_control

from ubimesh.identity import SpiffeId, new_key_and_csr, sign_proof, verify_svid

TD = "example.org"
WEB = SpiffeId.parse(f"spiffe://{TD}/ns/default/sa/web")
DB = SpiffeId.parse(f"spiffe://{TD}/ns/default/sa/db")


def _cli(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ubimesh.cli.main", *args], text=True,
                          capture_output=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def control(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlReplica]:
    workdir = tmp_path_factory.mktemp("identity")
    # A CA made beforehand with its own trust domain: the control plane uses it as it is.
    done = _cli("ca", "init", "--data-dir", str(workdir / "control"), "--trust-domain", TD)
    assert done.returncode == 0, done.stderr
    assert "created a CA for trust domain example.org" in done.stdout
    replica = start_control(workdir)
    try:
        yield replica
    finally:
        replica.stop()


def _request(control: ControlReplica, method: str, path: str, body: Any = None, *,
             admin: bool = False) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if admin:
        headers["Authorization"] = f"Bearer {control.token}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(control.api + path, data=data, method=method,
                                     headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            raw = response.read()
            status = response.status
    except urllib.error.HTTPError as exc:
        raw, status = exc.read(), exc.code
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw


def _token(control: ControlReplica, identity: SpiffeId, ttl: str = "10m") -> str:
    status, answer = _request(control, "POST", "/api/v1/identity/tokens",
                              {"identity": str(identity), "ttl": ttl}, admin=True)
    assert status == 200, answer
    assert answer["identity"] == str(identity)
    return str(answer["token"])


def _bundles(control: ControlReplica) -> dict[str, list[x509.Certificate]]:
    status, pem = _request(control, "GET", "/api/v1/identity/bundle")
    assert status == 200 and isinstance(pem, bytes)
    return {TD: x509.load_pem_x509_certificates(pem)}


def test_token_create_needs_the_admin_token(control: ControlReplica) -> None:
    status, answer = _request(control, "POST", "/api/v1/identity/tokens",
                              {"identity": str(WEB)})
    assert status == 401, answer
    status, answer = _request(control, "POST", "/api/v1/identity/tokens",
                              {"identity": "spiffe://other.org/ns/a/sa/b"}, admin=True)
    assert status == 400 and "trust domain 'example.org'" in answer["error"]
    status, answer = _request(control, "POST", "/api/v1/identity/tokens",
                              {"identity": "spiffe://example.org/ns//sa"}, admin=True)
    assert status == 400 and "empty segments" in answer["error"]


def test_a_token_signs_once_then_renewal_uses_the_certificate(control: ControlReplica) -> None:
    token = _token(control, WEB)
    key, csr = new_key_and_csr(WEB)
    status, answer = _request(control, "POST", "/api/v1/identity/sign",
                              {"csr": csr.decode(), "token": token, "node": "web-1.default"})
    assert status == 200, answer
    bundles = _bundles(control)
    assert answer["bundle"].encode() == b"".join(
        c.public_bytes(Encoding.PEM) for c in bundles[TD])
    chain = answer["chain"].encode()
    assert verify_svid(chain, bundles) == WEB

    # The token is spent.
    _k2, csr2 = new_key_and_csr(WEB)
    status, again = _request(control, "POST", "/api/v1/identity/sign",
                             {"csr": csr2.decode(), "token": token})
    assert status == 403 and "already used" in again["error"]

    # Renewal: the current chain and a proof made with the current key.
    new_key, new_csr = new_key_and_csr(WEB)
    status, renewed = _request(control, "POST", "/api/v1/identity/sign", {
        "csr": new_csr.decode(), "chain": chain.decode(), "proof": sign_proof(key, new_csr)})
    assert status == 200, renewed
    assert verify_svid(renewed["chain"].encode(), bundles) == WEB
    leaf = x509.load_pem_x509_certificates(renewed["chain"].encode())[0]
    new_public = x509.load_pem_x509_csr(new_csr).public_key()
    assert leaf.public_key() == new_public

    # A proof made with a key other than the certificate's is refused.
    status, refused = _request(control, "POST", "/api/v1/identity/sign", {
        "csr": new_csr.decode(), "chain": chain.decode(), "proof": sign_proof(new_key, new_csr)})
    assert status == 403 and "does not verify" in refused["error"]


def test_a_csr_asking_for_another_identity_is_refused(control: ControlReplica) -> None:
    token = _token(control, WEB)
    _key, csr_db = new_key_and_csr(DB)
    status, answer = _request(control, "POST", "/api/v1/identity/sign",
                              {"csr": csr_db.decode(), "token": token})
    assert status == 403 and "may only get spiffe://example.org/ns/default/sa/web" in (
        answer["error"])
    # The refused request did not burn the token.
    key, csr = new_key_and_csr(WEB)
    status, answer = _request(control, "POST", "/api/v1/identity/sign",
                              {"csr": csr.decode(), "token": token})
    assert status == 200, answer
    # Renewing web's certificate cannot get db's identity either.
    chain = answer["chain"]
    _k, csr_db2 = new_key_and_csr(DB)
    status, refused = _request(control, "POST", "/api/v1/identity/sign", {
        "csr": csr_db2.decode(), "chain": chain, "proof": sign_proof(key, csr_db2)})
    assert status == 403 and "asks for spiffe://example.org/ns/default/sa/db" in (
        refused["error"])


def test_bad_sign_requests_get_a_json_reason(control: ControlReplica) -> None:
    _key, csr = new_key_and_csr(WEB)
    cases = [
        ({"csr": csr.decode()}, 401, "authenticate with token"),
        ({"csr": csr.decode(), "token": "nope"}, 403, "unknown"),
        ({"csr": "garbage", "token": _token(control, WEB)}, 400, "not a PEM certificate"),
        ({"token": "x"}, 400, "csr: expected a non-empty string"),
        ({"csr": csr.decode(), "chain": "garbage", "proof": "AA=="}, 403, "renewal refused"),
        ({"csr": "x" * 70_000, "token": "x"}, 413, "at most 65536"),
    ]
    for body, code, reason in cases:
        status, answer = _request(control, "POST", "/api/v1/identity/sign", body)
        assert status == code, (body.keys(), answer)
        assert reason in answer["error"], answer


def test_bundle_is_public_and_status_is_admin_only(control: ControlReplica) -> None:
    assert _bundles(control)[TD]
    status, answer = _request(control, "GET", "/api/v1/identity/status")
    assert status == 401, answer
    token = _token(control, DB)
    _key, csr = new_key_and_csr(DB)
    status, _ = _request(control, "POST", "/api/v1/identity/sign",
                         {"csr": csr.decode(), "token": token, "node": "db-1.default"})
    assert status == 200
    status, answer = _request(control, "GET", "/api/v1/identity/status", admin=True)
    assert status == 200, answer
    assert answer["trust_domain"] == TD and len(answer["roots"]) == 1
    assert len(answer["intermediates"]) == 1
    nodes = {(leaf["identity"], leaf["node"]) for leaf in answer["leaves"]}
    assert (str(DB), "db-1.default") in nodes


def test_cli_token_create_and_certs_status(control: ControlReplica) -> None:
    flags = ["--server", control.api, "--token", control.token]
    done = _cli("token", "create", "--identity", str(WEB), "--ttl", "5m", *flags)
    assert done.returncode == 0, done.stderr
    token = done.stdout.strip()
    assert len(token) >= 43 and "single use" in done.stderr
    _key, csr = new_key_and_csr(WEB)
    status, answer = _request(control, "POST", "/api/v1/identity/sign",
                              {"csr": csr.decode(), "token": token, "node": "cli-node"})
    assert status == 200, answer
    done = _cli("certs", "status", *flags)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split()[:2] == ["KIND", "SUBJECT"]
    assert any(line.startswith("root") and "spiffe://example.org" in line for line in lines)
    assert any(line.startswith("leaf") and str(WEB) in line and "cli-node" in line
               for line in lines)
    done = _cli("token", "create", "--identity", "spiffe://example.org/", *flags)
    assert done.returncode == 1 and "trailing slash" in done.stderr
    done = _cli("token", "create", "--identity", str(WEB), "--server", control.api,
                "--token", "wrong")
    assert done.returncode == 1 and "admin token" in done.stderr


def test_cli_ca_status_and_a_second_init_refused(control: ControlReplica) -> None:
    data_dir = str(control.data_dir)
    done = _cli("ca", "status", "--data-dir", data_dir)
    assert done.returncode == 0, done.stderr
    assert "intermediate" in done.stdout and "spiffe://example.org" in done.stdout
    done = _cli("ca", "init", "--data-dir", data_dir)
    assert done.returncode == 1 and "already exists" in done.stderr


def test_control_creates_a_cluster_local_ca_at_first_start(tmp_path: Path) -> None:
    replica = start_control(tmp_path)
    try:
        assert (replica.data_dir / "ca" / "root.key").stat().st_mode & 0o077 == 0
        status, answer = _request(replica, "GET", "/api/v1/identity/status", admin=True)
        assert status == 200 and answer["trust_domain"] == "cluster.local"
    finally:
        replica.stop()
