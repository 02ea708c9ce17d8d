"""Filters as Qdrant Edge takes them: a document's chunks, and the user's search filters
(:mod:`embedstream.stream.filters`)."""

from __future__ import annotations

from typing import Any, cast

import numpy as np
import qdrant_edge as qe

from embedstream.stream.filters import Condition, Filter, Match

__all__ = ["chunk_filter", "edge_filter"]


def chunk_filter(doc_ids: list[str], from_index: int = 0) -> qe.Filter:
    """The chunks of ``doc_ids`` (at ``from_index`` or above)."""
    must: list[Any] = [qe.FieldCondition("doc_id", match=qe.MatchAny(doc_ids))]
    if from_index > 0:
        must.append(qe.FieldCondition("chunk_index", range=qe.RangeFloat(gte=from_index)))
    return qe.Filter(must=must)


def edge_filter(only: Filter) -> qe.Filter:
    """``only`` as a Qdrant Edge filter."""
    return qe.Filter(must=[_edge_condition(c) for c in only.must] or None,
                     must_not=[_edge_condition(c) for c in only.must_not] or None)


def _edge_condition(condition: Condition) -> qe.FieldCondition:
    if isinstance(condition, Match):
        value = condition.value
        # qdrant-edge-py 0.9 reads a Python bool as an integer (which matches no
        # stored bool); numpy's bool is read as a bool.
        return qe.FieldCondition(condition.field, match=qe.MatchValue(
            cast(bool, np.bool_(value)) if isinstance(value, bool) else value))
    bounds = {"gt": condition.gt, "gte": condition.gte, "lt": condition.lt,
              "lte": condition.lte}
    if condition.datetime:
        return qe.FieldCondition(condition.field, range=qe.RangeDateTime(
            **{k: None if v is None else str(v) for k, v in bounds.items()}))
    return qe.FieldCondition(condition.field, range=qe.RangeFloat(
        **{k: None if v is None else float(v) for k, v in bounds.items()}))
