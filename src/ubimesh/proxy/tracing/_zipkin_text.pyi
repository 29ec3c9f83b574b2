"""Types of the C Zipkin span writer (_zipkin_text.c; its header comment is the contract)."""

class SpanText:
    def __init__(self, head: str, zone_part: str) -> None: ...
    def __call__(
        self,
        trace_id: str,
        span_id: str,
        parent_id: str,
        client: bool,
        shared: bool,
        start_us: int,
        duration_us: int,
        proto: str,
        host: str,
        path: str,
        method: str,
        downstream_cluster: str,
        user_agent: str,
        http10: bool,
        peer: str,
        request_id: str,
        client_trace_id: str,
        request_size: int,
        response_size: int,
        upstream: str,
        status: int,
        response_flags: str,
        name: str,
        /,
    ) -> bool: ...
    def raw(self, data: bytes, /) -> None: ...
    def body(self) -> bytes: ...
    def __len__(self) -> int: ...
