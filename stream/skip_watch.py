"""Nothing silent: skipped messages are counted by reason, and a source that
only ever skips raises an alarm; so do documents left without text.

A well-formed message with no document change in it (a schema change, a
heartbeat, a transaction marker) is skipped, not an error. But a topic of
rows flattened by ExtractNewRecordState read with ``source.format: debezium``
is skipped whole: the index stays empty while the service looks healthy. So
once a route has read more than :data:`ONLY_SKIPPED_AFTER` messages since the
start and skipped every one, its :class:`SkipWatch` logs a warning (once) and
sets ``embedstream_source_only_skipped{route}`` to 1, until a message is not skipped.

Likewise a route whose ``text_fields`` (or ``text_template``) name nothing the
rows hold: every upsert is "applied" and no chunk is ever made. Each upsert
with no text is counted in ``embedstream_empty_documents_total{reason="no_text"}``
and the first of each route logged at warning; once a route has taken more
than :data:`NO_CHUNKS_AFTER` upserts and none gave a chunk, a warning is logged
(once) and ``embedstream_route_without_chunks{route}`` is 1, until one does.
"""

from __future__ import annotations

import logging

from embedstream.stream.events import Op, Skipped
from embedstream.stream.metrics import Metrics
from embedstream.stream.plan import PreparedEvent

__all__ = ["NO_CHUNKS_AFTER", "ONLY_SKIPPED_AFTER", "SkipWatch"]

log = logging.getLogger("embedstream.consumer")

ONLY_SKIPPED_AFTER = 1_000
NO_CHUNKS_AFTER = 100


class SkipWatch:
    def __init__(self, metrics: Metrics, source_format: str, route: str,
                 threshold: int = ONLY_SKIPPED_AFTER) -> None:
        self._metrics = metrics
        self._format = source_format
        self._route = route
        # Each route's series from the start, so an alert can see them at 0.
        metrics.only_skipped.labels(route=route).set(0)
        metrics.no_chunks.labels(route=route).set(0)
        self._threshold = threshold
        self._read = 0
        self._only_skipped = True
        self._warned = False
        self._upserts = 0
        self._chunked = False
        self._told_no_text = False
        self._told_no_chunks = False

    def skipped(self, skipped: Skipped) -> None:
        """A message was skipped: count it, by reason too; watch for a source that only skips."""
        position = skipped.position
        self._metrics.events.labels(op="none", outcome="skipped", route=self._route).inc()
        self._metrics.skipped.labels(reason=skipped.reason, route=self._route).inc()
        log.debug("skipped %s[%d]@%d: %s", position.topic, position.partition, position.offset,
                  skipped.reason)
        self._read += 1
        if self._only_skipped and self._read > self._threshold and not self._warned:
            self._warned = True
            self._metrics.only_skipped.labels(route=self._route).set(1)
            log.warning(
                "route %s: all %d messages read since the start were skipped (last: %s, "
                "source.format %s): nothing is being indexed. Rows flattened by Debezium's "
                "ExtractNewRecordState need source.format: debezium-flat", self._route,
                self._read, skipped.reason, self._format)

    def taken(self, prepared: PreparedEvent | None = None) -> None:
        """A message was not skipped (``prepared``: its event, None when dead-lettered)."""
        self._read += 1
        if self._only_skipped:
            self._only_skipped = False
            self._metrics.only_skipped.labels(route=self._route).set(0)
        if prepared is not None and prepared.event.op is Op.UPSERT:
            self._upsert(prepared)

    def _upsert(self, prepared: PreparedEvent) -> None:
        self._upserts += 1
        if prepared.chunks:
            if not self._chunked:
                self._chunked = True
                self._metrics.no_chunks.labels(route=self._route).set(0)
            return
        if not prepared.event.text.strip():
            self._metrics.empty_documents.labels(reason="no_text", route=self._route).inc()
            if not self._told_no_text:
                self._told_no_text = True
                position = prepared.event.position
                log.warning("route %s: document %r (%s[%d]@%d) has no text: none of the "
                            "route's text fields (source.text_fields / text_template) holds "
                            "any; it is stored with no chunks (counted in "
                            "embedstream_empty_documents_total)", self._route,
                            prepared.event.doc_id[:100], position.topic, position.partition,
                            position.offset)
        if not self._chunked and self._upserts > NO_CHUNKS_AFTER and not self._told_no_chunks:
            self._told_no_chunks = True
            self._metrics.no_chunks.labels(route=self._route).set(1)
            log.warning("route %s: %d documents taken since the start and not one gave a "
                        "chunk: nothing is searchable. Check the route's source.text_fields "
                        "(or text_template) against the rows' fields", self._route,
                        self._upserts)
