"""``ubimesh agent``: serve a workload identity to an Envoy on the same host over SDS.

``main.py`` calls :func:`add_commands` to register it and :func:`run` to dispatch. Exit codes:
0 stopped by a signal, 1 the identity could not be had or kept (token refused, certificate
expired, socket unusable), 2 usage.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import sys
from typing import Any

COMMANDS = ("agent",)


def _duration_seconds(text: str) -> float:
    """"60" (seconds), "60s", "5m", "1h", "250ms" -> seconds (for --bundle-refresh)."""
    from ubimesh.control.resources.scalars import parse_duration

    try:
        return float(text) if text.replace(".", "", 1).isdigit() else parse_duration(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration; expected e.g. 60s, 5m or 1h"
        ) from None


def add_commands(sub: Any) -> None:
    """Register ``agent`` on ``sub`` (argparse sub-parsers)."""
    agent = sub.add_parser(
        "agent",
        help="get and renew a workload certificate and serve it to a local Envoy over SDS",
        description="Get the workload's certificate from the control plane with a one-time "
        "join token, renew it at half-life, and serve the secrets `default` (certificate and "
        "key) and `ROOTCA` (trust bundle) over SDS on a Unix socket (mode 0600). The "
        "certificate and key are kept in --state-dir (0600) so that a restarted agent renews "
        "with them and needs no new join token; --memory-only keeps the key in memory only.",
    )
    agent.add_argument("--control", required=True, metavar="URL",
                       help="the control plane's API, e.g. http://127.0.0.1:15000")
    agent.add_argument("--join-token-file", default="", metavar="FILE",
                       help="file holding a token from `ubimesh token create --identity ID` "
                       "(needed unless --state-dir holds a valid credential)")
    agent.add_argument("--identity", required=True, metavar="ID",
                       help="the workload's SPIFFE ID, spiffe://TD/ns/NS/sa/SA (the token's)")
    agent.add_argument("--socket", required=True, metavar="PATH",
                       help="the Unix socket to serve SDS on (an Envoy cluster with "
                       "pipe: {path: PATH} and HTTP/2)")
    agent.add_argument("--cert-ttl", default="", metavar="DURATION",
                       help="certificate lifetime to ask for (e.g. 1h; default: the CA's)")
    agent.add_argument("--state-dir", default="", metavar="DIR",
                       help="where the credential is kept across restarts (default: "
                       "$XDG_STATE_HOME/ubimesh/agent/<identity>, ~/.local/state when unset)")
    agent.add_argument("--memory-only", action="store_true",
                       help="keep the key in memory only (a restart needs a new join token)")
    agent.add_argument("--bundle-refresh", type=_duration_seconds, default=60.0,
                       metavar="DURATION", help="how often to fetch the trust bundle again "
                       "(default 60s)")
    agent.add_argument("-l", "--log-level", default="info",
                       choices=["debug", "info", "warning", "error"])


def default_state_dir(identity: str) -> str:
    """``$XDG_STATE_HOME`` (or ``~/.local/state``) + ``/ubimesh/agent/<identity, made safe>``."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "state"
    )
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", identity.removeprefix("spiffe://")) or "_"
    return os.path.join(base, "ubimesh", "agent", safe)


def run(args: argparse.Namespace) -> int | None:
    """Run the sub-command if it is one of these; None otherwise."""
    if args.command not in COMMANDS:
        return None
    from ubimesh.agent import AgentOptions, serve

    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="[%(asctime)s][%(process)d][%(levelname)s][%(name)s] %(message)s",
    )
    if not args.identity.startswith("spiffe://"):
        print(f"ubimesh agent: --identity {args.identity!r}: expected a SPIFFE ID "
              "spiffe://TRUST_DOMAIN/ns/NAMESPACE/sa/SERVICE_ACCOUNT", file=sys.stderr)
        return 2
    if args.bundle_refresh <= 0:
        print(f"ubimesh agent: --bundle-refresh {args.bundle_refresh}: expected > 0",
              file=sys.stderr)
        return 2
    options = AgentOptions(
        control_api=args.control,
        join_token_file=args.join_token_file,
        identity=args.identity,
        socket_path=args.socket,
        cert_ttl=args.cert_ttl,
        bundle_refresh=args.bundle_refresh,
        state_dir="" if args.memory_only else (args.state_dir or default_state_dir(args.identity)),
    )
    try:
        return asyncio.run(serve(options))
    except ValueError as exc:
        print(f"ubimesh agent: {exc}", file=sys.stderr)
        return 1
