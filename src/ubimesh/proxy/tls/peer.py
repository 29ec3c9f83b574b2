"""What a TLS connection knows about its peer once verified (no ``ssl`` or ``cryptography``
here: the request path imports this module).

``PeerInfo`` is stored on the downstream connection (``HttpConnection.tls``) for the HTTP
filters and ``x-forwarded-client-cert``; its ``xfcc`` renders Envoy's element for this hop.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ubimesh.proxy.snapshot.types import ClientCertDetail


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """The TLS side of a connection. ``presented`` is false when the peer sent no certificate
    (a TLS client without one); the other peer fields are then empty. ``spiffe_id`` is the
    verified SPIFFE ID ("" when the certificate is not an SVID). ``sha256`` is the lower-case
    hex digest of the peer leaf's DER. ``local_uri_sans`` are the URI SANs of this proxy's own
    certificate (XFCC's ``By``)."""

    presented: bool
    spiffe_id: str = ""
    uri_sans: tuple[str, ...] = ()
    dns_sans: tuple[str, ...] = ()
    subject: str = ""
    sha256: str = ""
    local_uri_sans: tuple[str, ...] = ()

    xfcc_elements: dict[tuple[ClientCertDetail, ...], str] = field(
        default_factory=dict, compare=False, repr=False
    )
    """``xfcc`` results by details: a connection's element is rendered once, not per request."""

    def xfcc(self, details: tuple[ClientCertDetail, ...]) -> str:
        """This hop's x-forwarded-client-cert element, as Envoy writes it: ``By`` (one per
        local URI SAN), ``Hash``, then the configured details in Envoy's order (``Subject``
        quoted and always present, one ``URI`` per URI SAN or ``URI=`` when none, one ``DNS``
        per DNS SAN)."""
        element = self.xfcc_elements.get(details)
        if element is None:
            element = self.xfcc_elements[details] = self._render_xfcc(details)
        return element

    def _render_xfcc(self, details: tuple[ClientCertDetail, ...]) -> str:
        parts = [f"By={uri}" for uri in self.local_uri_sans]
        if self.sha256:
            parts.append(f"Hash={self.sha256}")
        for detail in details:
            if detail is ClientCertDetail.SUBJECT:
                parts.append(f'Subject="{self.subject}"')
            elif detail is ClientCertDetail.URI:
                parts.extend([f"URI={u}" for u in self.uri_sans] or ["URI="])
            else:
                parts.extend(f"DNS={d}" for d in self.dns_sans)
        return ";".join(parts)


#: A TLS connection whose peer presented no certificate.
NO_PEER_CERTIFICATE = PeerInfo(presented=False)
