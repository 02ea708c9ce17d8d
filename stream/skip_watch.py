"""Nothing silent: skipped messages are counted by reason, and a source that
only ever skips raises an alarm.

A well-formed message with no document change in it (a schema change, a
heartbeat, a transaction marker) is skipped, not an error. But a topic of
rows flattened by ExtractNewRecordState read with ``source.format: debezium``
is skipped whole: the index stays empty while the service looks healthy. So
once a route has read more than :data:`ONLY_SKIPPED_AFTER` messages since the
start and skipped every one, its :class:`SkipWatch` logs a warning (once) and
sets ``embedstream_source_only_skipped{route}`` to 1, until a message is not skipped.
"""

from __future__ import annotations

import logging

from embedstream.stream.events import Skipped
from embedstream.stream.metrics import Metrics

__all__ = ["ONLY_SKIPPED_AFTER", "SkipWatch"]

log = logging.getLogger("embedstream.consumer")

ONLY_SKIPPED_AFTER = 1_000


class SkipWatch:
    def __init__(self, metrics: Metrics, source_format: str, route: str,
                 threshold: int = ONLY_SKIPPED_AFTER) -> None:
        self._metrics = metrics
        self._format = source_format
        self._route = route
        metrics.only_skipped.labels(route=route).set(0)  # each route's series from the start
        self._threshold = threshold
        self._read = 0
        self._only_skipped = True
        self._warned = False

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

    def taken(self) -> None:
        """A message was not skipped (applied, stale or dead-lettered)."""
        self._read += 1
        if self._only_skipped:
            self._only_skipped = False
            self._metrics.only_skipped.labels(route=self._route).set(0)
