"""``sink.index`` as Qdrant server settings: what a chunk collection is created and
updated with, and each search's parameters.

A server builds its indexes in its own process, so the Edge-sized defaults of the graph
and the optimizer (no graph, small segments: chosen so that an in-process optimization
step stays short) are not imposed on it: only the ``hnsw`` and ``optimizer`` fields a
config sets are sent, the rest is the server's (or the cluster's) own default.
Quantization, on-disk placement and the search parameters apply as set.
"""

from __future__ import annotations

from typing import Any

from qdrant_client import models

from embedstream.stream.config import IndexSettings, QuantizationSettings

__all__ = ["collection_params", "search_params"]

_OPTIMIZER_FIELDS = {"indexing_threshold_kb": "indexing_threshold",
                     "max_segment_size_kb": "max_segment_size",
                     "default_segment_number": "default_segment_number",
                     "deleted_threshold": "deleted_threshold",
                     "vacuum_min_vector_number": "vacuum_min_vector_number"}
_HNSW_FIELDS = {"m": "m", "ef_construct": "ef_construct",
                "full_scan_threshold_kb": "full_scan_threshold", "on_disk": "on_disk"}


def _quantization(settings: QuantizationSettings) -> Any:
    if settings.kind == "scalar":
        return models.ScalarQuantization(scalar=models.ScalarQuantizationConfig(
            type=models.ScalarType.INT8, quantile=settings.quantile,
            always_ram=settings.always_ram))
    if settings.kind == "binary":
        return models.BinaryQuantization(binary=models.BinaryQuantizationConfig(
            always_ram=settings.always_ram,
            encoding=models.BinaryQuantizationEncoding(settings.encoding.replace("-", "_")),
            # "scalar8" is the API's "scalar8bits"
            query_encoding=models.BinaryQuantizationQueryEncoding(
                settings.query_encoding + ("bits" if settings.query_encoding.startswith(
                    "scalar") else ""))))
    return None


def collection_params(index: IndexSettings) -> dict[str, Any]:
    """Keyword arguments of ``create_collection`` (and ``update_collection``) for the chunks."""
    hnsw = {target: getattr(index.hnsw, name) for name, target in _HNSW_FIELDS.items()
            if name in index.hnsw.model_fields_set}
    optimizer = {target: getattr(index.optimizer, name)
                 for name, target in _OPTIMIZER_FIELDS.items()
                 if name in index.optimizer.model_fields_set}
    return {
        "hnsw_config": models.HnswConfigDiff(**hnsw) if hnsw else None,
        "optimizers_config": models.OptimizersConfigDiff(**optimizer) if optimizer else None,
        "quantization_config": _quantization(index.quantization),
        "on_disk_payload": index.on_disk_payload,
    }


def search_params(index: IndexSettings) -> models.SearchParams:
    """What each search of the chunks asks for."""
    if index.exact:
        return models.SearchParams(exact=True)
    quantization = index.quantization
    return models.SearchParams(
        hnsw_ef=index.hnsw.ef,
        # "none" for a collection created quantized (settings apply at creation): skip it.
        quantization=models.QuantizationSearchParams(ignore=True) if quantization.kind == "none"
        else models.QuantizationSearchParams(rescore=quantization.rescore,
                                             oversampling=quantization.oversampling))
