"""The consumer's routes: for each, how its messages are read and where they go.

One consumer group serves every route; :class:`RouteSides` is the consumer's
table of them: it finds a message's route (by :class:`~embedstream.stream.routing.TopicRouter`'s
rules), watches each route for a source that only skips, keeps each route's
alias follower told about the partitions it owns, and has the dead-letter
topics of newly assigned topics made (a topic a pattern matches may be new).
It runs on the consumer's loop thread and starts nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass

from confluent_kafka import KafkaException

from embedstream.stream.config import Settings
from embedstream.stream.handover import AliasFollower
from embedstream.stream.metrics import Metrics
from embedstream.stream.registry import ValueReader
from embedstream.stream.routing import UNROUTED, TopicRouter
from embedstream.stream.skip_watch import SkipWatch
from embedstream.stream.store import Sink

__all__ = ["Route", "RouteSides"]

Partition = tuple[str, int]

log = logging.getLogger("embedstream.consumer")


@dataclass
class Route:
    """One route's side of the consumer."""

    settings: Settings  # narrowed to the route (Settings.for_route)
    sink: Sink  # replaced when the follower moves to a rebuild's collection
    reader: ValueReader | None = None  # framed (Schema Registry) values; None: JSON only
    follower: AliasFollower | None = None  # follows the route's alias to a rebuild
    skips: SkipWatch | None = None  # set by RouteSides

    @property
    def name(self) -> str:
        return self.settings.route_name()


class RouteSides:
    def __init__(self, routes: Sequence[Route], settings: Settings, metrics: Metrics,
                 ensure_dlq: Callable[[set[str]], None] | None = None) -> None:
        if not routes:
            raise ValueError("a consumer needs at least one route")
        self._by_name = {route.name: route for route in routes}
        self._router = TopicRouter([route.settings.all_routes()[0] for route in routes],
                                   settings.kafka)
        for route in routes:
            route.skips = SkipWatch(metrics, route.settings.source.format, route.name)
        # Messages of a topic no route takes (matched by no pattern any more).
        self.unrouted = SkipWatch(metrics, "-", UNROUTED)
        self._ensure_dlq = ensure_dlq
        self._dlq_ready: set[str] = set()

    def __iter__(self) -> Iterator[Route]:
        return iter(self._by_name.values())

    def __getitem__(self, name: str) -> Route:
        return self._by_name[name]

    def subscription(self) -> list[str]:
        return self._router.subscription()

    def of(self, topic: str) -> Route | None:
        """The route of ``topic``'s messages, or None when no route takes it."""
        found = self._router.route(topic)
        return None if found is None else self._by_name[found.name]

    def owned_by(self, route: Route, assigned: Collection[Partition]) -> set[Partition]:
        return {tp for tp in assigned if self.of(tp[0]) is route}

    def assigned(self, partitions: Collection[Partition]) -> None:
        """Tell each route's follower about its newly assigned partitions; have the
        dead-letter topics of their topics made (once each)."""
        for partition in partitions:
            route = self.of(partition[0])
            if route is not None and route.follower is not None:
                route.follower.on_assign([partition])
        new = {t for t, _ in partitions if t not in self._dlq_ready and self.of(t) is not None}
        if not new or self._ensure_dlq is None:
            return
        try:
            self._ensure_dlq(new)
            self._dlq_ready |= new
        except KafkaException as error:  # dead letters of these wait in the producer meanwhile
            log.warning("cannot create the dead-letter topics of %s yet: %s", sorted(new), error)

    def forget(self, partitions: Collection[Partition]) -> None:
        for route in self:
            if route.follower is not None:
                route.follower.forget(partitions)

    def close(self) -> None:
        for route in self:
            if route.follower is not None:
                route.follower.close()
