"""The control plane's sub-commands: control, apply, get, delete, diff, bootstrap, up.

``main.py`` calls :func:`add_commands` to register them and :func:`run` to dispatch. Exit
codes: 0 ok, 1 validation, conflict or server errors (each on its own line on stderr; ``diff``
also exits 1 when there are differences, as kubectl diff does), 2 usage.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ubimesh.control.api_error import ApiError
from ubimesh.control.client import DEFAULT_SERVER, Client, resolve_token

COMMANDS = ("control", "apply", "get", "delete", "diff", "bootstrap", "up")


def _client_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--server",
        default=os.environ.get("UBIMESH_SERVER", DEFAULT_SERVER),
        help=f"control plane API URL (default $UBIMESH_SERVER or {DEFAULT_SERVER})",
    )
    parser.add_argument("--token", help="admin token (default $UBIMESH_TOKEN)")
    parser.add_argument(
        "--token-file",
        help="file holding the admin token (default $UBIMESH_TOKEN_FILE, then the default "
        "data dir's admin-token)",
    )


def _collector_flags(parser: argparse.ArgumentParser) -> None:
    """The built-in trace collector's flags (``control`` and ``up``; docs/control-plane.md)."""
    parser.add_argument("--collector", action=argparse.BooleanOptionalAction, default=True,
                        help="run the trace collector that proxies send spans to (default on; "
                        "--no-collector: the Mesh's builtin tracing provider traces nothing)")
    parser.add_argument("--collector-address", default="", metavar="HOST:PORT",
                        help="serve the collector on its own listener (e.g. 127.0.0.1:9411, "
                        "Zipkin's port) instead of on the API's")
    parser.add_argument("--collector-retention", default="24h",
                        help="delete spans older than this (e.g. 24h, 30m, 7d; 0: no age limit)")
    parser.add_argument("--collector-max-spans", type=int, default=0,
                        help="keep at most this many spans, the oldest go first (0: no limit)")
    parser.add_argument("--collector-open-query", action="store_true",
                        help="answer the collector's query API without the admin token (for "
                        "Zipkin's UI or Grafana on a trusted network)")


def collector_argv(args: argparse.Namespace) -> list[str]:
    """The collector flags of ``args`` as ``ubimesh control`` arguments (for ``up``)."""
    argv = ["--collector" if args.collector else "--no-collector",
            "--collector-retention", args.collector_retention,
            "--collector-max-spans", str(args.collector_max_spans)]
    if args.collector_address:
        argv += ["--collector-address", args.collector_address]
    if args.collector_open_query:
        argv.append("--collector-open-query")
    return argv


def _files_flag(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument(
        "-f", "--filename", action="append", required=required, default=None, metavar="FILE",
        help="resource file (YAML, several documents); repeatable; - reads stdin",
    )


def add_commands(sub: Any) -> None:
    """Register the control plane's sub-commands on ``sub`` (argparse sub-parsers)."""
    control = sub.add_parser("control", help="run the control plane (API + ADS)")
    control.add_argument("--store", default="",
                         help="sqlite:///PATH or etcd://HOST:PORT[,...] (default SQLite in "
                         "the data dir)")
    control.add_argument("--data-dir", default="", help="where the store, token and "
                         "control.json live (default ~/.local/share/ubimesh)")
    control.add_argument("--api-address", default="127.0.0.1:15000", help="HOST:PORT (0: any)")
    control.add_argument("--xds-address", default="127.0.0.1:15010", help="HOST:PORT (0: any)")
    control.add_argument("--token-file", default=None, help="read the admin token from here")
    control.add_argument("--trust-domain", default="",
                         help="the CA's trust domain when it is created at first start "
                         "(default: the Mesh's trustDomain, else cluster.local)")
    control.add_argument("--ca-dir", default="",
                         help="the CA's directory (default <data dir>/ca); replicas sharing "
                         "a store give the same shared directory to sign from one CA")
    control.add_argument("--registration-grace", type=float, default=5.0,
                         help="seconds a disconnected proxy's workload is kept (default 5)")
    _collector_flags(control)
    control.add_argument("-l", "--log-level", default="info",
                         choices=["debug", "info", "warning", "error"])

    apply = sub.add_parser("apply", help="create or update resources from files")
    _files_flag(apply, True)
    apply.add_argument("--dry-run", action="store_true", help="validate and show what changes")
    apply.add_argument("--local", action="store_true",
                       help="with --dry-run: validate the files alone, without a server")
    _client_flags(apply)

    get = sub.add_parser("get", help="list resources, or show one")
    get.add_argument("kind", help="kind: service(s), svc, workload(s), gateway(s), ...")
    get.add_argument("name", nargs="?", help="one resource's name")
    get.add_argument("-n", "--namespace", default=None,
                     help="namespace (default: all when listing, 'default' for one)")
    get.add_argument("-o", "--output", choices=["table", "yaml", "json"], default="table")
    _client_flags(get)

    delete = sub.add_parser("delete", help="delete resources")
    delete.add_argument("kind", nargs="?")
    delete.add_argument("name", nargs="?")
    delete.add_argument("-n", "--namespace", default="default")
    _files_flag(delete, False)
    _client_flags(delete)

    diff = sub.add_parser("diff", help="show what apply would change (exit 1 if anything)")
    _files_flag(diff, True)
    _client_flags(diff)

    boot = sub.add_parser("bootstrap", help="print a proxy bootstrap that uses the control plane")
    boot.add_argument("--node", required=True, help="node id NAME.NAMESPACE")
    boot.add_argument("--role", choices=["sidecar", "gateway"], default="sidecar")
    boot.add_argument("--xds", action="append", default=None, metavar="HOST:PORT",
                      help="control plane xDS address; repeatable (default 127.0.0.1:15010)")
    boot.add_argument("--admin-port", type=int, default=None)
    boot.add_argument("--workload", default=None,
                      help="Workload spec (JSON or YAML) the proxy registers while connected")
    boot.add_argument("--identity", default=None, metavar="SPIFFE_ID",
                      help="the proxy's identity (spiffe://TD/ns/NS/sa/SA); with --control-api "
                      "and --join-token-file the proxy gets its certificate from the CA (needed "
                      "when the Mesh's mtls.mode is STRICT or PERMISSIVE, the default STRICT)")
    boot.add_argument("--control-api", default=None, metavar="URL",
                      help="the control plane's API, e.g. http://127.0.0.1:15000")
    boot.add_argument("--join-token-file", default=None, metavar="FILE",
                      help="file holding a token from `ubimesh token create --identity ID`")
    boot.add_argument("-o", "--output", default="-", help="file to write (default stdout)")

    up = sub.add_parser("up", help="run a whole local mesh from one file")
    up.add_argument("-f", "--filename", action="append", required=True, metavar="FILE")
    up.add_argument("--data-dir", default="", help="logs, store, bootstraps (default: temp dir)")
    up.add_argument("--api-address", default="127.0.0.1:15000")
    up.add_argument("--xds-address", default="127.0.0.1:15010")
    up.add_argument("--ready-timeout", type=float, default=30.0)
    up.add_argument("--seconds", type=float, default=None,
                    help="stop after this many seconds (default: run until Ctrl-C)")
    _collector_flags(up)


def run(args: argparse.Namespace) -> int | None:
    """Run the sub-command if it is one of these; None otherwise."""
    command = args.command
    if command not in COMMANDS:
        return None
    try:
        if command == "control":
            return _control(args)
        if command == "bootstrap":
            return _bootstrap(args)
        if command == "up":
            from ubimesh.control.up import run_up

            return run_up(args)
        if command == "apply":
            return _apply(args)
        if command == "get":
            return _get(args)
        if command == "delete":
            return _delete(args)
        if command == "diff":
            return _diff(args)
    except ApiError as exc:
        _errors(exc.lines())
        return 1
    return None


def _errors(lines: Sequence[str]) -> None:
    for line in lines:
        print(f"error: {line}", file=sys.stderr)


def _usage(message: str) -> int:
    print(f"ubimesh: {message}", file=sys.stderr)
    return 2


def _default_token_file() -> Path:
    from ubimesh.control.server import TOKEN_FILE, default_data_dir

    return default_data_dir() / TOKEN_FILE


def _client(args: argparse.Namespace) -> Client:
    token = resolve_token(args.token, args.token_file, _default_token_file())
    return Client(args.server, token)


def _read_files(names: Sequence[str]) -> list[tuple[str, str]]:
    files = []
    for name in names:
        if name == "-":
            files.append(("<stdin>", sys.stdin.read()))
            continue
        try:
            files.append((name, Path(name).read_text()))
        except OSError as exc:
            raise ApiError(0, f"{name}: {exc.strerror}") from None
        except UnicodeDecodeError as exc:
            raise ApiError(0, f"{name}: not UTF-8 text ({exc})") from None
    return files


def _local_resources(files: Sequence[tuple[str, str]]) -> list[Any]:
    """Parse and validate ``files`` together, offline; ApiError listing every problem."""
    from ubimesh.control.resources import ResourceErrors, parse_documents, validate_set

    resources: list[Any] = []
    errors: list[Any] = []
    for name, text in files:
        try:
            resources.extend(parse_documents(text, name))
        except ResourceErrors as exc:
            errors.extend(exc.errors)
    if not errors:
        try:
            validate_set(resources)
        except ResourceErrors as exc:
            errors.extend(exc.errors)
    if errors:
        raise ApiError(0, f"{len(errors)} validation error(s)", [str(e) for e in errors])
    return resources


def _ref(kind: str, name: str) -> str:
    return f"{kind.lower()}/{name}"


def _apply(args: argparse.Namespace) -> int:
    if args.local and not args.dry_run:
        return _usage("apply: --local only works with --dry-run (a real apply needs a server)")
    files = _read_files(args.filename)
    if args.local:
        for r in _local_resources(files):
            where = f" -n {r.namespace}" if r.namespace else ""
            print(f"{_ref(r.kind, r.name)}{where} valid (dry run, local)")
        return 0
    answer = _client(args).apply(files, dry_run=args.dry_run)
    suffix = " (dry run)" if args.dry_run else ""
    for result in answer["results"]:
        where = f" -n {result['namespace']}" if result["namespace"] else ""
        print(f"{_ref(result['kind'], result['name'])}{where} {result['action']}{suffix}")
    return 0


def _diff(args: argparse.Namespace) -> int:
    answer = _client(args).diff(_read_files(args.filename))
    for result in answer["results"]:
        if result["diff"]:
            sys.stdout.write(result["diff"])
    return 1 if answer["changed"] else 0


def _delete(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.filename:
        if args.kind or args.name:
            return _usage("delete: give either KIND NAME or -f FILE, not both")
        keys = [
            {"kind": r.kind, "namespace": r.namespace, "name": r.name}
            for r in _local_resources(_read_files(args.filename))
        ]
        answer = client.delete_many(keys)
        for key in answer["deleted"]:
            print(f"{_ref(key['kind'], key['name'])} deleted")
        for missing in answer["missing"]:
            print(f"{missing} not found (already deleted)")
        return 0
    if not args.kind or not args.name:
        return _usage("delete: give KIND NAME [-n NAMESPACE], or -f FILE")
    answer = client.delete(args.kind, args.namespace, args.name)
    for key in answer["deleted"]:
        print(f"{_ref(key['kind'], key['name'])} deleted")
    return 0


def _get(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.name:
        items = [client.get(args.kind, args.namespace or "default", args.name)]
    else:
        items = client.list(args.kind, args.namespace)
    if args.output == "json":
        data: Any = items[0] if args.name else {"kind": "List", "items": items}
        print(json.dumps(data, indent=2))
    elif args.output == "yaml":
        import yaml

        print(yaml.safe_dump_all(items, sort_keys=False), end="")
    else:
        from ubimesh.cli.table import render_table

        if not items:
            print("No resources found.", file=sys.stderr)
        else:
            print(render_table(items), end="")
    return 0


def _bootstrap(args: argparse.Namespace) -> int:
    import yaml

    from ubimesh.control.bootstrap import build_bootstrap, parse_address

    try:
        xds = [parse_address(a, what="--xds") for a in (args.xds or ["127.0.0.1:15010"])]
        workload = None
        if args.workload is not None:
            workload = yaml.safe_load(args.workload)
            if not isinstance(workload, dict):
                return _usage(f"--workload: {args.workload!r} is not a mapping (a Workload spec)")
        bootstrap = build_bootstrap(node_id=args.node, xds=xds, role=args.role,
                                    admin_port=args.admin_port, workload=workload,
                                    identity=args.identity, control_api=args.control_api,
                                    join_token_file=args.join_token_file)
    except (ValueError, yaml.YAMLError) as exc:
        return _usage(str(exc))
    text = yaml.safe_dump(bootstrap, sort_keys=False)
    if args.output == "-":
        sys.stdout.write(text)
    else:
        Path(args.output).write_text(text)
    return 0


def _retention(text: str) -> float:
    from ubimesh.collector.server import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise ValueError(f"--collector-retention: {exc}") from None


def _control(args: argparse.Namespace) -> int:
    from ubimesh.control.bootstrap import parse_address
    from ubimesh.control.server import ControlOptions, default_data_dir, serve

    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="[%(asctime)s][%(process)d][%(levelname)s][%(name)s] %(message)s",
    )
    try:
        options = ControlOptions(
            data_dir=Path(args.data_dir).absolute() if args.data_dir else default_data_dir(),
            store_url=args.store,
            api_address=parse_address(args.api_address, what="--api-address"),
            xds_address=parse_address(args.xds_address, what="--xds-address"),
            token_file=Path(args.token_file) if args.token_file else None,
            grace=args.registration_grace,
            trust_domain=args.trust_domain,
            ca_dir=Path(args.ca_dir) if args.ca_dir else None,
            collector=args.collector,
            collector_address=(parse_address(args.collector_address, what="--collector-address")
                               if args.collector_address else None),
            collector_retention_s=_retention(args.collector_retention),
            collector_max_spans=args.collector_max_spans,
            collector_open_query=args.collector_open_query,
        )
        if args.collector_max_spans < 0:
            raise ValueError("--collector-max-spans must not be negative")
    except ValueError as exc:
        return _usage(str(exc))
    import asyncio  # only here: every `ubimesh policy` command imports this module

    try:
        return asyncio.run(serve(options))
    except (ValueError, OSError) as exc:
        print(f"ubimesh control: {exc}", file=sys.stderr)
        return 1
