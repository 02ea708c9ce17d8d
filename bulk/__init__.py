"""Bulk rebuild of a whole collection (``embedstream rebuild``) and its sizing
(``embedstream plan``).

:func:`embedstream.bulk.rebuild.rebuild` embeds a corpus (files, or the Kafka
topics from their start) into a fresh physical collection at large batch sizes,
checkpointing as it goes so a rerun resumes, then catches up with the stream and
switches the alias, handing over to the live consumer at recorded offsets with
no gap. It uses the core (:mod:`embedstream.stream`) and the stores
(:mod:`embedstream.sinks`), never the application layer.
"""

__all__: list[str] = []
