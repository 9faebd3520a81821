"""A small HTTP client for a fewstep server and a bounded load generator (tests, scripts/serve_load.py).
Standard library only; no Ray.

Every call has a timeout, and :func:`run_load` sends a fixed number of requests from a fixed number of
threads and stops sending at a deadline: a load run ends however the server behaves.
"""

from __future__ import annotations

import http.client
import json
import statistics
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from urllib.parse import urlsplit

__all__ = ["Reply", "Connection", "request", "post_sample", "run_load", "summarize"]


@dataclass
class Reply:
    """One HTTP exchange: ``status`` (0: no HTTP answer, see ``error``), lower-case headers, body, seconds
    from send to the end of the body, and the payload that was sent."""

    status: int
    headers: dict[str, str]
    body: bytes
    seconds: float
    payload: dict | None = None
    error: str | None = None
    started: float = field(default=0.0, repr=False)

    def json(self):
        return json.loads(self.body)


def request(url: str, payload: dict | bytes | None = None, *, timeout: float = 60.0,
            method: str | None = None) -> Reply:
    """GET ``url`` (``payload`` None) or POST ``payload`` (a dict as JSON, or raw bytes)."""
    data = payload if isinstance(payload, bytes) or payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, method=method or ("GET" if data is None else "POST"),
                                 headers={"Content-Type": "application/json"} if data is not None else {})
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            body = r.read()
            return Reply(r.status, {k.lower(): v for k, v in r.headers.items()}, body,
                         time.perf_counter() - t0, payload if isinstance(payload, dict) else None, started=t0)
    except urllib.error.HTTPError as e:
        try:
            body = e.read()
        except OSError:
            body = b""
        return Reply(e.code, {k.lower(): v for k, v in (e.headers or {}).items()}, body,
                     time.perf_counter() - t0, payload if isinstance(payload, dict) else None, started=t0)
    except (OSError, urllib.error.URLError) as e:  # refused, reset, timed out: no HTTP status
        return Reply(0, {}, b"", time.perf_counter() - t0, payload if isinstance(payload, dict) else None,
                     error=f"{type(e).__name__}: {e}", started=t0)


def post_sample(base_url: str, payload: dict | bytes, *, timeout: float = 60.0) -> Reply:
    """``POST base_url/v1/sample``."""
    return request(base_url.rstrip("/") + "/v1/sample", payload, timeout=timeout)


class Connection:
    """One kept-alive HTTP/1.1 connection to a server (what :func:`run_load` gives each client thread, as a
    browser or ``requests.Session`` would): no TCP handshake per request.  Not thread-safe.

    A request on a reused connection that the server closed while it was idle (keep-alive timeout) is sent
    again once on a new connection, as urllib3 does; any other failure is a status-0 :class:`Reply`."""

    def __init__(self, base_url: str, *, timeout: float = 60.0):
        u = urlsplit(base_url)
        if u.scheme != "http" or not u.hostname:
            raise ValueError(f"base_url: expected http://host[:port], got {base_url!r}")
        self.host, self.port, self.prefix = u.hostname, u.port or 80, u.path.rstrip("/")
        self.timeout = timeout
        self._conn: http.client.HTTPConnection | None = None

    def post(self, path: str, payload: dict) -> Reply:
        body = json.dumps(payload).encode()
        t0 = time.perf_counter()
        for attempt in (0, 1):
            reused = self._conn is not None
            if self._conn is None:
                self._conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                self._conn.request("POST", self.prefix + path, body, {"Content-Type": "application/json"})
                r = self._conn.getresponse()
                data = r.read()
            except (OSError, http.client.HTTPException) as e:  # refused, reset, timed out, malformed
                self.close()
                stale = isinstance(e, (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError))
                if stale and reused and not attempt:
                    continue
                return Reply(0, {}, b"", time.perf_counter() - t0, payload, error=f"{type(e).__name__}: {e}",
                             started=t0)
            if r.will_close:
                self.close()
            headers = {k.lower(): v for k, v in r.getheaders()}
            return Reply(r.status, headers, data, time.perf_counter() - t0, payload, started=t0)
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def run_load(base_url: str, payloads: Sequence[dict], *, clients: int, timeout: float = 60.0,
             deadline_s: float = 600.0, on_reply: Callable[[int, Reply], None] | None = None
             ) -> list[Reply | None]:
    """Send ``payloads`` to ``POST /v1/sample`` from ``clients`` threads, each with its own kept-alive
    :class:`Connection` and every request with ``timeout``; a request not sent within ``deadline_s`` of the
    start is skipped (None in its place).  Returns the replies in payload order; ``on_reply(i, reply)`` is
    called (from a client thread) as each one arrives."""
    replies: list[Reply | None] = [None] * len(payloads)
    t_end = time.monotonic() + deadline_s
    next_i, lock = [0], threading.Lock()

    def worker():
        conn = Connection(base_url, timeout=timeout)
        try:
            while True:
                with lock:
                    i = next_i[0]
                    next_i[0] += 1
                if i >= len(payloads) or time.monotonic() > t_end:
                    return
                replies[i] = conn.post("/v1/sample", payloads[i])
                if on_reply is not None:
                    on_reply(i, replies[i])
        finally:
            conn.close()
    with ThreadPoolExecutor(clients) as ex:
        for f in [ex.submit(worker) for _ in range(clients)]:
            f.result()
    return replies


def summarize(replies: Sequence[Reply | None]) -> dict:
    """Counts by status, requests per second over the run, and p50 / p99 latency (ms) of the 200s."""
    done = [r for r in replies if r is not None]
    ok = sorted(r.seconds for r in done if r.status == 200)
    statuses: dict[str, int] = {}
    for r in done:
        statuses[str(r.status)] = statuses.get(str(r.status), 0) + 1
    wall = (max(r.started + r.seconds for r in done) - min(r.started for r in done)) if done else 0.0

    def pct(q: float) -> float | None:
        if not ok:
            return None
        return 1000 * (statistics.quantiles(ok, n=100, method="inclusive")[q - 1] if len(ok) > 1 else ok[0])

    return {"requests": len(replies), "sent": len(done), "statuses": statuses, "ok": len(ok),
            "wall_s": wall, "requests_per_s": len(ok) / wall if wall > 0 else None,
            "p50_ms": pct(50), "p99_ms": pct(99)}
