"""Secret values: refused when unusable, kept out of error messages and log lines.

:func:`secret_problem` says why a secret cannot be used (a control character,
most often the trailing newline of a copied Kubernetes secret), never quoting it;
the settings refuse such values when they load.

The settings hold secrets as ``SecretStr`` (no repr shows them), but a library's
error can still quote one: an HTTP client naming a header value it refused, a
provider echoing the ``Authorization`` header in its error text. A
:class:`Redactor` replaces every known secret with ``***`` in any text, in the
forms it takes in such messages (as is, escaped in a ``bytes`` repr, in JSON,
URL-quoted). :class:`RedactingFilter` applies one to every log record a handler
emits, message and traceback alike; :func:`settings_secrets` finds the secrets
of a settings tree.

Guaranteed: a secret registered before a text passes through is not in the
output in any of those forms. Not guaranteed: a fragment of a secret (a message
cut before it passes here), or a secret encoded otherwise (base64, hashed).
"""

from __future__ import annotations

import json
import logging
import urllib.parse
from collections.abc import Iterable

from pydantic import BaseModel, SecretStr

__all__ = ["MASK", "RedactingFilter", "Redactor", "checked_header_secret", "checked_secret",
           "secret_problem", "settings_secrets"]

MASK = "***"


def secret_problem(secret: str, http_header: bool = False) -> str | None:
    """Why ``secret`` cannot be used, never quoting it (errors and logs would show it)."""
    if any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in secret):
        # Most often a trailing newline, copied in with the value (Kubernetes secrets).
        return ("contains a control character (a trailing newline?); "
                "the value is not shown")
    if http_header and not secret.isascii():
        return "contains non-ASCII characters, which an HTTP header cannot carry"
    return None


def checked_secret(secret: SecretStr | None, http_header: bool = False) -> SecretStr | None:
    """``secret``, or ValueError (a pydantic validator's) saying why it cannot be used."""
    problem = secret and secret_problem(secret.get_secret_value(), http_header)
    if problem:
        raise ValueError(problem)
    return secret


def checked_header_secret(secret: SecretStr | None) -> SecretStr | None:
    """:func:`checked_secret` for a value sent in an HTTP header."""
    return checked_secret(secret, http_header=True)


def _forms(secret: str) -> set[str]:
    """The ways ``secret`` shows up in messages: itself, inside a bytes repr
    (``b'Bearer sk-...\\n'``), a JSON string, a URL."""
    return {secret, repr(secret.encode())[2:-1], json.dumps(secret)[1:-1],
            urllib.parse.quote(secret, safe=""), urllib.parse.quote_plus(secret)}


class Redactor:
    """Replaces the secrets it was given with :data:`MASK` (a callable: text -> text).

    Secrets can be added later (the command line learns them once the settings
    load, after its log handler exists)."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._forms: list[str] = []
        self.add(secrets)

    def add(self, secrets: Iterable[str]) -> None:
        forms = set(self._forms)
        for secret in secrets:
            if secret:
                forms |= _forms(secret)
        forms.discard("")
        # Longest first: a secret that contains another is masked whole.
        self._forms = sorted(forms, key=len, reverse=True)

    def __bool__(self) -> bool:
        return bool(self._forms)

    def __call__(self, text: str) -> str:
        for form in self._forms:
            if form in text:
                text = text.replace(form, MASK)
        return text


def settings_secrets(settings: BaseModel) -> list[str]:
    """Every ``SecretStr`` value in a settings tree (sections, dicts, tuples)."""
    found: list[str] = []

    def walk(value: object) -> None:
        if isinstance(value, SecretStr):
            found.append(value.get_secret_value())
        elif isinstance(value, BaseModel):
            for name in type(value).model_fields:
                walk(getattr(value, name))
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, list | tuple):
            for item in value:
                walk(item)

    walk(settings)
    return found


class RedactingFilter(logging.Filter):
    """A handler filter: masks the secrets of ``redactor`` in each record's message
    and traceback before any formatter sees them (it never drops a record)."""

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self._redact = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        if not self._redact:
            return True
        message = record.getMessage()
        clean = self._redact(message)
        if clean != message:
            record.msg, record.args = clean, ()
        if record.exc_info and not record.exc_text:
            # Formatters reuse exc_text when it is set, so the traceback is masked too.
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self._redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self._redact(record.stack_info)
        return True
