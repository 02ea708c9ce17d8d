"""Routes: which configured route a topic's messages belong to. Pure, no I/O.

A route (``routes:`` in the settings, or the one implicit route named
``default``) names its topics, or a ``topic_pattern`` that the consumer
subscribes to as Kafka does (librdkafka takes a name starting with ``^`` as a
regular expression and re-reads the topic list every
``topic.metadata.refresh.interval.ms``, so a topic created later is picked up).

:class:`TopicRouter` decides, the same way for the consumer, a rebuild and the
dead-letter commands:

* a topic a route names is that route's, whatever patterns also match it;
* else the first route, in configuration order, whose pattern matches it
  (``re.search`` on the subscribed pattern, which starts with ``^``);
* a dead-letter topic (``kafka.dlq_topic``, and any name ending ``.dlq``, the
  default names old and new) and Kafka's internal topics (``__*``) are never
  routed by a pattern: a pattern such as ``^db1\\.shop\\..*`` also matches
  ``db1.shop.items.dlq``, and reading dead letters back as changes would loop.

A message of a topic no route takes (only possible through a pattern) is
skipped with reason ``unrouted``, counted under the route label ``none``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from embedstream.stream._kafka_settings import subscription_pattern
from embedstream.stream._source_settings import UNROUTED_LABEL
from embedstream.stream.config import KafkaSettings, RouteSettings

__all__ = ["UNROUTED", "TopicRouter"]

UNROUTED = UNROUTED_LABEL  # the route label of messages no route takes


class TopicRouter:
    def __init__(self, routes: Sequence[RouteSettings], kafka: KafkaSettings) -> None:
        self._named = {topic: route for route in routes for topic in route.topics}
        self._patterns = [(re.compile(subscription_pattern(route.topic_pattern)), route)
                          for route in routes if route.topic_pattern is not None]
        self._dlq_topic = kafka.dlq_topic
        self._cache: dict[str, RouteSettings | None] = {}

    def subscription(self) -> list[str]:
        """What the consumer subscribes to: every named topic and every pattern."""
        return [*self._named, *(pattern.pattern for pattern, _ in self._patterns)]

    def route(self, topic: str) -> RouteSettings | None:
        """The route ``topic`` belongs to, or None (see the module docstring)."""
        if topic in self._cache:
            return self._cache[topic]
        found = self._named.get(topic)
        if found is None and not self._never_by_pattern(topic):
            found = next((route for pattern, route in self._patterns if pattern.search(topic)),
                         None)
        self._cache[topic] = found
        return found

    def topics_of(self, route: RouteSettings, existing: Iterable[str]) -> list[str]:
        """The topics of ``route`` among ``existing`` ones (a pattern resolved now),
        plus the ones it names."""
        matching = {t for t in existing if (found := self.route(t)) and found.name == route.name}
        return sorted({*route.topics, *matching})

    def _never_by_pattern(self, topic: str) -> bool:
        # Every *.dlq (the default names, old and per group, also beside a configured
        # kafka.dlq_topic), the configured one, and Kafka's internal topics.
        return topic.startswith("__") or topic.endswith(".dlq") or topic == self._dlq_topic
