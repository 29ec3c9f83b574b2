"""Identity sub-commands: ``ca init|import|status|rotate``, ``token create``, ``certs status``.

``ca init|import|status`` work on the CA's files directly (``<data dir>/ca``; run them before
the first ``ubimesh control``, which otherwise creates a CA itself); ``token`` and ``certs``
call the control plane's API with the admin token. ``ca rotate begin|finish`` goes through the
API (``POST /api/v1/identity/rotation``) so the new bundle is pushed at once, except with
``--data-dir`` naming a data dir whose control plane is not running: then it changes the files
(a control plane started later, or one checking the files, picks the change up).

``main.py`` registers them with :func:`add_commands` and dispatches with :func:`run`. This
module imports nothing heavy at load time: every ``ubimesh`` command, the proxy's included,
loads it.

Exit codes: 0 ok, 1 refused or failed (the reason on stderr), 2 usage.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import datetime

from ubimesh.control.api_error import ApiError

__all__ = ["add_commands", "run"]

COMMANDS = ("ca", "token", "certs")


def add_commands(sub: Any) -> None:
    """Register ``ca``, ``token`` and ``certs`` on ``sub`` (argparse sub-parsers)."""
    from ubimesh.cli.control_cmds import _client_flags

    ca = sub.add_parser("ca", help="the mesh's certificate authority (files in the data dir)")
    ca_sub = ca.add_subparsers(dest="ca_command", required=True)
    init = ca_sub.add_parser("init", help="make a root and an intermediate (ECDSA P-256)")
    _ca_flags(init)
    init.add_argument("--trust-domain", default="cluster.local",
                      help="SPIFFE trust domain (default cluster.local)")
    imp = ca_sub.add_parser("import", help="use your own root, or intermediate + chain")
    _ca_flags(imp)
    imp.add_argument("--trust-domain", default="cluster.local",
                     help="SPIFFE trust domain (default cluster.local)")
    imp.add_argument("--cert", required=True, help="the CA certificate (PEM)")
    imp.add_argument("--key", required=True, help="its private key (PEM, unencrypted)")
    imp.add_argument("--chain", default="",
                     help="for an intermediate: the certificates above it up to the root (PEM)")
    status = ca_sub.add_parser("status", help="the CA's roots and intermediates")
    _ca_flags(status)
    rotate = ca_sub.add_parser(
        "rotate", help="root rotation: begin (new root beside the old, pushed to every proxy), "
        "finish (old root removed) once every workload renewed")
    rotate.add_argument("phase", choices=["begin", "finish"])
    rotate.add_argument("--force", action="store_true",
                        help="finish even though leaves issued before begin are still live "
                        "(they stop verifying)")
    _ca_flags(rotate)
    _client_flags(rotate)

    token = sub.add_parser("token", help="join tokens (one-time, for a workload's first "
                           "certificate)")
    token_sub = token.add_subparsers(dest="token_command", required=True)
    create = token_sub.add_parser("create", help="make a one-time join token for an identity")
    create.add_argument("--identity", required=True,
                        help="spiffe://<trust domain>/ns/<namespace>/sa/<service account>")
    create.add_argument("--ttl", default="1h", help="how long the token is valid (default 1h)")
    _client_flags(create)

    certs = sub.add_parser("certs", help="certificates the control plane's CA holds and issued")
    certs_sub = certs.add_subparsers(dest="certs_command", required=True)
    cstatus = certs_sub.add_parser("status", help="roots, intermediates and issued leaves, "
                                   "with expiry warnings")
    cstatus.add_argument("-o", "--output", choices=["table", "json"], default="table")
    _client_flags(cstatus)


def _ca_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", default="",
                        help="the control plane's data dir; the CA is in <data dir>/ca "
                        "(default ~/.local/share/ubimesh)")
    parser.add_argument("--ca-dir", default="",
                        help="the CA's own directory, when the control plane runs with "
                        "--ca-dir (replicas sharing one CA); overrides <data dir>/ca")


def run(args: argparse.Namespace) -> int | None:
    """Run the sub-command if it is one of these; None otherwise."""
    if args.command not in COMMANDS:
        return None
    try:
        if args.command == "ca":
            return _ca(args)
        if args.command == "token":
            return _token_create(args)
        return _certs_status(args)
    except ApiError as exc:
        for line in exc.lines():
            print(f"error: {line}", file=sys.stderr)
        return 1


def _ca_dir(args: argparse.Namespace) -> Path:
    from ubimesh.control.server import CA_DIR, default_data_dir

    if getattr(args, "ca_dir", ""):
        return Path(args.ca_dir)
    return (Path(args.data_dir) if args.data_dir else default_data_dir()) / CA_DIR


def _read(path: str, flag: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ApiError(0, f"{flag} {path}: {exc.strerror}") from None


def _running_api(data_dir: Path) -> str:
    """The API URL of the control plane running on ``data_dir`` ("" when none is)."""
    import os

    from ubimesh.control.server import ADDRESSES_FILE

    try:
        info = json.loads((data_dir / ADDRESSES_FILE).read_text())
        os.kill(int(info["pid"]), 0)
        return str(info["api"])
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def _rotate(args: argparse.Namespace) -> int:
    from ubimesh.cli.control_cmds import _client
    from ubimesh.control.client import Client, resolve_token
    from ubimesh.control.server import TOKEN_FILE

    body = {"phase": args.phase, "force": args.force}
    if not args.data_dir:
        status = _client(args)._call("POST", "/api/v1/identity/rotation",
                                     body=json.dumps(body).encode())
    else:
        data_dir = Path(args.data_dir)
        api = _running_api(data_dir)
        if not api:
            return _rotate_files(args, data_dir)
        token = resolve_token(args.token, args.token_file, data_dir / TOKEN_FILE)
        status = Client(api, token)._call("POST", "/api/v1/identity/rotation",
                                          body=json.dumps(body).encode())
    _print_rotation(args.phase, status)
    return 0


def _rotate_files(args: argparse.Namespace, data_dir: Path) -> int:
    """Rotate on the CA's files (no control plane running on ``data_dir``)."""
    from ubimesh.control.identity_metrics import rotation_stragglers
    from ubimesh.control.server import ISSUED_DB
    from ubimesh.identity.ca import CaError, CertificateAuthority
    from ubimesh.identity.issued import IssuedLeaves

    try:
        ca = CertificateAuthority.load(_ca_dir(args))
        if args.phase == "begin":
            ca.begin_root_rotation()
        else:
            if not ca.rotating:
                raise CaError("root rotation: none under way; `ubimesh ca rotate begin` first")
            leaves = []
            if (data_dir / ISSUED_DB).exists():
                issued = IssuedLeaves(data_dir / ISSUED_DB)
                try:
                    leaves = issued.list()
                finally:
                    issued.close()
            stragglers = rotation_stragglers(ca.status(), leaves)
            if stragglers and not args.force:
                names = ", ".join(sorted({str(r["identity"]) for r in stragglers}))
                raise CaError(f"root rotation: {len(stragglers)} live leaf certificate(s) still "
                              f"chain to the old root ({names}); wait for their renewal or pass "
                              "--force")
            ca.finish_root_rotation()
    except CaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    _print_rotation(args.phase, ca.status())
    print(f"(changed the files in {_ca_dir(args)}; no control plane is running there)",
          file=sys.stderr)
    return 0


def _print_rotation(phase: str, status: dict[str, Any]) -> None:
    if phase == "begin":
        print("root rotation begun: the bundle holds the new and the old root; new leaves come "
              "from the new root. Finish once every workload renewed (half its lifetime): "
              "`ubimesh ca rotate finish`")
    else:
        print("root rotation finished: the old root is no longer trusted")
    _print_table(_rows(status, []))


def _ca(args: argparse.Namespace) -> int:
    from ubimesh.identity.ca import CaError, CertificateAuthority
    from ubimesh.identity.svid import SvidError

    if args.ca_command == "rotate":
        return _rotate(args)
    directory = _ca_dir(args)
    try:
        if args.ca_command == "init":
            ca = CertificateAuthority.init(directory, args.trust_domain)
            print(f"created a CA for trust domain {ca.trust_domain} in {directory}")
        elif args.ca_command == "import":
            ca = CertificateAuthority.import_(
                directory, args.trust_domain, _read(args.cert, "--cert"),
                _read(args.key, "--key"), _read(args.chain, "--chain") if args.chain else b"",
            )
            print(f"imported a CA ({ca.mode}) for trust domain {ca.trust_domain} into "
                  f"{directory}")
        else:
            ca = CertificateAuthority.load(directory)
        _print_table(_rows(ca.status(), []))
    except (CaError, SvidError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _token_create(args: argparse.Namespace) -> int:
    from ubimesh.cli.control_cmds import _client

    body = json.dumps({"identity": args.identity, "ttl": args.ttl}).encode()
    answer = _client(args)._call("POST", "/api/v1/identity/tokens", body=body)
    # The token alone on stdout (for `> file` or `$(...)`); what it is for on stderr.
    print(answer["token"])
    print(f"join token for {answer['identity']}, single use, expires {answer['expires']}",
          file=sys.stderr)
    return 0


def _certs_status(args: argparse.Namespace) -> int:
    from ubimesh.cli.control_cmds import _client

    answer = _client(args)._call("GET", "/api/v1/identity/status")
    if args.output == "json":
        print(json.dumps(answer, indent=2))
        return 0
    rows = _rows(answer, answer.get("leaves", []))
    _print_table(rows)
    return 0


def _parse_time(text: Any) -> datetime.datetime:
    import datetime

    return datetime.datetime.fromisoformat(str(text))


def _rows(status: dict[str, Any], leaves: Sequence[dict[str, Any]]) -> list[list[str]]:
    from ubimesh.control.identity_metrics import expiry_warning

    rows: list[list[str]] = []
    for kind, items in (("root", status.get("roots", [])),
                        ("intermediate", status.get("intermediates", []))):
        for item in items:
            nb, na = _parse_time(item["not_before"]), _parse_time(item["not_after"])
            label = kind + (" (new)" if kind == "root" and status.get("rotating")
                            and item.get("current") else "")
            rows.append([label, item["subject"], item["spiffe_id"], "", na.isoformat(),
                         expiry_warning(nb, na, ca=True)])
    for leaf in leaves:
        nb, na = _parse_time(leaf["not_before"]), _parse_time(leaf["not_after"])
        rows.append(["leaf", "", leaf["identity"], leaf.get("node") or "-", na.isoformat(),
                     expiry_warning(nb, na, ca=False)])
    return rows


def _print_table(rows: list[list[str]]) -> None:
    header = ["KIND", "SUBJECT", "SPIFFE ID", "PROXY", "NOT AFTER", "WARNING"]
    table = [header, *rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
