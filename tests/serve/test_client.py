"""The load client's kept-alive connections against a plain standard-library HTTP server (no Ray): requests
reuse one TCP connection, a connection the server closed while idle is replaced (the request sent once more),
and a refused connection is a status-0 reply, never an exception."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from fewstep.serve.client import Connection, run_load


class _Echo(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    close_after = 0  # close the connection after this many requests on it (0: never)

    def do_POST(self):  # noqa: N802 - the standard library's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.connections.add(self.client_address)
        self.server.requests += 1
        self._served = getattr(self, "_served", 0) + 1
        out = json.dumps({"echo": body, "path": self.path}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)
        self.wfile.flush()
        if self.close_after and self._served >= self.close_after:
            # close without "Connection: close": the client only finds out on its next request
            self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def server(request):
    handler = type("Handler", (_Echo,), {"close_after": getattr(request, "param", 0)})
    srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    srv.connections, srv.requests = set(), 0
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv, f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_requests_reuse_one_connection(server):
    srv, url = server
    conn = Connection(url + "/prefix/", timeout=10)
    try:
        replies = [conn.post("/v1/sample", {"labels": [i]}) for i in range(5)]
    finally:
        conn.close()
    assert [r.status for r in replies] == [200] * 5
    assert [r.json() for r in replies] == [{"echo": {"labels": [i]}, "path": "/prefix/v1/sample"}
                                           for i in range(5)]
    assert replies[0].headers["content-type"] == "application/json"
    assert len(srv.connections) == 1 and srv.requests == 5


@pytest.mark.parametrize("server", [1], indirect=True)
def test_a_connection_closed_while_idle_is_replaced(server):
    srv, url = server
    conn = Connection(url, timeout=10)
    try:
        replies = [conn.post("/x", {"i": i}) for i in range(3)]
    finally:
        conn.close()
    assert [r.status for r in replies] == [200] * 3
    assert [r.json()["echo"] for r in replies] == [{"i": 0}, {"i": 1}, {"i": 2}]
    assert srv.requests == 3 and len(srv.connections) == 3  # each request once, on a new connection


def test_refused_is_a_status_0_reply():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = Connection(f"http://127.0.0.1:{port}", timeout=5).post("/v1/sample", {"labels": [1]})
    assert r.status == 0 and "ConnectionRefusedError" in r.error and r.payload == {"labels": [1]}


def test_run_load_answers_every_payload_in_order(server):
    srv, url = server
    payloads = [{"labels": [i % 10], "seed": i} for i in range(40)]
    replies = run_load(url, payloads, clients=4, timeout=10, deadline_s=60)
    assert [r.json()["echo"] for r in replies] == payloads
    assert srv.requests == 40 and len(srv.connections) <= 4


@pytest.mark.parametrize("url", ["https://example.org", "127.0.0.1:8000", "http://"])
def test_bad_base_url(url):
    with pytest.raises(ValueError, match="expected http://host"):
        Connection(url)
