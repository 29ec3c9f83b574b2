"""Join tokens: single use, expiry, bound identity, only hashes on disk."""

from __future__ import annotations

import datetime as dt
import re
import sqlite3
import time
from pathlib import Path

import pytest

from ubimesh.identity import JoinTokens, SpiffeId, TokenError

WEB = SpiffeId.parse("spiffe://example.org/ns/default/sa/web")


def test_a_token_redeems_once_to_its_identity(tmp_path: Path) -> None:
    tokens = JoinTokens(tmp_path / "tokens.db")
    token = tokens.create(WEB)
    assert len(token) >= 43  # 32 bytes, URL-safe base64
    assert tokens.redeem(token) == WEB
    with pytest.raises(TokenError) as info:
        tokens.redeem(token)
    assert info.value.reason == "used"


def test_unknown_and_expired_tokens_are_refused(tmp_path: Path) -> None:
    tokens = JoinTokens(tmp_path / "tokens.db")
    with pytest.raises(TokenError) as info:
        tokens.redeem("not-a-token")
    assert info.value.reason == "unknown"
    token = tokens.create(WEB, dt.timedelta(seconds=1))
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (tokens.expires(token) or 0) >= time.time():
        time.sleep(0.1)
    with pytest.raises(TokenError) as info:
        tokens.redeem(token)
    assert info.value.reason == "expired"


def test_only_a_hash_is_stored_and_tokens_survive_reopening(tmp_path: Path) -> None:
    path = tmp_path / "tokens.db"
    token = JoinTokens(path).create(WEB)
    assert token.encode() not in path.read_bytes()
    rows = sqlite3.connect(path).execute("SELECT hash FROM tokens").fetchall()
    assert len(rows) == 1 and rows[0][0] != token
    assert path.stat().st_mode & 0o077 == 0
    assert JoinTokens(path).redeem(token) == WEB


def test_bad_requests_are_refused(tmp_path: Path) -> None:
    tokens = JoinTokens(tmp_path / "tokens.db")
    with pytest.raises(ValueError, match="has no path"):
        tokens.create(SpiffeId.parse("spiffe://example.org"))
    with pytest.raises(ValueError, match="ttl"):
        tokens.create(WEB, dt.timedelta(days=365))
    a, b = tokens.create(WEB), tokens.create(WEB)
    assert a != b


def test_join_and_admin_tokens_are_safe_as_command_line_arguments(tmp_path: Path) -> None:
    """Hex only: a token that starts with "-" is read as an option by ``--token TOKEN`` (a
    urlsafe-base64 admin token made the CLI test fail once in CI)."""
    from ubimesh.control.server import load_or_create_token

    join = JoinTokens(tmp_path / "tokens.db").create(WEB)
    admin, created = load_or_create_token(tmp_path, None)
    assert created
    for token in (join, admin):
        assert re.fullmatch(r"[0-9a-f]{64}", token), token
