"""The ``ubimesh`` command: sub-command dispatch."""

from __future__ import annotations

import argparse
import logging
import sys

from ubimesh import __version__
from ubimesh.cli import (
    agent_cmds,
    collector_cmds,
    control_cmds,
    identity_cmds,
    policy_cmds,
    top_cmds,
    trace_cmds,
)

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ubimesh", description="ubimesh service mesh")
    parser.add_argument("--version", action="version", version=f"ubimesh {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

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
    control_cmds.add_commands(sub)
    agent_cmds.add_commands(sub)
    identity_cmds.add_commands(sub)
    policy_cmds.add_commands(sub)
    collector_cmds.add_commands(sub)
    top_cmds.add_commands(sub)
    trace_cmds.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code = control_cmds.run(args)
    if code is None:
        code = agent_cmds.run(args)
    if code is None:
        code = identity_cmds.run(args)
    if code is None:
        code = policy_cmds.run(args)
    if code is None:
        code = collector_cmds.run(args)
    if code is None:
        code = top_cmds.run(args)
    if code is None:
        code = trace_cmds.run(args)
    if code is not None:
        return code
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
