"""The base of every section of the settings tree: frozen, unknown keys refused."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

__all__ = ["Section"]


class Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
