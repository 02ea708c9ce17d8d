"""What makes two vectors comparable.

Vectors from different providers, models, revisions, dimensions, normalisation
or chunk settings must never share a collection: their scores would be meaningless. The
fingerprint is stored with the collection, and a consumer whose fingerprint
differs refuses to start.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from embedstream.stream.errors import FingerprintMismatch

__all__ = ["Fingerprint"]


@dataclass(frozen=True, slots=True)
class Fingerprint:
    model: str
    revision: str
    dimension: int
    normalized: bool
    chunker: str
    # "local" (sentence-transformers in process) or "openai" (a remote API). A
    # collection made before this field existed reads as "local", which it was.
    provider: str = "local"
    # The prompt put in front of every document text embedded ("" for none): vectors
    # made with and without it are not comparable.
    prompt: str = ""
    # The document-level sparse vectors the collection holds: "none", or their spec
    # (e.g. "bm25(k=1.2,b=0.75,avg_len=256,language=english)"), see
    # :mod:`embedstream.stream.sparse`. A collection made before either field existed
    # reads as having neither, which it has not.
    sparse: str = "none"

    def to_json(self) -> str:
        data = asdict(self)
        # Fields at their default are written as before they existed: stored
        # fingerprints and rebuild checkpoints made without them stay byte-for-byte
        # the same.
        for name, default in (("provider", "local"), ("prompt", ""), ("sparse", "none")):
            if data[name] == default:
                del data[name]
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, raw: str) -> Fingerprint:
        data: dict[str, Any] = json.loads(raw)
        return cls(**data)

    def differences(self, stored: Fingerprint) -> list[str]:
        """Human-readable list of fields that differ, ``field: stored -> ours``."""
        ours, theirs = asdict(self), asdict(stored)
        return [
            f"{name}: {theirs[name]!r} (in the collection) != {ours[name]!r} (this consumer)"
            for name in ours
            if ours[name] != theirs[name]
        ]

    def require_compatible(self, stored: Fingerprint, collection: str) -> None:
        diffs = self.differences(stored)
        if diffs:
            raise FingerprintMismatch(
                f"collection {collection!r} holds vectors made under another fingerprint; "
                "refusing to mix them. Rebuild into a new collection, or point "
                "sink.collection elsewhere. Differences: " + "; ".join(diffs)
            )
