"""The ``ubimesh`` command: sub-command dispatch."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from types import ModuleType

from ubimesh import __version__

#: The module of each sub-command that one lives in (``ubimesh.cli.<module>``, with
#: ``add_commands`` and ``run``; its ``COMMANDS`` lists the same names, a unit test checks).
#: A command is dispatched with only its own module imported: the others pull in asyncio,
#: the control plane's client and more, which a short command such as ``ubimesh policy``
#: would pay for at every start.
COMMAND_MODULES = {
    "control": "control_cmds",
    "apply": "control_cmds",
    "get": "control_cmds",
    "delete": "control_cmds",
    "diff": "control_cmds",
    "bootstrap": "control_cmds",
    "up": "control_cmds",
    "agent": "agent_cmds",
    "ca": "identity_cmds",
    "token": "identity_cmds",
    "certs": "identity_cmds",
    "policy": "policy_cmds",
    "collector": "collector_cmds",
    "top": "top_cmds",
    "traces": "trace_cmds",
    "trace": "trace_cmds",
}
#: Their order on ``ubimesh --help``.
_MODULE_ORDER = (
    "control_cmds",
    "agent_cmds",
    "identity_cmds",
    "policy_cmds",
    "collector_cmds",
    "top_cmds",
    "trace_cmds",
)


def _module(name: str) -> ModuleType:
    return importlib.import_module(f"ubimesh.cli.{name}")

#: Envoy's -l levels mapped onto Python logging levels.
LOG_LEVELS = {
    "trace": logging.DEBUG,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
    "off": logging.CRITICAL + 10,
}


def build_parser(modules: tuple[ModuleType, ...] | None = None) -> argparse.ArgumentParser:
    """The ``ubimesh`` parser: every command, or only those of ``modules`` (for dispatching
    one command; ``proxy`` and ``build-native`` are then left out)."""
    parser = argparse.ArgumentParser(prog="ubimesh", description="ubimesh service mesh")
    parser.add_argument("--version", action="version", version=f"ubimesh {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    if modules is not None:
        for module in modules:
            module.add_commands(sub)
        return parser

    proxy = sub.add_parser(
        "proxy",
        help="run the data-plane proxy from an Envoy v3 bootstrap",
        description="Run the ubimesh proxy. Flags follow Envoy's where they apply.",
    )
    proxy.add_argument("-c", "--config-path", required=True, help="Envoy v3 bootstrap (YAML/JSON)")
    proxy.add_argument(
        "--concurrency",
        type=int,
        default=1,
        help="worker processes sharing the listeners (default 1: a single process)",
    )
    proxy.add_argument("--service-node", default="", help="overrides node.id")
    proxy.add_argument("--service-cluster", default="", help="overrides node.cluster")
    proxy.add_argument(
        "-l",
        "--log-level",
        default="info",
        choices=sorted(LOG_LEVELS),
        help="log level (Envoy's names)",
    )
    proxy.add_argument(
        "--drain-time-s",
        type=float,
        default=5.0,
        help="how long connections may take to finish on shutdown or drain (seconds)",
    )
    proxy.add_argument(
        "--xds-cache-dir",
        default="",
        help="with ADS: where the last applied resources are cached, served at start when the "
        "control plane cannot be reached (default: $XDG_CACHE_HOME or ~/.cache, "
        "+ /ubimesh/xds/<node id>)",
    )
    proxy.add_argument(
        "--join-token-file",
        default="",
        help="with node metadata ubimesh.identity: a one-time join token for the proxy's first "
        "certificate (the key stays in memory: a restarted proxy needs a new token)",
    )
    proxy.add_argument(
        "--mode",
        choices=["serve", "validate"],
        default="serve",
        help="validate: check the configuration and exit (as envoy --mode validate)",
    )
    sub.add_parser(
        "build-native",
        help="compile the proxy's request path with mypyc (used when it matches the source)",
    )
    for name in _MODULE_ORDER:
        _module(name).add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    # The command first (no top-level flag before it): parse and run with its module only.
    # Anything else (--help, --version, proxy, a typo) gets the whole parser.
    name = COMMAND_MODULES.get(words[0]) if words else None
    if name is not None:
        module = _module(name)
        args = build_parser((module,)).parse_args(words)
        # Whether the command is the whole process (the console script, python -m), not a
        # call from Python: a command may then exit as soon as its output is out.
        args.own_process = argv is None
        code = module.run(args)
        return 2 if code is None else int(code)
    args = build_parser().parse_args(words)
    for name in _MODULE_ORDER:
        code = _module(name).run(args)
        if code is not None:
            return int(code)
    if args.command == "build-native":
        from ubimesh import native

        return native.main()
    if args.command == "proxy":
        logging.basicConfig(
            level=LOG_LEVELS[args.log_level],
            format="[%(asctime)s][%(process)d][%(levelname)s][%(name)s] %(message)s",
        )
        if args.mode == "serve":
            from ubimesh import native

            native.enable()
        from ubimesh.proxy.server import ProxyOptions

        options = ProxyOptions(
            config_path=args.config_path,
            concurrency=max(1, args.concurrency),
            service_node=args.service_node,
            service_cluster=args.service_cluster,
            log_level=args.log_level,
            drain_time_s=args.drain_time_s,
            xds_cache_dir=args.xds_cache_dir,
            join_token_file=args.join_token_file,
        )
        if args.mode == "validate":
            from ubimesh.proxy.app import load_snapshot
            from ubimesh.proxy.xds.errors import ConfigError

            try:
                load_snapshot(options)
            except ConfigError as exc:
                print(f"invalid configuration in {args.config_path}:\n{exc}", file=sys.stderr)
                return 1
            print(f"configuration '{args.config_path}' OK")
            return 0
        from ubimesh.proxy.app import run_proxy

        return run_proxy(options)
    return 2


if __name__ == "__main__":
    sys.exit(main())
