"""The ``source`` section of the settings (how a topic's messages become documents)
and ``routes`` (many topics to many collections, each with its own ``source``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from embedstream.stream._kafka_settings import checked_pattern
from embedstream.stream._section import Section
from embedstream.stream.filters import FieldType
from embedstream.stream.names import ROUTE_NAME, checked_alias
from embedstream.stream.templates import template_parts

# The route label of messages no route takes (stream/routing.py), so no route's name.
UNROUTED_LABEL = "none"

__all__ = ["RESERVED_PAYLOAD_FIELDS", "ROUTE_NAME", "RouteSettings", "SourceSettings"]

# Payload keys embedstream writes itself; a metadata field may not shadow one.
RESERVED_PAYLOAD_FIELDS = frozenset(
    {"doc_id", "chunk_index", "text", "start", "end", "version", "content_hash"}
)

class SourceSettings(Section):
    # debezium: the change envelope; debezium-flat: rows flattened by Debezium's
    # ExtractNewRecordState (__deleted, __op, __lsn, __source_ts_ms); native.
    format: Literal["debezium", "debezium-flat", "native"] = "debezium"
    id_fields: tuple[str, ...] = ("id",)
    text_fields: tuple[str, ...] = ("name", "description")
    # Instead of text_fields: "{title}\n\n{body}", fields by name (absent or null: "").
    text_template: str | None = None
    metadata_fields: tuple[str, ...] = ()
    # Filterable fields and their types (keyword, integer, float, bool, datetime):
    # copied into the payload as that type, payload-indexed in the store, usable in
    # `search --filter` (see embedstream.stream.filters). Not in the fingerprint.
    filter_fields: dict[str, FieldType] = Field(default_factory=dict)
    version: Literal["auto", "lsn", "ts_ms", "offset"] = "auto"
    # How values (and keys) are serialised: auto tells a Schema Registry frame (magic
    # byte 0 + schema id: Avro, Protobuf, JSON Schema; read with kafka.schema_registry)
    # from JSON by its first byte; json: JSON only; schema-registry: framed only.
    encoding: Literal["auto", "json", "schema-registry"] = "auto"
    # A field holding the document's title: when set, each chunk is embedded with
    # the title in front of it (a contextual chunk header); the stored text, start
    # and end stay the document's own.
    title_field: str | None = None
    # Limits: a message or document over them is dead-lettered (reasons
    # `message_too_large`, `document_too_large`), never a crash.
    max_message_bytes: int = Field(default=32 * 1024 * 1024, ge=1)
    # About 250k tokens: embedding more on a CPU takes longer than
    # max.poll.interval.ms (300 s); raise it with a GPU.
    max_document_chars: int = Field(default=1_000_000, ge=1)

    @field_validator("text_template")
    @classmethod
    def _template(cls, template: str | None) -> str | None:
        if template is not None:
            template_parts(template)  # raises ValueError naming what is wrong
        return template

    @field_validator("id_fields", "text_fields")
    @classmethod
    def _not_empty(cls, fields: tuple[str, ...]) -> tuple[str, ...]:
        if not fields:
            raise ValueError("name at least one field")
        return fields

    @field_validator("metadata_fields", "filter_fields")
    @classmethod
    def _not_reserved(cls, fields: Any) -> Any:
        clash = sorted(set(fields) & RESERVED_PAYLOAD_FIELDS)
        if clash:
            raise ValueError(f"{clash} are payload fields embedstream writes itself")
        return fields


class RouteSettings(Section):
    """One route: the messages of ``topics`` (or of every topic matching
    ``topic_pattern``) read by ``source`` into ``collection`` (an alias, with its
    own fingerprint, state and handover). One consumer group serves every route."""

    name: str = Field(pattern=ROUTE_NAME)
    topics: tuple[str, ...] = ()
    topic_pattern: str | None = None
    source: SourceSettings = SourceSettings()
    collection: str

    _valid_collection = field_validator("collection")(checked_alias)
    _compiles = field_validator("topic_pattern")(checked_pattern)

    @model_validator(mode="after")
    def _topics_or_pattern(self) -> RouteSettings:
        if bool(self.topics) == (self.topic_pattern is not None):
            raise ValueError(f"route {self.name}: give topics or topic_pattern (one of them)")
        if any(not t for t in self.topics):
            raise ValueError(f"route {self.name}: a topic name is empty")
        return self


def check_routes(routes: tuple[RouteSettings, ...]) -> None:
    """Raise ValueError unless names and collections are unique and no topic is
    named by two routes (a topic a pattern also matches goes to the route naming it)."""
    if any(r.name == UNROUTED_LABEL for r in routes):
        raise ValueError(f"routes: the name {UNROUTED_LABEL!r} is kept for messages no route "
                         "takes (their metrics' route label)")
    for what, values in (("name", [r.name for r in routes]),
                         ("collection", [r.collection for r in routes])):
        twice = sorted({v for v in values if values.count(v) > 1})
        if twice:
            raise ValueError(f"routes: {what} {twice} given to more than one route")
    named: dict[str, str] = {}
    for route in routes:
        for topic in route.topics:
            if topic in named:
                raise ValueError(f"routes: topic {topic!r} is in routes {named[topic]} "
                                 f"and {route.name}")
            named[topic] = route.name
