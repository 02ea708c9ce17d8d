"""The ``sink.index`` section: how the chunk vectors are indexed and searched, and how the
consumer keeps a Qdrant Edge store optimized as it grows.

Both stores take the same settings. Qdrant Edge applies them to the chunk shard each
time it is opened: new segments follow them, and the search parameters apply at once,
but segments built before keep their old index until the optimizer rebuilds them, and
a change of graph or quantization makes it rebuild every one of them in one long run,
so change those with ``embedstream rebuild`` (which indexes its new collection before
the swap). A Qdrant server takes them when it creates a collection (the search
parameters at every search); for an existing one, a rebuild, or the server's own
``update_collection``. None of it is in the collection's fingerprint: the vectors are
the same whatever indexes them.

The defaults were chosen by ``bench/scale.py`` on real MiniLM embeddings (README,
"Scale"): at a million chunk points a binary-quantized scan with rescoring answered
within the search goal at recall@10 >= 0.95, and needs no graph, whose build held the
interpreter for seconds per segment (a graph, ``hnsw.m`` > 0, pays off on a server,
which builds it in its own process, or for a rebuild, which optimizes before it swaps).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from embedstream.stream._section import Section

__all__ = ["HnswSettings", "IndexSettings", "MaintenanceSettings", "OptimizerSettings",
           "QuantizationSettings"]


class HnswSettings(Section):
    """The graph. ``m`` 0 builds none: a segment is scanned, through its quantized
    vectors when there are. ``ef`` is the search beam (None: the store's default)."""

    m: int = Field(default=0, ge=0)
    ef_construct: int = Field(default=100, ge=4)
    # Segments with fewer vectors than this (in KB of vectors) are scanned, graph or not.
    full_scan_threshold_kb: int = Field(default=10_000, ge=0)
    on_disk: bool = False
    ef: int | None = Field(default=None, ge=1)


class QuantizationSettings(Section):
    """A compressed copy of the vectors that searches scan first. ``binary``: 1 bit per
    dimension (``encoding`` one-and-half-bits or two-bits keep more), the query compared
    as ``query_encoding`` says (scalar8: asymmetric, better recall, slower); ``scalar``:
    int8 per dimension (``quantile`` clips outliers). With ``rescore`` the best
    ``oversampling`` x limit candidates are scored again on the full vectors."""

    kind: Literal["none", "scalar", "binary"] = "binary"
    encoding: Literal["one-bit", "one-and-half-bits", "two-bits"] = "one-bit"
    query_encoding: Literal["default", "binary", "scalar4", "scalar8"] = "default"
    quantile: float = Field(default=0.99, gt=0.5, le=1.0)
    always_ram: bool = True
    rescore: bool = True
    oversampling: float = Field(default=4.0, ge=1.0)


class OptimizerSettings(Section):
    """Qdrant's optimizer. A segment is indexed (quantized, and given a graph when
    ``hnsw.m`` > 0) once it holds ``indexing_threshold_kb`` of vectors; segments are
    merged up to ``max_segment_size_kb`` (the size bounds how long one optimization step
    takes); one with ``deleted_threshold`` of its points deleted is vacuumed.
    ``default_segment_number`` 0: the store's choice (the CPU count)."""

    indexing_threshold_kb: int = Field(default=5_000, ge=0)
    max_segment_size_kb: int = Field(default=20_000, ge=1)
    default_segment_number: int = Field(default=0, ge=0)
    deleted_threshold: float = Field(default=0.2, gt=0, le=1)
    vacuum_min_vector_number: int = Field(default=1000, ge=0)


class MaintenanceSettings(Section):
    """Qdrant Edge only (a server optimizes by itself). The consumer runs the optimizer on
    the chunk shard between batches once ``every_points`` chunk points were written since
    its last run, so each run has that much new data to index (plus merges up to
    ``optimizer.max_segment_size_kb``): the step stays short however large the store
    grows. 0: never (the rebuild still optimizes its new collection before the swap)."""

    every_points: int = Field(default=5_000, ge=0)


class IndexSettings(Section):
    hnsw: HnswSettings = HnswSettings()
    quantization: QuantizationSettings = QuantizationSettings()
    optimizer: OptimizerSettings = OptimizerSettings()
    maintenance: MaintenanceSettings = MaintenanceSettings()
    # Full vectors and payload on disk (read through the page cache) instead of in RAM.
    on_disk_vectors: bool = False
    on_disk_payload: bool = True
    # Threads one search uses (Qdrant Edge); 0: the store's choice.
    search_threads: int = Field(default=0, ge=0)
    # Every search exact (full vectors, no graph or quantization): for checking recall.
    exact: bool = False
