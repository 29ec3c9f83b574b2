"""Workload identity: SPIFFE IDs, the CA, X.509-SVID verification, join tokens.

See docs/identity.md section 1. :class:`SpiffeId` is cheap to import; everything else loads
``cryptography`` (or sqlite) on first use, so the proxy's serving process can name IDs
without paying for the crypto library.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ubimesh.identity.spiffe_id import SpiffeId, SpiffeIdError

if TYPE_CHECKING:
    from ubimesh.identity.ca import CaError, CertificateAuthority
    from ubimesh.identity.csr import ProofError, new_key_and_csr, sign_proof, verify_proof
    from ubimesh.identity.svid import SvidError, load_certificates, verify_svid
    from ubimesh.identity.tokens import JoinTokens, TokenError

__all__ = [
    "CaError",
    "CertificateAuthority",
    "JoinTokens",
    "ProofError",
    "SpiffeId",
    "SpiffeIdError",
    "SvidError",
    "TokenError",
    "load_certificates",
    "new_key_and_csr",
    "sign_proof",
    "verify_proof",
    "verify_svid",
]

_LAZY = {
    "CaError": "ca",
    "CertificateAuthority": "ca",
    "ProofError": "csr",
    "new_key_and_csr": "csr",
    "sign_proof": "csr",
    "verify_proof": "csr",
    "SvidError": "svid",
    "load_certificates": "svid",
    "verify_svid": "svid",
    "JoinTokens": "tokens",
    "TokenError": "tokens",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ubimesh.identity' has no attribute {name!r}")
    return getattr(importlib.import_module(f"ubimesh.identity.{module}"), name)
