"""What a Qdrant Edge shard of the sink is made with, besides ``sink.index``.

* ``edge_config.json`` (:data:`EDGE_CONFIG`), in each shard's directory: where Edge
  keeps the shard's settings. A new shard's directory first gets one holding only the
  WAL options (:func:`write_wal_options`), which Edge then creates the shard with; a
  creation cut short leaves that file alone (an empty leftover, which ``open`` adopts),
  and :func:`written_sparse` reads what a leftover's file says of its sparse vector.
* The state shard's config (:func:`state_config`) and its points' vectors
  (:func:`state_vectors`, :func:`edge_sparse`). The chunk shard's config follows
  ``sink.index``: see :mod:`embedstream.sinks._edge_index`.
* The payload index types (:data:`PAYLOAD_SCHEMAS`), given to the fields of
  ``source.filter_fields``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import qdrant_edge as qe

from embedstream.sinks._layout import STATE_VECTOR, Schema
from embedstream.stream.sparse import SPARSE_NAME, SparseVector

__all__ = ["EDGE_CONFIG", "PAYLOAD_SCHEMAS", "WAL_OPTIONS", "edge_sparse", "state_config",
           "state_vectors", "write_wal_options", "written_sparse"]

EDGE_CONFIG = "edge_config.json"  # where Edge keeps a shard's settings
# The WAL of a new shard: 4 MiB segments, not Edge's 32 MiB. Edge keeps two open
# segments of full size (a sparse file where the filesystem allows it), so each
# shard reserved 64 MiB, 128 MiB a collection. Ingestion is as fast (README, "Disk");
# a write larger than a segment gets a segment of its own size.
WAL_OPTIONS = {"segment_capacity": 4 * 2**20, "segment_queue_len": 0, "retain_closed": 1}
PAYLOAD_SCHEMAS: dict[Schema, qe.PayloadSchemaType] = {
    "keyword": qe.PayloadSchemaType.Keyword, "integer": qe.PayloadSchemaType.Integer,
    "float": qe.PayloadSchemaType.Float, "bool": qe.PayloadSchemaType.Bool,
    "datetime": qe.PayloadSchemaType.Datetime}


def write_wal_options(directory: Path) -> None:
    """Make ``directory`` (and its parents) if missing, holding an ``edge_config.json``
    of the WAL options only, for a shard to be loaded there."""
    # EdgeShard.create takes no WAL options (Rust only), but a shard loaded
    # from a directory holding only edge_config.json is created with the
    # options written there (qdrant-edge-py 0.9). A crash before the load
    # leaves that file alone, which open adopts as an empty leftover.
    directory.mkdir(parents=True, exist_ok=True)
    config, written = directory / EDGE_CONFIG, directory / f".{EDGE_CONFIG}.tmp"
    written.write_text(json.dumps({"wal_options": WAL_OPTIONS}))
    os.replace(written, config)


def written_sparse(directory: Path) -> tuple[bool, bool] | None:
    """What the ``edge_config.json`` of ``directory`` says of the sparse vector: whether
    there is one, and whether it has the ``Idf`` modifier; ``None`` when the file holds
    only the WAL options (no shard was made yet)."""
    written = json.loads((directory / EDGE_CONFIG).read_text())
    found = (written.get("sparse_vectors") or {}).get(SPARSE_NAME)
    if "vectors" not in written:
        return None
    return found is not None, (found or {}).get("modifier") == "idf"


def state_config(size: int, sparse: bool, idf: bool) -> qe.EdgeConfig:
    """The state shard's config: the dense vector of ``size``, and with ``sparse`` the
    sparse one (with the ``Idf`` modifier: ``idf``)."""
    # The state's dense vectors are never searched: left on disk (Cold), not loaded
    # into memory at open, which on tmpfs filled a 32 MiB chunk file at every start.
    vectors = qe.EdgeVectorParams(size=size, distance=qe.Distance.Cosine, memory=qe.Memory.Cold)
    if sparse:
        return qe.EdgeConfig(vectors=vectors, sparse_vectors={
            SPARSE_NAME: qe.EdgeSparseVectorParams(modifier=qe.Modifier.Idf if idf else None)})
    return qe.EdgeConfig(vectors=vectors)


def edge_sparse(vector: SparseVector) -> qe.SparseVector:
    """``vector`` as Qdrant Edge's sparse vector."""
    return qe.SparseVector(indices=list(vector.indices), values=list(vector.values))


def state_vectors(sparse: SparseVector | None) -> Any:
    """A state point's vectors: the unused dense one, and the document's sparse one."""
    if sparse is None:
        return STATE_VECTOR
    return {"": STATE_VECTOR, SPARSE_NAME: edge_sparse(sparse)}
