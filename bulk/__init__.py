"""Bulk rebuild of a whole collection (``embedstream rebuild``).

Not implemented yet: tracked as its own issue (bulk rebuild with a zero-gap
handover to the stream). The package exists so the layout is stable.
"""

__all__: list[str] = []
