"""``sink.index`` as Qdrant Edge settings: the chunk shard's config and its search parameters.

Edge keeps a shard's stored setting wherever the config passed at load says None, so
every setting here is given explicitly; the exception is quantization: ``kind: none``
cannot remove the quantized copy of segments built before (searches then ignore it;
a rebuild drops it).

Only the chunk shard is indexed: the state shard is never optimized (an optimized
segment keeps replaced and deleted documents in the sparse IDF until it is vacuumed,
see :mod:`embedstream.stream.sparse`) and its dense vector is never searched.
"""

from __future__ import annotations

from typing import Any

import qdrant_edge as qe

from embedstream.stream.config import IndexSettings, QuantizationSettings

__all__ = ["chunk_config", "search_params"]

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
