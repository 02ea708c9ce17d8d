"""``sink.index`` as Qdrant Edge settings: the chunk shard's config, its search parameters
and, at each open, where its maintenance (``sink.index.maintenance``) starts from.

Edge keeps a shard's stored setting wherever the config passed at load says None, so
every setting here is given explicitly; the exception is quantization: ``kind: none``
cannot remove the quantized copy of segments built before (searches then ignore it;
a rebuild drops it).

Only the chunk shard is indexed: the state shard is never optimized (an optimized
segment keeps replaced and deleted documents in the sparse IDF until it is vacuumed,
see :mod:`embedstream.stream.sparse`) and its dense vector is never searched (its
config: :mod:`embedstream.sinks._edge_shards`).
"""

from __future__ import annotations

import logging
from typing import Any

import qdrant_edge as qe

from embedstream.stream.config import IndexSettings, QuantizationSettings

__all__ = ["chunk_config", "maintenance_at_open", "search_params"]

log = logging.getLogger("embedstream.sinks")

_ENCODINGS = {"one-bit": "OneBit", "one-and-half-bits": "OneAndHalfBits", "two-bits": "TwoBits"}
_QUERY_ENCODINGS = {"default": "Default", "binary": "Binary", "scalar4": "Scalar4Bits",
                    "scalar8": "Scalar8Bits"}


def _quantization(settings: QuantizationSettings) -> Any:
    if settings.kind == "scalar":
        return qe.ScalarQuantizationConfig(type=qe.ScalarType.Int8, quantile=settings.quantile,
                                           always_ram=settings.always_ram)
    if settings.kind == "binary":
        return qe.BinaryQuantizationConfig(
            always_ram=settings.always_ram,
            encoding=getattr(qe.BinaryQuantizationEncoding, _ENCODINGS[settings.encoding]),
            query_encoding=getattr(qe.BinaryQuantizationQueryEncoding,
                                   _QUERY_ENCODINGS[settings.query_encoding]))
    return None


def chunk_config(size: int, index: IndexSettings) -> qe.EdgeConfig:
    """The chunk shard's config: cosine vectors of ``size`` indexed as ``index`` says."""
    hnsw, optimizer = index.hnsw, index.optimizer
    return qe.EdgeConfig(
        vectors=qe.EdgeVectorParams(size=size, distance=qe.Distance.Cosine,
                                    on_disk=index.on_disk_vectors,
                                    quantization_config=_quantization(index.quantization)),
        on_disk_payload=index.on_disk_payload,
        hnsw_config=qe.HnswIndexConfig(m=hnsw.m, ef_construct=hnsw.ef_construct,
                                       full_scan_threshold=hnsw.full_scan_threshold_kb,
                                       on_disk=hnsw.on_disk),
        optimizers=qe.EdgeOptimizersConfig(
            indexing_threshold=optimizer.indexing_threshold_kb,
            max_segment_size=optimizer.max_segment_size_kb,
            default_segment_number=optimizer.default_segment_number,  # 0: auto
            deleted_threshold=optimizer.deleted_threshold,
            vacuum_min_vector_number=optimizer.vacuum_min_vector_number),
        max_search_threads=index.search_threads or None)


def search_params(index: IndexSettings) -> qe.SearchParams:
    """What each search of the chunks asks for."""
    if index.exact:
        return qe.SearchParams(exact=True)
    quantization = index.quantization
    return qe.SearchParams(
        hnsw_ef=index.hnsw.ef,
        # "none" on a shard quantized before: its segments keep their quantized copy
        # until rebuilt (Edge keeps a setting given as None), so searches skip it.
        quantization=qe.QuantizationSearchParams(ignore=True) if quantization.kind == "none"
        else qe.QuantizationSearchParams(rescore=quantization.rescore,
                                         oversampling=quantization.oversampling))


def maintenance_at_open(shard: qe.EdgeShard, index: IndexSettings,
                        where: str) -> tuple[int, bool] | None:
    """Where maintenance of the chunk shard ``shard``, just opened, starts from: the chunk
    points to count as written since the last run, and whether maintenance is held
    (``where`` names the shard in the warning then logged); ``None`` when nothing is
    ever indexed.

    What the next maintenance run has to index: the points left unindexed
    before this open. Many of them (a store grown before ``sink.index``) would make
    one run hold the loop for minutes, so maintenance is then left to a rebuild.
    Otherwise a run is due at once: the first after an open also tidies what a
    crash left (optimizations cut short by a SIGKILL: seconds at 1M points, see
    ``open_maintain_ms`` in bench/scale.py), and the consumer makes it before
    joining its group, where it holds up no partition. (A collection the consumer switches
    to after a rebuild is opened in the loop; the rebuild maintained it fully, so
    its first run is short.)"""
    every = index.maintenance.every_points
    if every <= 0 or (index.quantization.kind == "none" and index.hnsw.m == 0):
        return None  # nothing is ever indexed: the count says nothing
    info = shard.info()
    unindexed = max(0, info.points_count - info.indexed_vectors_count)
    held = unindexed > 2 * every
    if held:
        log.warning(
            "%s: %d of its %d chunk points are not indexed (a store grown before "
            "sink.index, or written with maintenance off): indexing them in the "
            "consumer's loop would hold it for long, so it is not maintained; "
            "`embedstream rebuild` makes an indexed copy", where,
            unindexed, info.points_count)
    return max(unindexed, every), held
