"""A workload's credential on its own disk, so that a restarted workload keeps its identity.

Join tokens are single-use (docs/identity.md), so a workload that lost its key on a restart
could not prove who it is again without a fresh token from an operator. SPIRE's agent solves
this by keeping its SVID on disk; ubimesh does the same: after every issuance the workload
writes its key, chain and trust bundle to ``<directory>/svid.json`` and, when it starts again,
renews with that credential (proof of possession of the stored key) instead of the token.

Contract:

* the directory is created 0700 and the file 0600, written whole to a temporary file and
  renamed, so a crash leaves either the old credential or the new one, never a mixture;
* :meth:`CredentialStore.load` returns a credential only when everything checks: the key
  matches the leaf, the chain verifies against the stored bundle for the expected SPIFFE ID,
  and the leaf has not expired. Anything else (absent, unreadable, another identity, expired,
  tampered) returns None with the reason logged: the caller falls back to its join token;
* the key stays on the machine that made it (it is written to this workload's own disk only).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from ubimesh.identity.spiffe_id import SpiffeId

log = logging.getLogger("ubimesh.identity.credentials")

FILE_NAME = "svid.json"
#: A stored credential is a few KB; anything much larger is not ours.
MAX_SIZE = 256 * 1024

T = TypeVar("T")


class CredentialStore:
    """One workload's stored credential in ``directory``."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.path = self.directory / FILE_NAME

    def save(self, key_pem: bytes, chain_pem: bytes, bundle_pem: bytes, received_at: float) -> None:
        """Write the credential (replacing the previous one). Raises ``OSError``."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        data = json.dumps({
            "key": key_pem.decode("ascii"),
            "chain": chain_pem.decode("ascii"),
            "bundle": bundle_pem.decode("ascii"),
            "received_at": received_at,
        }).encode()
        tmp = self.path.with_name(f".{FILE_NAME}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)  # a leftover tmp file may have had other bits
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)

    def read(self) -> tuple[bytes, bytes, bytes, float] | None:
        """(key, chain, bundle, received_at) as stored, or None (absent or unreadable; logged)."""
        try:
            with open(self.path, "rb") as f:
                raw = f.read(MAX_SIZE + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("stored credential %s: cannot read it: %s", self.path, exc.strerror)
            return None
        if len(raw) > MAX_SIZE:
            log.warning("stored credential %s: over %d bytes; ignored", self.path, MAX_SIZE)
            return None
        try:
            doc = json.loads(raw)
            return (str(doc["key"]).encode("ascii"), str(doc["chain"]).encode("ascii"),
                    str(doc["bundle"]).encode("ascii"), float(doc["received_at"]))
        except (ValueError, KeyError, TypeError, UnicodeEncodeError):
            log.warning("stored credential %s: not a credential ubimesh wrote; ignored",
                        self.path)
            return None

    def load(
        self, spiffe_id: SpiffeId, check: Callable[[bytes, bytes, bytes, float], T]
    ) -> T | None:
        """The stored credential for ``spiffe_id`` after ``check(key, chain, bundle,
        received_at)`` accepted it (it raises to refuse; the reason is logged), or None."""
        stored = self.read()
        if stored is None:
            return None
        try:
            return check(*stored)
        except Exception as exc:  # any refusal: the token is the way back
            log.warning("stored credential %s for %s not used: %s", self.path, spiffe_id, exc)
            return None

    def clear(self) -> None:
        """Remove the stored credential (if any)."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
