"""Read SNI and ALPN from the first bytes of a TLS ClientHello (what Envoy's tls_inspector does).

Pure function over bytes: ``parse_client_hello(data)`` says whether the bytes look like TLS,
whether more bytes are needed, and the server name and ALPN protocols when present
(RFC 8446 section 4.1.2; extensions: server_name RFC 6066 section 3, ALPN RFC 7301).
"""

from __future__ import annotations

from dataclasses import dataclass

#: Envoy's tls_inspector reads at most this much before giving up (its default max size).
MAX_CLIENT_HELLO = 16 * 1024


@dataclass(frozen=True, slots=True)
class ClientHelloInfo:
    is_tls: bool
    need_more: bool = False
    server_name: str = ""
    alpn: tuple[str, ...] = ()


NOT_TLS = ClientHelloInfo(is_tls=False)
NEED_MORE = ClientHelloInfo(is_tls=True, need_more=True)


def parse_client_hello(data: bytes) -> ClientHelloInfo:
    if not data:
        return NEED_MORE
    if data[0] != 0x16:
        return NOT_TLS
    if len(data) < 5:
        return NEED_MORE
    record_len = int.from_bytes(data[3:5], "big")
    if len(data) < 5 + min(record_len, MAX_CLIENT_HELLO):
        return NEED_MORE
    body = data[5 : 5 + record_len]
    try:
        return _parse_handshake(body)
    except (IndexError, ValueError):
        return ClientHelloInfo(is_tls=True)


def _parse_handshake(b: bytes) -> ClientHelloInfo:
    if b[0] != 0x01:  # ClientHello
        return ClientHelloInfo(is_tls=True)
    pos = 4 + 2 + 32  # handshake header, legacy_version, random
    sid_len = b[pos]
    pos += 1 + sid_len
    cs_len = int.from_bytes(b[pos : pos + 2], "big")
    pos += 2 + cs_len
    comp_len = b[pos]
    pos += 1 + comp_len
    if pos + 2 > len(b):
        return ClientHelloInfo(is_tls=True)
    ext_total = int.from_bytes(b[pos : pos + 2], "big")
    pos += 2
    end = min(len(b), pos + ext_total)
    sni = ""
    alpn: list[str] = []
    while pos + 4 <= end:
        ext_type = int.from_bytes(b[pos : pos + 2], "big")
        ext_len = int.from_bytes(b[pos + 2 : pos + 4], "big")
        ext = b[pos + 4 : pos + 4 + ext_len]
        pos += 4 + ext_len
        if ext_type == 0 and len(ext) >= 5:
            name_len = int.from_bytes(ext[3:5], "big")
            if ext[2] == 0:
                sni = ext[5 : 5 + name_len].decode("ascii", "replace").lower()
        elif ext_type == 16 and len(ext) >= 2:
            p = 2
            while p < len(ext):
                n = ext[p]
                alpn.append(ext[p + 1 : p + 1 + n].decode("ascii", "replace"))
                p += 1 + n
    return ClientHelloInfo(is_tls=True, server_name=sni, alpn=tuple(alpn))
