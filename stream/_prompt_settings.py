"""The ``embed.prompts`` and ``embed.input_type`` sections: what tells documents from
queries when they are embedded (README, "Prompts")."""

from __future__ import annotations

from pydantic import Field, model_validator

from embedstream.stream._section import Section

__all__ = ["InputTypeSettings", "PromptSettings"]


class PromptSettings(Section):
    """Text put in front of every document (chunk) and every query before embedding,
    e.g. ``{document: "passage: ", query: "query: "}`` for e5 models. Unset (``None``):
    the model's own sentence-transformers prompts (``prompts``: ``document``, else
    ``passage``, else ``corpus`` for documents, ``query`` for queries; else the prompt
    ``default_prompt_name`` names; else nothing). ``""`` means no prompt, whatever the
    model says. A remote model has no such configuration: unset is nothing there."""

    document: str | None = None
    query: str | None = None


class InputTypeSettings(Section):
    """For ``provider: openai`` APIs that tell documents from queries by a field of the
    request instead of a prefix (Cohere ``input_type: search_document|search_query``,
    Voyage ``input_type: document|query``, Jina ``task: retrieval.passage|retrieval.query``):
    ``{key}: {document}`` goes in every document request's body, ``{key}: {query}`` in
    every query request's. Unset: no such field."""

    key: str = Field(default="input_type", min_length=1)
    document: str | None = None
    query: str | None = None

    @model_validator(mode="after")
    def _key_is_free(self) -> InputTypeSettings:
        if self.key in _REQUEST_FIELDS:
            raise ValueError(f"embed.input_type.key {self.key!r} is a field embedstream "
                             f"already sends ({', '.join(sorted(_REQUEST_FIELDS))})")
        return self


# The body fields every embeddings request carries (an input_type key must not clash).
_REQUEST_FIELDS = frozenset({"model", "input", "encoding_format", "dimensions"})
