"""Route hash policies (Envoy's HashPolicyImpl::generateHash)."""

from __future__ import annotations

from ubimesh.proto.headers import Headers
from ubimesh.proxy.routing.hashing import compute_hash, cookie_value
from ubimesh.proxy.snapshot.types import HashPolicy, HashPolicyKind
from ubimesh.proxy.upstream.hashing import xxh64

HEADER = HashPolicyKind.HEADER
COOKIE = HashPolicyKind.COOKIE
SOURCE_IP = HashPolicyKind.SOURCE_IP
QUERY = HashPolicyKind.QUERY_PARAMETER
MASK = (1 << 64) - 1


def h(s: str) -> int:
    return xxh64(s.encode("latin-1"))


def rotl1(x: int) -> int:
    return ((x << 1) | (x >> 63)) & MASK


def test_single_policies_hash_with_xxhash64() -> None:
    headers = Headers([("x-user", "alice"), ("cookie", "a=1; session=abc")])
    assert compute_hash([HashPolicy(HEADER, "x-user")], headers, None, "/") == h("alice")
    assert compute_hash([HashPolicy(COOKIE, "session")], headers, None, "/") == h("abc")
    assert compute_hash([HashPolicy(SOURCE_IP)], headers, "10.0.0.1", "/") == h("10.0.0.1")
    assert compute_hash([HashPolicy(QUERY, "u")], headers, None, "/p?u=7&u=8") == h("7")


def test_missing_inputs_yield_no_hash() -> None:
    headers = Headers([("cookie", "session=")])
    assert compute_hash([], headers, "10.0.0.1", "/") is None
    assert compute_hash([HashPolicy(HEADER, "x-user")], headers, None, "/") is None
    assert compute_hash([HashPolicy(COOKIE, "session")], headers, None, "/") is None
    assert compute_hash([HashPolicy(COOKIE, "other")], headers, None, "/") is None
    assert compute_hash([HashPolicy(SOURCE_IP)], headers, None, "/") is None
    assert compute_hash([HashPolicy(QUERY, "u")], headers, None, "/p?x=1") is None


def test_empty_header_and_query_values_still_hash() -> None:
    headers = Headers([("x-user", "")])
    assert compute_hash([HashPolicy(HEADER, "x-user")], headers, None, "/") == h("")
    assert compute_hash([HashPolicy(QUERY, "u")], headers, None, "/?u") == h("")


def test_repeated_headers_hash_sorted_and_concatenated() -> None:
    a = Headers([("x-k", "foo"), ("x-k", "bar")])
    b = Headers([("x-k", "bar"), ("x-k", "foo")])
    policy = [HashPolicy(HEADER, "x-k")]
    assert compute_hash(policy, a, None, "/") == compute_hash(policy, b, None, "/") == h("barfoo")


def test_policies_combine_by_rotate_and_xor() -> None:
    headers = Headers([("x-user", "alice")])
    policies = [HashPolicy(HEADER, "x-user"), HashPolicy(SOURCE_IP)]
    expected = rotl1(h("alice")) ^ h("10.0.0.1")
    assert compute_hash(policies, headers, "10.0.0.1", "/") == expected
    # Two identical policies do not cancel out.
    twice = [HashPolicy(HEADER, "x-user"), HashPolicy(HEADER, "x-user")]
    assert compute_hash(twice, headers, None, "/") == rotl1(h("alice")) ^ h("alice") != 0


def test_terminal_stops_once_a_hash_exists() -> None:
    headers = Headers([("x-user", "alice")])
    terminal_first = [HashPolicy(HEADER, "x-user", terminal=True), HashPolicy(SOURCE_IP)]
    assert compute_hash(terminal_first, headers, "10.0.0.1", "/") == h("alice")
    # A terminal policy that yields nothing does not stop the evaluation.
    missing_terminal = [HashPolicy(HEADER, "x-none", terminal=True), HashPolicy(SOURCE_IP)]
    assert compute_hash(missing_terminal, headers, "10.0.0.1", "/") == h("10.0.0.1")


def test_pseudo_header_policies() -> None:
    headers = Headers([("host", "a.test")])
    assert compute_hash([HashPolicy(HEADER, ":authority")], headers, None, "/") == h("a.test")
    assert compute_hash(
        [HashPolicy(HEADER, ":authority")], headers, None, "/", authority="b.test"
    ) == h("b.test")
    assert compute_hash([HashPolicy(HEADER, ":path")], headers, None, "/x?y") == h("/x?y")
    assert compute_hash([HashPolicy(HEADER, ":method")], headers, None, "/", method="PUT") == h(
        "PUT"
    )


def test_cookie_parsing() -> None:
    headers = Headers([("cookie", 'a=1;  b=2;bad; c="quoted"'), ("cookie", "b=later; d=x=y")])
    assert cookie_value(headers, "a") == "1"
    assert cookie_value(headers, "b") == "2"
    assert cookie_value(headers, "c") == "quoted"
    assert cookie_value(headers, "d") == "x=y"
    assert cookie_value(headers, "bad") == ""
    assert cookie_value(headers, "A") == ""
