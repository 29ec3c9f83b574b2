"""Types of the C text-line renderer (_textline.c; its header comment is the contract)."""

from collections.abc import Sequence

N_ARGS: int

class Program:
    def __init__(self, ops: Sequence[tuple[object, ...]]) -> None: ...
    def __call__(
        self,
        out: list[str],
        start_time: float,
        method: str,
        path: str,
        authority: str,
        protocol: str,
        upstream_host: str,
        details: str,
        termination_details: str,
        upstream_cluster: str,
        route_name: str,
        peer_uri_san: str,
        sni: str,
        status: int,
        duration_ms: int,
        bytes_received: int,
        bytes_sent: int,
        flags: str,
        http: bool,
        request_items: list[tuple[str, str]] | None,
        response_items: list[tuple[str, str]] | None,
        /,
    ) -> bool: ...
