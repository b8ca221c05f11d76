"""Serving on the device: ``edgekit-runtime serve`` (KServe v2 over HTTP, dynamic batching, zero-downtime
model switches). See :mod:`.server`."""

from .server import Server, ServeSettings, serve

__all__ = ["Server", "ServeSettings", "serve"]
