"""``ubimesh policy can | blast-radius | diff``: policy questions answered before applying
(docs/policy.md section 4; the evaluator is ``ubimesh.policy.questions``).

The mesh comes from the control plane's API (``--server``, the admin token as for the other
client commands: ``--token``, ``--token-file``, $UBIMESH_TOKEN, $UBIMESH_TOKEN_FILE), or from
``-f FILE`` (repeatable) read locally with no server. ``diff`` compares the current mesh (the
server's, or ``--base FILE`` locally) with the same mesh plus ``-f FILE`` applied.

Exit codes: 0 answered (``can``: allowed); 3 the answer is no (``can``: denied for at least
one destination; ``diff --fail-on``: a flip of that kind); 1 validation or server errors (one
a line on stderr); 2 usage (a flag or its value; the message names the flag, the value and the
fix). This module imports nothing heavy at load time: every ``ubimesh`` command loads it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ubimesh.control.api_error import ApiError

if TYPE_CHECKING:
    from ubimesh.control.client import Client
    from ubimesh.control.resources.model import Resource
    from ubimesh.policy.questions import (
        BlastRadius,
        CanAnswer,
        Destination,
        MeshPolicy,
        PolicyDiff,
        Route,
    )

COMMANDS = ("policy",)
#: The answer is no: denied (can), or a flip of the kind --fail-on names (diff).
EXIT_NO = 3
FAIL_ON = ("new-allow", "any")


def add_commands(sub: Any) -> None:
    """Register ``ubimesh policy`` and its sub-commands on ``sub`` (argparse sub-parsers)."""
    from ubimesh.cli.control_cmds import _client_flags

    policy = sub.add_parser(
        "policy", help="ask what the mesh's policy allows, before applying a change",
        description="Questions answered by the compiler and RBAC engine the proxies run.",
    )
    questions = policy.add_subparsers(dest="policy_command", required=True)

    can = questions.add_parser(
        "can", help="may a caller make this request? (exit 0 allowed, 3 denied)",
        description="Allow or deny, and the deciding policy, for each destination workload "
        "of the service (and each of its ports unless --port). Exit 0 when every answer is "
        "allow, 3 when any is deny.",
    )
    can.add_argument("--from", dest="source", required=True, metavar="IDENTITY|SERVICE",
                     help="a SPIFFE ID, or a service (NAME or NAME.NAMESPACE): every identity "
                     "of its workloads")
    can.add_argument("--to", required=True, metavar="SERVICE",
                     help="the destination service (NAME or NAME.NAMESPACE)")
    can.add_argument("--port", default=None, help="service port number or name (default: "
                     "every port of the service)")
    can.add_argument("--method", default="GET", help="HTTP method (default GET)")
    can.add_argument("--path", default="/", help="request path, query allowed (default /)")
    can.add_argument("-H", "--header", action="append", default=[], metavar="'NAME: VALUE'",
                     help="a request header; repeatable")
    _common(can)
    _files(can, "resource files to ask about instead of the server's mesh")
    _client_flags(can)

    blast = questions.add_parser(
        "blast-radius", help="everything an identity can reach, directly and transitively",
        description="Every (service, port, route) IDENTITY can reach directly, then through "
        "the identities of what it reaches (breadth-first), with the hop count and the "
        "policy allowing each step.",
    )
    blast.add_argument("identity", metavar="IDENTITY",
                       help="a SPIFFE ID, or a service (NAME or NAME.NAMESPACE) with one "
                       "identity")
    blast.add_argument("--max-hops", type=int, default=0,
                       help="stop after this many hops (default 0: no limit)")
    _common(blast)
    _files(blast, "resource files to ask about instead of the server's mesh")
    _client_flags(blast)

    diff = questions.add_parser(
        "diff", help="every decision a change flips (for CI: --fail-on new-allow)",
        description="Every (source identity, destination, port, route) whose decision flips "
        "between the current mesh and the mesh with FILE applied, with the policy responsible "
        "on each side.",
    )
    diff.add_argument("-f", "--filename", action="append", required=True, metavar="FILE",
                      help="the change (resource files, as for apply); repeatable; - reads "
                      "stdin")
    diff.add_argument("--base", action="append", default=None, metavar="FILE",
                      help="the current mesh from these files instead of the server")
    diff.add_argument("--fail-on", choices=FAIL_ON, default=None,
                      help="exit 3 when a flip of this kind exists: new-allow (something "
                      "denied becomes allowed) or any")
    _common(diff, namespace=False)
    _client_flags(diff)


def _common(parser: argparse.ArgumentParser, *, namespace: bool = True) -> None:
    if namespace:
        parser.add_argument("-n", "--namespace", default="default",
                            help="namespace of a service given as NAME (default 'default')")
    parser.add_argument("-o", "--output", choices=["table", "json"], default="table")


def _files(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("-f", "--filename", action="append", default=None, metavar="FILE",
                        help=f"{what}; repeatable; - reads stdin")


def run(args: argparse.Namespace) -> int | None:
    """Run the sub-command if it is one of these; None otherwise."""
    if args.command not in COMMANDS:
        return None
    # A short-lived command that builds one large graph of long-lived objects (resources,
    # compiled listeners, RBAC rules) and exits: the cyclic collector's passes over it would
    # find nothing to free and cost a noticeable share of the time on a large mesh.
    gc.disable()
    try:
        if args.policy_command == "can":
            return _can(args)
        if args.policy_command == "blast-radius":
            return _blast_radius(args)
        return _diff(args)
    except Exception as exc:
        # The error classes are imported only now: the evaluator's modules (the compiler, the
        # proxy's RBAC translator) load while a forked child reads the files
        # (_file_resources).
        code = _failed(args, exc)
        if code is None:
            raise
        return code


def _failed(args: argparse.Namespace, exc: Exception) -> int | None:
    """Report ``exc`` and return the exit code, or None for an unexpected exception."""
    from ubimesh.control.compiler import CompileError
    from ubimesh.control.resources import ResourceErrors
    from ubimesh.policy.errors import QuestionError
    from ubimesh.proxy.xds.errors import ConfigError

    if isinstance(exc, QuestionError):
        print(f"ubimesh policy {args.policy_command}: {exc}", file=sys.stderr)
        return 2
    if isinstance(exc, ResourceErrors):
        _errors([f"{len(exc.errors)} validation error(s)", *(str(e) for e in exc.errors)])
        return 1
    if isinstance(exc, ApiError | CompileError):
        _errors(exc.lines() if isinstance(exc, ApiError) else [str(exc)])
        return 1
    if isinstance(exc, ConfigError):
        # The proxy would refuse this configuration too: say so, it is a compiler bug.
        _errors(["the compiled RBAC is not one the proxy accepts:", str(exc)])
        return 1
    return None


def _answered(args: argparse.Namespace, code: int) -> int:
    """``code``, once the answer is printed. When the command is its own process, the process
    ends here, output flushed: freeing the mesh's object graph (the caller's locals) and the
    interpreter's teardown would add a tenth of a second on a large mesh, for nothing."""
    if getattr(args, "own_process", False):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _errors(lines: Sequence[str]) -> None:
    for line in lines:
        print(f"error: {line}", file=sys.stderr)


# -- the mesh ----------------------------------------------------------------------------------


def _server_resources(args: argparse.Namespace) -> list[Resource]:
    from ubimesh.cli.control_cmds import _client

    return fetch_resources(_client(args))


def fetch_resources(client: Client) -> list[Resource]:
    """Every resource the control plane stores (the Workloads proxies registered included),
    as its compiler reads them."""
    from ubimesh.control.resources.kinds import KINDS
    from ubimesh.control.resources.model import Resource

    return [
        Resource.from_dict(item, client.server)
        for info in KINDS.values()
        for item in client.list(info.plural)
    ]


def _file_resources(
    names: Sequence[str], base: Sequence[Resource] = (), *, validate: bool = True
) -> list[Resource]:
    """The resources of ``names`` (over ``base``, replacing what they name again), validated
    as one set (unless not ``validate``: each resource is, the set is not). Raises
    ResourceErrors or ApiError (a file that cannot be read)."""
    from ubimesh.cli.control_cmds import _read_files
    from ubimesh.policy.files import read_files

    # The evaluator's modules load while a forked child is already reading a large input.
    resources = read_files(_read_files(names), meanwhile=_import_evaluator)
    from ubimesh.control.resources import overlay, validate_set

    merged = overlay(base, resources) if base else resources
    if validate:
        validate_set(merged)
    return merged


def _import_evaluator() -> None:
    import ubimesh.policy.questions  # noqa: F401


def _mesh(args: argparse.Namespace) -> MeshPolicy:
    resources = _file_resources(args.filename) if args.filename else _server_resources(args)
    from ubimesh.policy.questions import MeshPolicy

    return MeshPolicy(resources)


def _unchecked_mesh(args: argparse.Namespace) -> tuple[MeshPolicy, Callable[[], None]]:
    """The mesh, and what checks its resources as a set (``validate_set``; the server's are
    checked already). For a question about the whole mesh: the check runs while the
    listeners compile (``load_listeners(meanwhile=...)``), and the caller runs it before
    reporting any other error, so that an invalid set gets its validation errors, as with
    ``_mesh``."""
    if not args.filename:
        from ubimesh.policy.questions import MeshPolicy

        return MeshPolicy(_server_resources(args)), lambda: None
    resources = _file_resources(args.filename, validate=False)
    from ubimesh.control.resources import validate_set
    from ubimesh.policy.questions import MeshPolicy

    try:
        mesh = MeshPolicy(resources)
    except Exception:
        validate_set(resources)  # the set's own errors, when that is what went wrong
        raise
    return mesh, lambda: validate_set(resources)


# -- can ---------------------------------------------------------------------------------------


def _headers(values: Sequence[str]) -> list[tuple[str, str]]:
    from ubimesh.policy.errors import QuestionError

    headers = []
    for value in values:
        name, colon, text = value.partition(":")
        if not colon or not name.strip() or any(c.isspace() for c in name.strip()):
            raise QuestionError(
                f"-H {value!r}: a header is 'NAME: VALUE', e.g. -H 'x-role: admin'"
            )
        headers.append((name.strip().lower(), text.strip()))
    return headers


def _can(args: argparse.Namespace) -> int:
    from ubimesh.policy.errors import QuestionError

    method = args.method
    if not method or not all(c.isalnum() or c in "-_" for c in method):
        raise QuestionError(f"--method {method!r}: an HTTP method is a token, e.g. GET or POST")
    port: str | int | None = args.port
    if isinstance(port, str) and port.isdigit():
        port = int(port)
    headers = _headers(args.header)
    mesh = _mesh(args)
    from ubimesh.policy.questions import can

    answer = can(mesh, args.source, args.to, namespace=args.namespace, port=port,
                 method=method, path=args.path, headers=headers)
    if args.output == "json":
        print(json.dumps(can_json(answer, method, args.path, headers), indent=2))
    else:
        print(can_table(answer), end="")
    return _answered(args, 0 if answer.allowed else EXIT_NO)


def _policy(name: str) -> str:
    return name or "none"


def _port(destination: Destination) -> str:
    return f"{destination.port_name}:{destination.port}/{destination.protocol}"


def _service(destination: Destination) -> str:
    return f"{destination.service}.{destination.namespace}"


def _destination_json(destination: Destination) -> dict[str, Any]:
    return {
        "service": destination.service,
        "namespace": destination.namespace,
        "identity": destination.identity,
        "port": destination.port,
        "portName": destination.port_name,
        "protocol": destination.protocol,
    }


def can_json(answer: CanAnswer, method: str, path: str,
             headers: Sequence[tuple[str, str]]) -> dict[str, Any]:
    return {
        "allowed": answer.allowed,
        "request": {"method": method, "path": path, "headers": [list(h) for h in headers]},
        "answers": [
            {
                "source": row.source,
                **_destination_json(row.destination),
                "workload": row.workload,
                "allowed": row.allowed,
                "policy": _policy(row.policy),
                "note": row.note,
            }
            for row in answer.rows
        ],
    }


def can_table(answer: CanAnswer) -> str:
    rows = [["SOURCE", "SERVICE", "WORKLOAD", "PORT", "DECISION", "POLICY", "NOTE"]]
    for row in answer.rows:
        rows.append([row.source, _service(row.destination), row.workload,
                     _port(row.destination), "allow" if row.allowed else "deny",
                     _policy(row.policy), row.note])
    return render(rows)


# -- blast-radius ------------------------------------------------------------------------------


def _blast_radius(args: argparse.Namespace) -> int:
    from ubimesh.policy.errors import QuestionError

    if args.max_hops < 0:
        raise QuestionError(f"--max-hops {args.max_hops}: give 0 (no limit) or more")
    mesh, check = _unchecked_mesh(args)
    from ubimesh.policy.questions import blast_radius

    identity = args.identity
    try:
        if not identity.startswith("spiffe://"):
            identities = mesh.sources(identity, args.namespace, "IDENTITY")
            if len(identities) != 1:
                raise QuestionError(
                    f"IDENTITY {identity!r}: the service's workloads run as "
                    f"{len(identities)} identities ({', '.join(identities)}); give one of them"
                )
            identity = identities[0]
    except Exception:
        check()
        raise
    # Every listener is needed; the set is checked while they compile.
    mesh.load_listeners(meanwhile=check)
    answer = blast_radius(mesh, identity, max_hops=args.max_hops)
    if args.output == "json":
        print(json.dumps(blast_json(answer), indent=2))
    else:
        print(blast_table(answer), end="")
    return _answered(args, 0)


def route_json(route: Route) -> dict[str, Any]:
    out: dict[str, Any] = {"name": route.name}
    if route.name != "*":
        out["methods"] = list(route.methods) or ["*"]
        out["pathRegex"] = route.path_regex
        out["headers"] = dict(route.headers)
    return out


def route_text(route: Route) -> str:
    if route.name == "*":
        return "*"
    parts = [",".join(route.methods) or "*"]
    parts.append(route.path_regex or "/*")
    parts.extend(f"{k}~{v}" for k, v in route.headers)
    return f"{route.name} ({' '.join(parts)})"


def blast_json(answer: BlastRadius) -> dict[str, Any]:
    return {
        "identity": answer.identity,
        "reached": [
            {
                "hops": r.hops,
                "via": r.source,
                **_destination_json(r.destination),
                "route": route_json(r.route),
                "policy": _policy(r.policy),
            }
            for r in answer.reached
        ],
        "identities": [{"identity": i, "hops": h} for i, h in answer.identities],
    }


def blast_table(answer: BlastRadius) -> str:
    rows = [["HOPS", "SERVICE", "PORT", "ROUTE", "POLICY", "VIA", "AS"]]
    for r in answer.reached:
        rows.append([str(r.hops), _service(r.destination), _port(r.destination),
                     route_text(r.route), _policy(r.policy), r.source, r.destination.identity])
    direct = sum(1 for r in answer.reached if r.hops == 1)
    services = {(r.destination.namespace, r.destination.service) for r in answer.reached}
    summary = (
        f"{answer.identity} reaches {len(answer.reached)} (service, port, route) in "
        f"{len(services)} services ({direct} directly), through "
        f"{len(answer.identities) - 1} other identities\n"
    )
    return (render(rows) if answer.reached else "") + summary


# -- diff --------------------------------------------------------------------------------------


def _diff(args: argparse.Namespace) -> int:
    current = _file_resources(args.base) if args.base else _server_resources(args)
    changed = _file_resources(args.filename, current)
    from ubimesh.policy.questions import MeshPolicy, diff

    answer = diff(MeshPolicy(current), MeshPolicy(changed))
    if args.output == "json":
        print(json.dumps(diff_json(answer), indent=2))
    else:
        print(diff_table(answer), end="")
    code = 0
    if args.fail_on == "any" and answer.flips:
        code = EXIT_NO
    if args.fail_on == "new-allow" and answer.count("new-allow"):
        code = EXIT_NO
    return _answered(args, code)


def diff_json(answer: PolicyDiff) -> dict[str, Any]:
    return {
        "newAllow": answer.count("new-allow"),
        "newDeny": answer.count("new-deny"),
        "flips": [
            {
                "change": f.kind,
                "source": f.source,
                **_destination_json(f.destination),
                "route": route_json(f.route),
                "before": {"allowed": f.before, "policy": _policy(f.policy_before)},
                "after": {"allowed": f.after, "policy": _policy(f.policy_after)},
            }
            for f in answer.flips
        ],
    }


def _side(allowed: bool, policy: str) -> str:
    return f"allow ({_policy(policy)})" if allowed else "deny"


def diff_table(answer: PolicyDiff) -> str:
    rows = [["CHANGE", "SOURCE", "SERVICE", "PORT", "ROUTE", "BEFORE", "AFTER"]]
    for f in answer.flips:
        rows.append([f.kind, f.source, _service(f.destination), _port(f.destination),
                     route_text(f.route), _side(f.before, f.policy_before),
                     _side(f.after, f.policy_after)])
    summary = (
        f"{len(answer.flips)} decisions flip: {answer.count('new-allow')} new-allow, "
        f"{answer.count('new-deny')} new-deny\n"
    )
    return (render(rows) if answer.flips else "") + summary


def render(rows: Sequence[Sequence[str]]) -> str:
    """Rows (the first is the header) as aligned columns."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "".join(
        "   ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() + "\n"
        for row in rows
    )
