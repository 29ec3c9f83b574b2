"""SDS resources the control plane serves over ADS: the trust bundle as the ``ROOTCA`` secret.

Every proxy gets the same ``ROOTCA`` secret (docs/identity.md): a ``Secret`` whose
``validation_context.trusted_ca`` holds the CA bundle PEM inline (every trusted root; several
during a root rotation).  Proxies ask for it by name, as for EDS, when a TLS context of their
listeners or clusters refers to it with ``sds_config: {ads: {}}``.  Private keys are never
served by the control plane: the ``default`` certificate is made by each workload itself.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2

__all__ = ["ROOTCA", "secrets_version", "trust_bundle_secret"]

#: The name of the trust bundle secret (Istio's name for the same thing).
ROOTCA = "ROOTCA"


def trust_bundle_secret(bundle_pem: bytes, name: str = ROOTCA) -> secret_pb2.Secret:
    """The ``Secret`` ``name`` with ``validation_context.trusted_ca.inline_bytes`` = the bundle.

    Raises ``ValueError`` for a bundle that holds no PEM certificate (an empty trust bundle
    would make every peer fail verification, which is never what is meant).
    """
    if not isinstance(bundle_pem, bytes | bytearray):
        raise TypeError(f"trust bundle: expected PEM bytes, got {type(bundle_pem).__name__}")
    if b"-----BEGIN CERTIFICATE-----" not in bundle_pem:
        raise ValueError(
            f"trust bundle for secret {name!r}: no PEM certificate in {len(bundle_pem)} bytes; "
            "expected the CA's bundle (bundle.pem: every trusted root, PEM)"
        )
    return secret_pb2.Secret(
        name=name,
        validation_context=common_pb2.CertificateValidationContext(
            trusted_ca=base_pb2.DataSource(inline_bytes=bytes(bundle_pem))
        ),
    )


def secrets_version(secrets: Mapping[str, secret_pb2.Secret]) -> str:
    """The SDS version of a set of secrets: a content hash that changes exactly when one does."""
    digest = hashlib.sha256()
    for name in sorted(secrets):
        encoded = name.encode()
        digest.update(len(encoded).to_bytes(4, "big") + encoded)
        digest.update(hashlib.sha256(secrets[name].SerializeToString(deterministic=True)).digest())
    return digest.hexdigest()[:16]
