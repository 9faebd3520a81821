"""``fewstep serve`` end to end on localhost: the command starts Ray and serves the digits model; every
response is checked against a plan compiled in this process for that request alone.

One test function drives one server through every step (start-up, API, bad input, a small concurrent load,
overload, timeout, a replica killed under load, shutdown): a server costs one Ray start, and pytest-xdist
could otherwise split the steps over two workers and start two.  Every request has a client timeout and
every load loop a fixed count, so the test ends however the server behaves.  The larger load test
(300 requests from 16 clients) and the throughput comparison are scripts/serve_load.py.
"""

import importlib.util
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                                reason="needs the serve extra (ray[serve])")

REL_TOL = 1e-5  # a merged request vs its own plan; see tests/serve/test_batching.py for the measurement
NFE = 4
START_LIMIT_S = 240  # a hang guard; the start-up target (60 s) is measured by scripts/serve_load.py
CLIENT_TIMEOUT_S = 90


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Oracle:
    """Plans compiled here, one per (program, request size): what each response must equal."""

    def __init__(self):
        import fewstep as fs
        from fewstep.models import digits

        dit, _ = digits.load_digits_dit()
        self.model, self.spec = fs.models.from_diffusers(dit, digits.digits_scheduler_config())
        self.plans = {}

    def __call__(self, payload: dict) -> torch.Tensor:
        import fewstep as fs
        from fewstep.serve import request_noise

        labels = torch.tensor(payload["labels"])
        g = payload.get("guidance_scale", 1.5) or None
        key = (payload.get("solver", "unipc"), payload.get("nfe", NFE), g, len(labels))
        if key not in self.plans:
            self.plans[key] = fs.compile(self.model, self.spec, solver=key[0], nfe=key[1], guidance_scale=g,
                                         shape=(len(labels), 1, 8, 8), cond={"class_labels": labels})
        noise = request_noise(len(labels), (1, 8, 8), payload["seed"])
        return self.plans[key](noise, seed=payload["seed"], class_labels=labels)


def _check_equal(reply, oracle) -> None:
    from fewstep.serve import decode_npy

    assert reply.status == 200, (reply.status, reply.body[:300], reply.error)
    got = torch.from_numpy(decode_npy(reply.body))
    want = oracle(reply.payload)
    assert got.shape == want.shape, (got.shape, want.shape)
    err = float((got - want).abs().max() / want.abs().max())
    assert err <= REL_TOL, (err, reply.payload, reply.headers)


def _one_line_json_error(reply, status: int, *needles: str) -> None:
    assert reply.status == status, (reply.status, reply.body[:300])
    assert reply.headers.get("content-type", "").startswith("application/json"), reply.headers
    assert reply.body.count(b"\n") == 0
    msg = reply.json()["error"]
    for n in needles:
        assert n in msg, (n, msg)


def _payloads(n: int, seed: int, max_rows: int = 8) -> list[dict]:
    rng = random.Random(seed)
    return [{"labels": [rng.randrange(10) for _ in range(rng.randint(1, max_rows))],
             "seed": rng.randrange(2**40)} for _ in range(n)]


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny network is far faster on one thread of a shared 2-core machine
    yield
    torch.set_num_threads(n)


def test_fewstep_serve_end_to_end(one_thread, record_property):
    from fewstep.serve import client

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "fewstep.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--nfe", str(NFE), "--max-batch", "8", "--batch-wait-ms", "100", "--num-cpus", "3",
           "--timeout-s", "60"]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group: nothing else is signalled
    out_lines, err_lines = [], []
    for stream, sink in ((proc.stdout, out_lines), (proc.stderr, err_lines)):
        threading.Thread(target=lambda s=stream, k=sink: k.extend(s), daemon=True).start()
    driver = None
    try:
        oracle = Oracle()  # loads the model while the server starts
        # -- start-up: /healthz answers ------------------------------------------------------------------
        while True:
            assert proc.poll() is None, f"exited {proc.returncode}: {''.join(err_lines)[-2000:]}"
            assert time.monotonic() - t0 < START_LIMIT_S, "no /healthz answer"
            if client.request(url + "/healthz", timeout=5).status == 200:
                break
            time.sleep(0.5)
        startup = time.monotonic() - t0
        record_property("startup_s", round(startup, 1))
        print(f"fewstep serve answered /healthz {startup:.1f} s after starting")

        # -- API ----------------------------------------------------------------------------------------
        models = client.request(url + "/v1/models", timeout=CLIENT_TIMEOUT_S).json()["models"][0]
        assert models["id"] == "digits" and models["sample_shape"] == [1, 8, 8]
        assert models["labels"] == {"min": 0, "max": 9} and "unipc" in models["solvers"]
        assert models["defaults"] == {"solver": "unipc", "nfe": NFE, "guidance_scale": 1.5, "format": "npy"}
        assert models["limits"]["max_batch"] == 8 and models["limits"]["buckets"] == [1, 2, 4, 8]

        one = {"labels": [3, 1, 4], "seed": 2024}
        r = client.post_sample(url, one, timeout=CLIENT_TIMEOUT_S)
        _check_equal(r, oracle)
        assert r.headers["content-type"] == "application/x-npy" and r.headers["x-fewstep-seed"] == "2024"
        ddim = {"labels": [5], "seed": 9, "solver": "ddim", "nfe": 3, "guidance_scale": 0}
        _check_equal(client.post_sample(url, ddim, timeout=CLIENT_TIMEOUT_S), oracle)
        png = client.post_sample(url, dict(one, format="png"), timeout=CLIENT_TIMEOUT_S)
        assert png.status == 200 and png.body[:8] == b"\x89PNG\r\n\x1a\n"
        unseeded = client.post_sample(url, {"labels": [7]}, timeout=CLIENT_TIMEOUT_S)
        _check_equal(_with_seed(unseeded), oracle)  # the server drew the seed and said which

        # -- bad input: a one-line JSON 4xx each, and the server keeps serving ----------------------------
        bad = [(b"{not json", 400, "malformed JSON"),
               (b'{"labels": [10]}', 400, "unknown class label(s) [10]"),
               (b'{"labels": [1], "seed": -5}', 400, "seed"),
               (b'{"labels": [1], "solver": "warp"}', 400, "solver"),
               (b'{"labels": [1], "guidance_scale": NaN}', 400, "guidance_scale"),
               (b'{"labels": [1], "nfe": 51}', 400, "nfe"),
               (json.dumps({"labels": [1] * 9}).encode(), 400, "at most 8"),
               (b'{"labels": [1], "sede": 1}', 400, "unknown field"),
               (b"x" * 70000, 413, "exceeds")]
        for body, status, says in bad:
            _one_line_json_error(client.post_sample(url, body, timeout=CLIENT_TIMEOUT_S), status, says)
        _one_line_json_error(client.request(url + "/v1/sample", timeout=CLIENT_TIMEOUT_S), 405)
        _one_line_json_error(client.request(url + "/v2/nothing", timeout=CLIENT_TIMEOUT_S), 404)
        _check_equal(client.post_sample(url, one, timeout=CLIENT_TIMEOUT_S), oracle)

        # -- a small concurrent load: every response equals its own plan, and requests were merged --------
        payloads = _payloads(8, seed=1, max_rows=1) + _payloads(16, seed=2)  # 8 small ones arrive together
        replies = client.run_load(url, payloads, clients=8, timeout=CLIENT_TIMEOUT_S, deadline_s=300)
        assert all(r is not None for r in replies)
        for r in replies:
            _check_equal(r, oracle)
        merged = [int(r.headers["x-fewstep-batch-requests"]) for r in replies]
        assert max(merged) > 1, merged  # with 8 clients, some plan calls served several requests
        print("load:", client.summarize(replies))

        # -- overload and timeout: a second application with tight limits -------------------------------
        import ray
        from ray import serve

        from fewstep.serve import ServeOptions
        from fewstep.serve.app import build_app

        gcs = next(line for line in out_lines if "Ray at" in line).split("Ray at ")[1].split(";")[0]
        # "auto": the newest local cluster, whose token Ray then loads (an explicit address would not)
        driver = ray.init(address="auto", logging_level="WARNING", log_to_driver=False)
        assert driver.address_info["gcs_address"] == gcs, (driver.address_info, gcs)
        tight = ServeOptions(nfe=NFE, max_batch=2, batch_wait_ms=50, max_ongoing=1, max_queued=1,
                             timeout_s=0.01, retry_after_s=2)
        serve.run(build_app(tight), name="tight", route_prefix="/tight")
        tight_url = url + "/tight"
        # a request waits batch_wait_ms = 50 ms for company before its plan runs: never ready in 10 ms
        t = time.monotonic()
        late = client.post_sample(tight_url, {"labels": [2], "seed": 1}, timeout=CLIENT_TIMEOUT_S)
        _one_line_json_error(late, 504, "timeout")
        assert time.monotonic() - t < 10
        burst = client.run_load(tight_url, [{"labels": [1], "seed": i} for i in range(12)], clients=12,
                                timeout=CLIENT_TIMEOUT_S, deadline_s=60)
        statuses = [r.status for r in burst]
        assert set(statuses) <= {503, 504}, statuses  # 1 running + 1 queued; the rest refused at once
        refused = [r for r in burst if r.status == 503]
        assert refused and all(r.headers.get("retry-after") == "2" for r in refused), statuses
        assert max(r.seconds for r in burst) < 30
        serve.delete("tight")

        # -- a replica killed under load: every in-flight request completes or gets a 5xx ---------------
        replica = client.request(url + "/healthz", timeout=CLIENT_TIMEOUT_S).json()["replica"]
        (actor,) = [a for a in ray.util.list_named_actors(all_namespaces=True) if replica in a["name"]]
        handle = ray.get_actor(actor["name"], namespace=actor["namespace"])
        results, answered = [], threading.Semaphore(0)
        loader = threading.Thread(target=lambda: results.extend(client.run_load(
            url, _payloads(48, seed=3), clients=16, timeout=CLIENT_TIMEOUT_S, deadline_s=120,
            on_reply=lambda i, r: answered.release())))
        loader.start()
        for _ in range(2):  # two answers in: the replica is busy, with requests running and queued
            assert answered.acquire(timeout=CLIENT_TIMEOUT_S)
        ray.kill(handle)
        loader.join(CLIENT_TIMEOUT_S + 60)
        assert not loader.is_alive() and len(results) == 48 and None not in results
        lost = [(r.status, r.error) for r in results if r.status != 200 and not 500 <= r.status < 600]
        assert not lost, lost  # no connection dropped without an answer, nothing hung past its timeout
        for r in results:
            if r.status == 200:
                _check_equal(r, oracle)
        print("killed replica under load:", client.summarize(results))
        t = time.monotonic()
        while True:  # Serve starts a new replica
            h = client.request(url + "/healthz", timeout=5)
            if h.status == 200 and h.json()["replica"] != replica:
                break
            assert time.monotonic() - t < START_LIMIT_S, "no replica came back"
            time.sleep(0.5)
        after = client.run_load(url, _payloads(50, seed=4, max_rows=2), clients=8, timeout=CLIENT_TIMEOUT_S,
                                deadline_s=300)
        failed = [(r.status, r.body[:200]) for r in after if r.status != 200]
        assert len(after) == 50 and not failed, failed
        for r in after[:10]:
            _check_equal(r, oracle)
    finally:
        if driver is not None:
            import ray

            ray.shutdown()
        # -- shutdown: Ctrl-C stops the command cleanly ------------------------------------------------------
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # its own group (start_new_session): only what it started
                proc.wait(30)
    assert proc.returncode == 0, (proc.returncode, "".join(err_lines)[-2000:])


def _with_seed(reply):
    reply.payload = dict(reply.payload, seed=int(reply.headers["x-fewstep-seed"]))
    return reply
