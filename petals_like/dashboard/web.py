"""The dashboard's HTTP routes on the standard library's threading server.

/                the page (static/index.html with the latest view embedded, so it draws at once)
/api/v1/state    the latest view and its history as JSON
/metrics         Prometheus text
/static/NAME     the page's script and style sheet (read once from the package; nothing from a CDN)

The page puts data into the document as text nodes only, and the Content-Security-Policy lets it
run no script but its own, so a hostile record cannot inject markup or code.
"""

from __future__ import annotations

import json
import logging
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

from petals_like.dashboard.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from petals_like.dashboard.service import DashboardService

logger = logging.getLogger(__name__)

STATE_PLACEHOLDER = "{{INITIAL_STATE}}"
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def load_static_files() -> dict[str, bytes]:
    """{file name: contents} of the package's static/ folder."""
    folder = resources.files("petals_like.dashboard") / "static"
    return {item.name: item.read_bytes() for item in folder.iterdir() if item.is_file()}


def embed_json(value: Any) -> str:
    """JSON that is safe inside a <script> element: no '<', '>' or '&' can end it or open a comment."""
    text = json.dumps(value, allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


class DashboardHTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # a slow client never delays shutdown

    def __init__(self, address: tuple[str, int], service: DashboardService):
        self.service = service
        self.static = load_static_files()
        super().__init__(address, DashboardHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = "127.0.0.1" if host in ("0.0.0.0", "") else host
        return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


class DashboardHandler(BaseHTTPRequestHandler):
    server: DashboardHTTPServer
    server_version = "petals_like-dashboard"

    def do_GET(self) -> None:
        self._respond(send_body=True)

    def do_HEAD(self) -> None:
        self._respond(send_body=False)

    def _respond(self, send_body: bool) -> None:
        path = urlsplit(self.path).path
        service = self.server.service
        if path in ("/", "/index.html"):
            page = self.server.static["index.html"].decode()
            body = page.replace(STATE_PLACEHOLDER, embed_json(service.snapshot())).encode()
            self._send(HTTPStatus.OK, CONTENT_TYPES[".html"], body, send_body)
        elif path == "/api/v1/state":
            body = json.dumps(service.snapshot(), allow_nan=False).encode()
            self._send(HTTPStatus.OK, "application/json", body, send_body)
        elif path == "/metrics":
            self._send(HTTPStatus.OK, METRICS_CONTENT_TYPE, service.metrics().encode(), send_body)
        elif path.startswith("/static/") and path[len("/static/") :] in self.server.static:
            name = path[len("/static/") :]
            content_type = CONTENT_TYPES.get(name[name.rfind(".") :], "application/octet-stream")
            self._send(HTTPStatus.OK, content_type, self.server.static[name], send_body, cache=True)
        elif path == "/favicon.ico":
            self._send(HTTPStatus.NO_CONTENT, "text/plain", b"", send_body)
        else:
            self._send(HTTPStatus.NOT_FOUND, "text/plain; charset=utf-8", b"not found\n", send_body)

    def _send(self, status: HTTPStatus, content_type: str, body: bytes, send_body: bool, cache: bool = False) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "max-age=300" if cache else "no-store")
            for name, value in SECURITY_HEADERS.items():
                self.send_header(name, value)
            self.end_headers()
            if send_body:
                self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the browser went away; nothing to answer
            pass

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug(f"{self.address_string()} {format % args}")
