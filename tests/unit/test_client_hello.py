"""ClientHello inspection (ubimesh.proto.client_hello): SNI and ALPN from the first bytes.

Real ClientHellos come from Python's ``ssl`` module (OpenSSL) driven through ``ssl.MemoryBIO``:
the client side of a handshake writes its first flight into a memory buffer, which is exactly
what a proxy reads from a new connection.  Synthetic ones are built here, field by field, from
RFC 8446 section 4.1.2, to reach shapes OpenSSL does not send.
"""

from __future__ import annotations

import ssl
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ubimesh.proto.client_hello import (
    MAX_CLIENT_HELLO,
    ClientHelloInfo,
    parse_client_hello,
)

# -- real ClientHellos from OpenSSL --------------------------------------------------------------


def openssl_client_hello(
    server_hostname: str | None = None,
    alpn: list[str] | None = None,
    max_version: ssl.TLSVersion | None = None,
) -> bytes:
    """The bytes OpenSSL sends first as a TLS client (its ClientHello record)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if max_version is not None:
        ctx.maximum_version = max_version
    if alpn is not None:
        ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_side=False, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    data = outgoing.read()
    assert data[:1] == b"\x16", data[:16]  # a handshake record
    return data


@pytest.mark.parametrize(
    ("hostname", "alpn"),
    [
        ("example.com", ["h2", "http/1.1"]),
        ("api.internal.svc.cluster.local", ["http/1.1"]),
        ("a.b", None),
        ("x" * 60 + ".example.org", ["h2"]),
    ],
)
@pytest.mark.parametrize("version", [None, ssl.TLSVersion.TLSv1_2], ids=["tls13", "tls12"])
def test_openssl_sni_and_alpn(
    hostname: str, alpn: list[str] | None, version: ssl.TLSVersion | None
) -> None:
    data = openssl_client_hello(hostname, alpn, version)
    info = parse_client_hello(data)
    assert info == ClientHelloInfo(
        is_tls=True, need_more=False, server_name=hostname, alpn=tuple(alpn or ())
    )


def test_openssl_without_sni_or_alpn() -> None:
    info = parse_client_hello(openssl_client_hello(None, None))
    assert info.is_tls and not info.need_more
    assert info.server_name == ""
    assert info.alpn == ()


def test_openssl_server_name_is_lower_cased() -> None:
    # Envoy's tls_inspector lower-cases the SNI; filter chain server_names are lower-case.
    info = parse_client_hello(openssl_client_hello("WWW.Example.COM", ["h2"]))
    assert info.server_name == "www.example.com"


def test_openssl_many_alpn_protocols_keep_client_order() -> None:
    protocols = ["h3", "h2", "spdy/3.1", "http/1.1", "http/1.0", "acme-tls/1"]
    info = parse_client_hello(openssl_client_hello("order.test", protocols))
    assert info.alpn == tuple(protocols)


def test_bytes_after_the_record_do_not_matter() -> None:
    data = openssl_client_hello("trailing.test", ["h2"])
    assert parse_client_hello(data + b"\x17\x03\x03\x00\x05hello") == parse_client_hello(data)


def test_every_truncation_of_a_real_hello_needs_more() -> None:
    data = openssl_client_hello("truncated.example.com", ["h2", "http/1.1"])
    for n in range(len(data)):
        info = parse_client_hello(data[:n])
        assert info.is_tls, n
        assert info.need_more, n
    full = parse_client_hello(data)
    assert not full.need_more and full.server_name == "truncated.example.com"


# -- not TLS -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n",
        b"POST /upload HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"SSH-2.0-OpenSSH_9.6\r\n",
        b"G",
        b"\x00",
        b"\x80\x2e\x01\x03\x01",  # an SSLv2-style hello is not a TLS record either
    ],
)
def test_non_tls_bytes_are_not_tls(data: bytes) -> None:
    info = parse_client_hello(data)
    assert not info.is_tls
    assert not info.need_more
    assert info.server_name == "" and info.alpn == ()


def test_nothing_yet_needs_more() -> None:
    assert parse_client_hello(b"").need_more


# -- synthetic ClientHellos ----------------------------------------------------------------------


def _u8(data: bytes) -> bytes:
    return struct.pack("!B", len(data)) + data


def _u16(data: bytes) -> bytes:
    return struct.pack("!H", len(data)) + data


def sni_extension(name: bytes) -> bytes:
    server_name_list = _u16(b"\x00" + _u16(name))
    return struct.pack("!H", 0) + _u16(server_name_list)


def alpn_extension(protocols: list[bytes]) -> bytes:
    return struct.pack("!H", 16) + _u16(_u16(b"".join(_u8(p) for p in protocols)))


def other_extension(ext_type: int, body: bytes) -> bytes:
    return struct.pack("!H", ext_type) + _u16(body)


def client_hello(extensions: list[bytes], session_id: bytes = b"\x11" * 32) -> bytes:
    body = (
        b"\x03\x03"
        + b"\x42" * 32
        + _u8(session_id)
        + _u16(b"\x13\x01\x13\x02\xc0\x2f")
        + _u8(b"\x00")
        + _u16(b"".join(extensions))
    )
    handshake = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + _u16(handshake)


# DNS-ish names: lower-case labels.
_label = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=20)
hostnames = st.lists(_label, min_size=1, max_size=5).map(".".join)
protocol_ids = st.binary(min_size=1, max_size=20).filter(lambda b: all(0x21 <= c < 0x7F for c in b))
noise_extensions = st.lists(
    st.tuples(
        st.integers(min_value=1, max_value=65535).filter(lambda t: t != 16),
        st.binary(max_size=40),
    ),
    max_size=4,
)


@given(
    hostnames,
    st.lists(protocol_ids, max_size=5),
    noise_extensions,
    noise_extensions,
    st.binary(max_size=32),
)
def test_synthetic_hello_round_trips(
    host: str,
    protocols: list[bytes],
    before: list[tuple[int, bytes]],
    after: list[tuple[int, bytes]],
    session_id: bytes,
) -> None:
    extensions = [other_extension(t, b) for t, b in before]
    extensions.append(sni_extension(host.encode()))
    if protocols:
        extensions.append(alpn_extension(protocols))
    extensions += [other_extension(t, b) for t, b in after]
    data = client_hello(extensions, session_id)
    info = parse_client_hello(data)
    assert info == ClientHelloInfo(
        is_tls=True,
        server_name=host,
        alpn=tuple(p.decode() for p in protocols),
    )
    for cut in sorted({0, 1, 4, 5, len(data) // 2, len(data) - 1}):
        assert parse_client_hello(data[:cut]).need_more


def test_synthetic_hello_without_extensions() -> None:
    body = b"\x03\x03" + b"\x00" * 32 + b"\x00" + _u16(b"\x00\x2f") + _u8(b"\x00")
    record = b"\x16\x03\x01" + _u16(b"\x01" + len(body).to_bytes(3, "big") + body)
    assert parse_client_hello(record) == ClientHelloInfo(is_tls=True)


def test_server_name_of_another_name_type_is_not_a_host_name() -> None:
    # RFC 6066 section 3: only NameType host_name (0) carries a DNS host name.
    other_type = struct.pack("!H", 0) + _u16(_u16(b"\x01" + _u16(b"not-a-host")))
    info = parse_client_hello(client_hello([other_type, alpn_extension([b"h2"])]))
    assert info.server_name == ""
    assert info.alpn == ("h2",)


def test_bytes_after_the_extensions_block_are_not_extensions() -> None:
    # A second handshake message in the same record must not be read as ClientHello extensions.
    hello = client_hello([alpn_extension([b"h2"])])
    handshake = hello[5:] + sni_extension(b"smuggled.example.com")
    info = parse_client_hello(b"\x16\x03\x01" + _u16(handshake))
    assert info.server_name == ""
    assert info.alpn == ("h2",)


def test_handshake_that_is_not_a_client_hello() -> None:
    server_hello = b"\x02\x00\x00\x04\x03\x03\x00\x00"
    info = parse_client_hello(b"\x16\x03\x03" + _u16(server_hello))
    assert info.is_tls and not info.need_more
    assert info.server_name == "" and info.alpn == ()


def test_oversized_record_is_judged_after_the_limit() -> None:
    # A record announcing more than MAX_CLIENT_HELLO is decided once MAX_CLIENT_HELLO bytes of
    # it are there (Envoy's tls_inspector gives up at its maximum), not left waiting forever.
    hello = client_hello([sni_extension(b"big.example.com"), other_extension(21, b"\0" * 30000)])
    assert len(hello) > MAX_CLIENT_HELLO + 5
    assert parse_client_hello(hello[: MAX_CLIENT_HELLO + 4]).need_more
    info = parse_client_hello(hello[: MAX_CLIENT_HELLO + 5])
    assert info.is_tls and not info.need_more
    assert info.server_name == "big.example.com"


# -- robustness ----------------------------------------------------------------------------------

_REAL = openssl_client_hello("fuzz.example.com", ["h2", "http/1.1"])


def _check_result(info: object) -> None:
    assert isinstance(info, ClientHelloInfo)
    assert isinstance(info.server_name, str)
    assert all(isinstance(p, str) for p in info.alpn)
    if not info.is_tls:
        assert not info.need_more


@settings(max_examples=300)
@given(st.binary(max_size=600))
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    _check_result(parse_client_hello(data))


@settings(max_examples=300)
@given(st.binary(max_size=600))
def test_arbitrary_record_bodies_never_raise(body: bytes) -> None:
    # Random bytes rarely start like a record; put them inside one so the parser goes deep.
    _check_result(parse_client_hello(b"\x16\x03\x01" + _u16(body)))
    _check_result(parse_client_hello(b"\x16\x03\x01" + _u16(b"\x01" + body)))


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(st.integers(min_value=5, max_value=len(_REAL) - 1), st.integers(0, 255)),
        min_size=1,
        max_size=8,
    )
)
def test_mutated_real_hello_never_raises(edits: list[tuple[int, int]]) -> None:
    data = bytearray(_REAL)
    for pos, value in edits:
        data[pos] = value
    _check_result(parse_client_hello(bytes(data)))
