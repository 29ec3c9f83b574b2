"""The CLI's client of the control plane API (stdlib ``urllib``: synchronous, no event loop).

Every call raises :class:`ApiError` for an error answer (with the server's ``error`` and
``details``) and for a server that cannot be reached; nothing else escapes.
"""

from __future__ import annotations

import builtins
import json
import os
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ubimesh.control.api_error import ApiError

DEFAULT_SERVER = "http://127.0.0.1:15000"
DEFAULT_TIMEOUT_S = 30.0
#: The content type of a body holding several files: {"files": [{"name", "text"}, ...]}.
FILES_TYPE = "application/vnd.ubimesh.files+json"
#: The namespace path segment of cluster-scoped kinds (Mesh).
NO_NAMESPACE = "_"


def resolve_token(token: str | None, token_file: str | None, default_file: Path | None) -> str:
    """The admin token, from the first of: ``--token``, ``--token-file``, $UBIMESH_TOKEN,
    $UBIMESH_TOKEN_FILE, ``default_file`` (when it exists); else ""."""
    if token:
        return token.strip()
    if not token_file and os.environ.get("UBIMESH_TOKEN"):
        return os.environ["UBIMESH_TOKEN"].strip()
    path = token_file or os.environ.get("UBIMESH_TOKEN_FILE")
    if not path and default_file is not None and default_file.exists():
        path = str(default_file)
    if path:
        try:
            return Path(path).read_text().strip()
        except OSError as exc:
            raise ApiError(0, f"token file {path}: {exc.strerror}") from None
    return ""


class Client:
    """The API at ``server`` (``http://host:port``) with the admin ``token``."""

    def __init__(self, server: str, token: str, *, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.server = server.rstrip("/")
        self.token = token
        self.timeout = timeout

    def _call(
        self,
        method: str,
        path: str,
        *,
        query: dict[str, str] | None = None,
        body: bytes | None = None,
        content_type: str = "application/json",
    ) -> Any:
        url = self.server + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if body is not None:
            headers["Content-Type"] = content_type
        # Imported here: the CLI module is loaded by every `ubimesh` command, the proxy's
        # included, and urllib.request (with http.client and email) is a megabyte the proxy's
        # 30 MB idle budget does not have.
        from urllib import error as url_error
        from urllib import request as url_request

        request = url_request.Request(url, data=body, method=method, headers=headers)
        try:
            with url_request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read() or b"null")
        except url_error.HTTPError as exc:
            raw = exc.read()
            try:
                data = json.loads(raw)
                raise ApiError(exc.code, str(data.get("error")), data.get("details") or ())
            except (ValueError, AttributeError):
                raise ApiError(exc.code, f"HTTP {exc.code}: {raw[:200]!r}") from None
        except (url_error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ApiError(
                0, f"cannot reach the control plane at {self.server}: {reason} "
                "(start it with `ubimesh control`, or pass --server)"
            ) from None

    def apply(self, files: Sequence[tuple[str, str]], *, dry_run: bool = False) -> Any:
        """Apply ``files`` (name, text) together; the API's answer."""
        body = json.dumps({"files": [{"name": n, "text": t} for n, t in files]}).encode()
        query = {"dryRun": "true"} if dry_run else None
        return self._call("POST", "/api/v1/apply", query=query, body=body,
                          content_type=FILES_TYPE)

    def diff(self, files: Sequence[tuple[str, str]]) -> Any:
        body = json.dumps({"files": [{"name": n, "text": t} for n, t in files]}).encode()
        return self._call("POST", "/api/v1/diff", body=body, content_type=FILES_TYPE)

    def list(self, kind: str, namespace: str | None = None) -> list[dict[str, Any]]:
        query = {"namespace": namespace} if namespace else None
        data = self._call("GET", f"/api/v1/resources/{_q(kind)}", query=query)
        return list(data["items"])

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any]:
        return dict(self._call("GET", _path(kind, namespace, name)))

    def delete(self, kind: str, namespace: str, name: str) -> Any:
        return self._call("DELETE", _path(kind, namespace, name))

    def delete_many(self, keys: Sequence[dict[str, str]]) -> Any:
        return self._call("POST", "/api/v1/delete", body=json.dumps({"keys": list(keys)}).encode())

    def proxies(self) -> builtins.list[dict[str, Any]]:
        return list(self._call("GET", "/api/v1/proxies")["items"])

    def health(self) -> Any:
        return self._call("GET", "/healthz")


def _q(text: str) -> str:
    return urllib.parse.quote(text, safe="")


def _path(kind: str, namespace: str, name: str) -> str:
    return f"/api/v1/resources/{_q(kind)}/{_q(namespace or NO_NAMESPACE)}/{_q(name)}"
