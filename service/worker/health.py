"""A worker's own small HTTP endpoint: `/metrics` (Prometheus) and `/healthz` (200 while it takes jobs)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # scrapes every few seconds would flood the log
        pass


class HealthServer:
    def __init__(self, host: str, port: int, ready: Callable[[], bool]):
        self.ready = ready
        self.metrics_app = make_wsgi_app()
        self.server = make_server(host, port, self.app, ThreadingWSGIServer, handler_class=_QuietHandler)
        self.port = self.server.server_port

    def app(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return self.metrics_app(environ, start_response)
        if path == "/healthz":
            ok = self.ready()
            start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "application/json")])
            return [json.dumps({"status": "ok" if ok else "stopping"}).encode()]
        start_response("404 Not Found", [("Content-Type", "application/json")])
        return [b'{"error": "not found", "error_type": "not_found"}']

    def start(self) -> None:
        threading.Thread(target=self.server.serve_forever, name="health", daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
