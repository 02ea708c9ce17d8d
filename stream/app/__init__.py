"""The application layer: the ``embedstream`` command line and its commands.

The only layer that imports all of the core (:mod:`embedstream.stream`), the
stores (:mod:`embedstream.sinks`) and the rebuild (:mod:`embedstream.bulk`):
:mod:`~embedstream.stream.app.service` builds clients, the model, the store and
metrics from the settings; the other modules are commands (``dev``, ``dlq``,
``collections``) and the bundled broker they start.
"""

__all__: list[str] = []
