"""librdkafka's log lines, through logging (so as JSON, like every other line).

Every Kafka client embedstream makes gets ``logger=`` :func:`librdkafka_logger`;
librdkafka then queues its lines and the client's ``poll()`` hands them to the
logger (an admin client too, when polled). A broker that cannot be reached makes
librdkafka log a line per connection attempt (hundreds a minute): the filter
passes one line per client and kind (facility and text, times left out, e.g. the
``FAIL`` of ``127.0.0.1:9092/bootstrap``) per :data:`REPEAT_EVERY_S`, and the
next one it passes says how many it held back.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable

__all__ = ["REPEAT_EVERY_S", "RepeatFilter", "librdkafka_logger"]

REPEAT_EVERY_S = 10.0
LOGGER_NAME = "embedstream.librdkafka"


class RepeatFilter(logging.Filter):
    """Passes a librdkafka line unless one of the same kind from the same client
    thread passed less than ``every_s`` ago."""

    def __init__(self, every_s: float = REPEAT_EVERY_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self._every_s = every_s
        self._clock = clock
        self._last: dict[tuple[str, str], float] = {}
        self._held: dict[tuple[str, str], int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = _kind(record)
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self._every_s:
            self._held[key] = self._held.get(key, 0) + 1
            return False
        self._last[key] = now
        held = self._held.pop(key, 0)
        if held:
            record.msg = f"{record.getMessage()} ({held} more like it in the last " \
                         f"{self._every_s:.0f} s not shown)"
            record.args = ()
        return True


def _kind(record: logging.LogRecord) -> tuple[str, str]:
    """(facility, client and text) of a line confluent-kafka logs as ``"%s [%s] %s"``
    (facility, client name, text), with the times in the text left out: the same
    failure repeated (``... failed: Connection refused (after 0ms in state
    CONNECT)``) is one kind, distinct lines (a configuration dump) are not."""
    args = record.args if isinstance(record.args, tuple) else ()
    if len(args) == 3:
        facility, client, text = (str(a) for a in args)
        return facility, f"{client} {_TIMES.sub('', text)}"
    return "", record.getMessage()[:200]


_TIMES = re.compile(r"\d+(\.\d+)?\s*(ms|s)\b")


def librdkafka_logger() -> logging.Logger:
    """The logger every Kafka client is given, with one :class:`RepeatFilter`."""
    logger = logging.getLogger(LOGGER_NAME)
    if not any(isinstance(f, RepeatFilter) for f in logger.filters):
        logger.addFilter(RepeatFilter())
    return logger
