"""What the exporter queues: a batch of finished spans bound for one POST to a collector.

A provider's encoder subclasses ``SpanBatch`` (``zipkin.ZipkinBatch``, ``otlp.OtlpBatch``):
spans are added as they finish, until the batch holds the exporter's batch size or its flush
timer fires, then ``body`` makes the POST's body, once. An encoder may write each span as it
is added (Zipkin's, while the span's values are still in the caches) or keep the spans and
write them in ``body`` (OTLP's).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ubimesh.proxy.tracing.span import Span


class SpanBatch:
    """Finished spans bound for one POST; ``count`` of them added so far. By default a batch
    keeps its spans (``spans``) for ``body`` to write."""

    __slots__ = ("count", "spans")

    def __init__(self) -> None:
        self.count = 0
        self.spans: list[Span] = []

    def add(self, span: Span) -> None:
        """Add one finished span (never blocks; an encoder may write it into the body now
        instead of keeping it)."""
        self.count += 1
        self.spans.append(span)

    def body(self) -> bytes:
        """The POST's body for the spans added; called once, when the batch is sent."""
        raise NotImplementedError
