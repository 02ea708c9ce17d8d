"""A small Confluent-compatible Schema Registry, in memory, with outages on demand:
for the tests, the demo and trying ``kafka.schema_registry`` without a registry.

It speaks the part of the Schema Registry REST API that
``confluent_kafka.schema_registry``'s client, serializers and deserializers use:

* ``POST /subjects/{s}/versions`` registers a schema (``schema``, ``schemaType``
  AVRO (the default), PROTOBUF or JSON, ``references``): the same schema gets the
  same id under every subject, a new one the next id and the subject's next version;
* ``POST /subjects/{s}`` looks a schema up under a subject;
* ``GET /schemas/ids/{id}`` (``schemaType`` left out for AVRO, as Confluent does),
  ``/schemas/ids/{id}/subjects``, ``/schemas/ids/{id}/versions``, ``/schemas/types``;
* ``GET /subjects``, ``/subjects/{s}/versions``, ``/subjects/{s}/versions/{v|latest}``,
  ``/subjects/{s}/versions/{v}/referencedby``;
* ``GET``/``PUT /config[/{s}]`` and ``/mode[/{s}]`` (accepted, nothing enforced);
* anything else (associations, metadata, contexts) is 404, which the client reads
  as "none".

Errors are Confluent's JSON, ``{"error_code": 40403, "message": ...}`` (40401 an
unknown subject, 40402 an unknown version, 40403 an unknown schema). Not
checked: compatibility, schema validity. Protobuf schemas are kept as
registered; the serializers register the base64 ``FileDescriptorProto``, which
is then served with or without ``?format=serialized`` (a real registry serves
``.proto`` text without it).

On demand: ``outage(True)`` answers every request 503 (``outage(True,
drop=True)``: closes the connection unanswered, as a dead host behind a proxy
does), ``outage(False)`` ends it; ``delay_s`` slows every answer (timeouts);
``basic_auth = (user, password)`` wants those credentials (else 401). Every
request is recorded in ``log`` (method, path, query, status) for assertions.

A plain ``http.server.ThreadingHTTPServer`` (loopback, a free port unless told
otherwise), serving from a thread of the calling process. Not for production.
From a shell::

    python -m embedstream.stream.app.registry_server --port 8081

then ``kafka.schema_registry.url: http://127.0.0.1:8081``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from embedstream.stream.app._threaded_server import ThreadedServer

__all__ = ["Request", "SchemaRegistryServer", "main"]

_TYPES = ("AVRO", "PROTOBUF", "JSON")



@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str  # without the query, %-escapes decoded
    query: dict[str, str]
    status: int  # 0: the connection was dropped unanswered


class _NotFound(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class _Schema:
    text: str
    kind: str
    references: tuple[tuple[str, str, int], ...]  # (name, subject, version)

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"schema": self.text}
        if self.kind != "AVRO":
            body["schemaType"] = self.kind
        if self.references:
            body["references"] = [{"name": n, "subject": s, "version": v}
                                  for n, s, v in self.references]
        return body


class SchemaRegistryServer(ThreadedServer):
    """See the module docstring."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._lock = threading.Lock()
        self._schemas: dict[int, _Schema] = {}
        self._ids: dict[_Schema, int] = {}
        self._subjects: dict[str, list[int]] = {}  # subject -> schema id per version
        self._down: str | None = None  # None, "503" or "drop"
        self.delay_s = 0.0
        self.basic_auth: tuple[str, str] | None = None
        self.log: list[Request] = []
        super().__init__(self._handler(), host, port, "schema-registry")

    @property
    def url(self) -> str:
        return self.address

    # -- on demand -----------------------------------------------------------------

    def outage(self, down: bool, drop: bool = False) -> None:
        """Answer every request 503 (``drop``: close the connection unanswered) until
        called again with ``down`` False."""
        with self._lock:
            self._down = ("drop" if drop else "503") if down else None

    def requests(self, path_prefix: str = "/", method: str | None = None) -> list[Request]:
        """The logged requests whose path starts with ``path_prefix``."""
        with self._lock:
            return [r for r in self.log if r.path.startswith(path_prefix)
                    and (method is None or r.method == method)]

    def reset_log(self) -> None:
        with self._lock:
            self.log = []

    def register(self, subject: str, schema: str, schema_type: str = "AVRO",
                 references: tuple[tuple[str, str, int], ...] = ()) -> int:
        """Register directly (as ``POST /subjects/{subject}/versions`` does); the id."""
        with self._lock:
            return self._register(subject, _Schema(schema, schema_type, references))[0]

    # -- the registry --------------------------------------------------------------

    def _register(self, subject: str, schema: _Schema) -> tuple[int, int]:
        schema_id = self._ids.get(schema)
        if schema_id is None:
            schema_id = self._ids[schema] = len(self._schemas) + 1
            self._schemas[schema_id] = schema
        versions = self._subjects.setdefault(subject, [])
        if schema_id not in versions:
            versions.append(schema_id)
        return schema_id, versions.index(schema_id) + 1

    def _schema(self, schema_id: str) -> _Schema:
        found = self._schemas.get(int(schema_id)) if schema_id.isdigit() else None
        if found is None:
            raise _NotFound(40403, f"Schema {schema_id} not found")
        return found

    def _version(self, subject: str, version: str) -> tuple[int, int]:
        versions = self._subjects.get(subject)
        if not versions:
            raise _NotFound(40401, f"Subject '{subject}' not found.")
        number = len(versions) if version in ("latest", "-1") else \
            int(version) if version.isdigit() else 0
        if not 1 <= number <= len(versions):
            raise _NotFound(40402, f"Version {version} not found.")
        return versions[number - 1], number

    def _registered(self, subject: str, schema_id: int, version: int) -> dict[str, Any]:
        return {"subject": subject, "version": version, "id": schema_id,
                **self._schemas[schema_id].body()}

    def _get(self, parts: list[str]) -> Any:
        match parts:
            case ["schemas", "types"]:
                return list(_TYPES)
            case ["schemas", "ids", schema_id]:
                return self._schema(schema_id).body()
            case ["schemas", "ids", schema_id, "subjects" | "versions" as what]:
                wanted = int(schema_id) if schema_id.isdigit() else -1
                self._schema(schema_id)
                found = [(s, v.index(wanted) + 1) for s, v in self._subjects.items()
                         if wanted in v]
                return [s for s, _ in found] if what == "subjects" else \
                    [{"subject": s, "version": n} for s, n in found]
            case ["subjects"]:
                return sorted(self._subjects)
            case ["subjects", subject, "versions"]:
                self._version(subject, "latest")
                return list(range(1, len(self._subjects[subject]) + 1))
            case ["subjects", subject, "versions", version]:
                return self._registered(subject, *self._version(subject, version))
            case ["subjects", subject, "versions", version, "referencedby"]:
                self._version(subject, version)
                return []
            case ["config"] | ["config", _]:
                return {"compatibilityLevel": "BACKWARD"}
            case ["mode"] | ["mode", _]:
                return {"mode": "READWRITE"}
            case []:
                return {}
        raise _NotFound(404, "HTTP 404 Not Found")

    def _post(self, parts: list[str], body: dict[str, Any]) -> Any:
        match parts:
            case ["subjects", subject, "versions"]:
                schema_id, version = self._register(subject, _parse_schema(body))
                return {"id": schema_id, "version": version, "subject": subject,
                        **self._schemas[schema_id].body()}
            case ["subjects", subject]:
                wanted = self._ids.get(_parse_schema(body))
                self._version(subject, "latest")
                versions = self._subjects[subject]
                if wanted is None or wanted not in versions:
                    raise _NotFound(40403, "Schema not found")
                return self._registered(subject, wanted, versions.index(wanted) + 1)
        raise _NotFound(404, "HTTP 404 Not Found")

    def _put(self, parts: list[str], body: dict[str, Any]) -> Any:
        match parts:
            case ["config"] | ["config", _]:
                return {"compatibility": body.get("compatibility", "BACKWARD")}
            case ["mode"] | ["mode", _]:
                return {"mode": body.get("mode", "READWRITE")}
        raise _NotFound(404, "HTTP 404 Not Found")

    def _answer(self, method: str, path: str, headers: Any, raw: bytes) -> tuple[int, Any]:
        """(status, body) for a request, or (0, None) to drop the connection."""
        time.sleep(self.delay_s)
        with self._lock:
            if self._down == "drop":
                return 0, None
            if self._down == "503":
                return 503, {"error_code": 50301, "message": "Schema Registry is down"}
            if self.basic_auth is not None:
                user, password = self.basic_auth
                token = base64.b64encode(f"{user}:{password}".encode()).decode()
                if headers.get("Authorization") != f"Basic {token}":
                    return 401, {"error_code": 401, "message": "Unauthorized"}
            parts = [unquote(p) for p in path.strip("/").split("/") if p]
            try:
                body = json.loads(raw) if raw else {}
                if method == "GET":
                    return 200, self._get(parts)
                if method == "POST":
                    return 200, self._post(parts, body)
                if method == "PUT":
                    return 200, self._put(parts, body)
                return 405, {"error_code": 405, "message": "HTTP 405 Method Not Allowed"}
            except _NotFound as missing:
                return 404, {"error_code": missing.code, "message": str(missing)}
            except (ValueError, TypeError, KeyError) as error:
                return 422, {"error_code": 42201, "message": f"Invalid schema: {error}"}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                raw = self.rfile.read(length) if length else b""
                url = urlsplit(self.path)
                status, body = server._answer(self.command, url.path, self.headers, raw)
                query = {k: v[-1] for k, v in parse_qs(url.query).items()}
                with server._lock:
                    server.log.append(Request(self.command, unquote(url.path), query, status))
                if status == 0:
                    self.close_connection = True
                    return
                out = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/vnd.schemaregistry.v1+json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            do_GET = do_POST = do_PUT = do_DELETE = _serve

        return Handler


def _parse_schema(body: dict[str, Any]) -> _Schema:
    text, kind = body.get("schema"), body.get("schemaType") or "AVRO"
    if not isinstance(text, str) or kind not in _TYPES:
        raise ValueError(f"want a schema string and a schemaType of {_TYPES}")
    references = tuple((r["name"], r["subject"], int(r["version"]))
                       for r in body.get("references") or [])
    return _Schema(text, kind, references)


def main(argv: list[str] | None = None) -> int:
    """Serve until interrupted (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog="python -m embedstream.stream.app.registry_server",
        description="A small in-memory Confluent-compatible Schema Registry "
                    "(not for production).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--user", default=None, help="require HTTP basic auth as this user")
    parser.add_argument("--password", default="", help="the basic-auth password")
    args = parser.parse_args(argv)
    server = SchemaRegistryServer(host=args.host, port=args.port)
    if args.user is not None:
        server.basic_auth = (args.user, args.password)
    with server:
        print(f"Schema Registry at {server.url} (Ctrl-C stops it)", file=sys.stderr, flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
