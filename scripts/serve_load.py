"""Load test of ``fewstep serve`` on localhost with the bundled digits model: start-up, correctness under
load, throughput with and without request merging, a replica killed under load.

    .venv/bin/python scripts/serve_load.py [--requests 300] [--clients 16] [--out benchmarks/results]

Each phase starts the command as a user would (``fewstep serve --port P ...``) and talks HTTP to 127.0.0.1
only; every request has a client timeout and every load a fixed count and a deadline.

1. start-up: seconds from starting ``fewstep serve`` to its first ``/healthz`` 200 (target: < 60 s).
2. correctness: ``--requests`` requests from ``--clients`` concurrent clients, 1..8 labels each, random seeds:
   0 errors, and every response equals a plan compiled here for that request alone (its own batch size, its
   own seed) within 1e-5 relative (max |difference| / max |sample|).
3. a replica killed under load (``ray.kill`` of its actor): every request answered 200 or 5xx, none lost or
   hung; seconds until Serve's new replica answers; then 50 requests, all 200.
0. the served program alone, no server: ``fs.Engine`` calls at batch 1 and at ``--max-batch`` on one torch
   thread, the rows/s ratio being the most merging could gain on the plan's own work.
4. throughput: single-label requests from ``--clients`` clients against the same server (merging) and
   against ``fewstep serve --max-batch 1`` (one request per plan call), both running, in ``--rounds``
   alternating rounds so that other load on the machine hits both alike: the median round's requests/s,
   p50 / p99 latency (target: >= 3x).

Writes ``<out>/serve-<host>-<time>.json`` (machine, versions, git SHA, every figure) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

REL_TOL = 1e-5
CLIENT_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``fewstep serve`` in a subprocess of its own process group (only what it started is ever signalled)."""

    def __init__(self, *flags: str):
        from fewstep.serve import client

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "fewstep.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
               *flags]
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True)
        self.out, self.err = [], []
        for stream, sink in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
            threading.Thread(target=lambda s=stream, k=sink: k.extend(s), daemon=True).start()
        while True:
            if self.proc.poll() is not None:
                tail = "".join(self.err)[-3000:]
                raise RuntimeError(f"fewstep serve exited {self.proc.returncode}: {tail}")
            if time.monotonic() - self.t0 > 600:
                self.stop()
                raise RuntimeError("fewstep serve did not answer /healthz in 600 s")
            if client.request(self.url + "/healthz", timeout=5).status == 200:
                break
            time.sleep(0.25)
        self.startup_s = time.monotonic() - self.t0

    @property
    def gcs_address(self) -> str:
        line = next(line for line in self.out if "Ray at" in line)
        return line.split("Ray at ")[1].split(";")[0]

    def stop(self) -> float:
        """Ctrl-C; returns the seconds it took to exit (SIGKILL of its group after 120 s)."""
        t = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
        return time.monotonic() - t


class Oracle:
    """A plan compiled here per (request size): what every response must equal."""

    def __init__(self, solver: str, nfe: int, guidance: float):
        import fewstep as fs
        from fewstep.models import digits

        dit, _ = digits.load_digits_dit()
        self.model, self.spec = fs.models.from_diffusers(dit, digits.digits_scheduler_config())
        self.solver, self.nfe, self.guidance = solver, nfe, guidance
        self.plans = {}

    def __call__(self, payload: dict) -> torch.Tensor:
        import fewstep as fs
        from fewstep.serve import request_noise

        y = torch.tensor(payload["labels"])
        if len(y) not in self.plans:
            self.plans[len(y)] = fs.compile(self.model, self.spec, solver=self.solver, nfe=self.nfe,
                                            guidance_scale=self.guidance, shape=(len(y), 1, 8, 8),
                                            cond={"class_labels": y})
        return self.plans[len(y)](request_noise(len(y), (1, 8, 8), payload["seed"]), class_labels=y)

    def plan_alone(self, max_batch: int, rounds: int = 7) -> dict:
        """The served program without the server: ``fs.Engine`` calls at batch 1 and at ``max_batch`` in
        this process (one torch thread, as a replica runs it), ``rounds`` alternating medians of a few calls,
        the median of those kept: what merging could gain at most on the plan's own work."""
        import fewstep as fs
        from fewstep.bench.timing import median_ms

        eng = fs.Engine(self.model, self.spec, solver=self.solver, nfe=self.nfe, guidance_scale=self.guidance)
        g = torch.Generator().manual_seed(0)
        inputs = {b: (torch.randn(b, 1, 8, 8, generator=g), torch.arange(b) % 10) for b in (1, max_batch)}
        ms: dict[int, list[float]] = {b: [] for b in inputs}
        for _ in range(rounds):
            for b, (x, y) in inputs.items():
                ms[b].append(median_ms(lambda x=x, y=y: eng(x, class_labels=y), torch.device("cpu")))
        out = {}
        for b, v in ms.items():
            med = sorted(v)[len(v) // 2]
            out[f"batch_{b}_ms"], out[f"batch_{b}_rows_per_s"] = med, b * 1e3 / med
        out["rows_per_s_ratio"] = out[f"batch_{max_batch}_rows_per_s"] / out["batch_1_rows_per_s"]
        return out


def payloads(n: int, seed: int, max_rows: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"labels": [rng.randrange(10) for _ in range(rng.randint(1, max_rows))],
             "seed": rng.randrange(2**62)} for _ in range(n)]


def check_equal(replies, oracle) -> dict:
    from fewstep.serve import decode_npy

    errors, worst, merged = [], 0.0, 0
    for r in replies:
        if r is None or r.status != 200:
            errors.append(None if r is None else (r.status, r.error, r.body[:200].decode(errors="replace")))
            continue
        got = torch.from_numpy(decode_npy(r.body))
        want = oracle(r.payload)
        worst = max(worst, float((got - want).abs().max() / want.abs().max()))
        merged += int(r.headers.get("x-fewstep-batch-requests", "1")) > 1
    return {"errors": len(errors), "error_samples": errors[:5], "worst_rel_err": worst,
            "within_tolerance": worst <= REL_TOL, "merged_responses": merged}


def kill_replica_under_load(server: Server, clients: int) -> dict:
    import ray

    from fewstep.serve import client

    # "auto": the newest local cluster, whose token Ray then loads (an explicit address would not)
    context = ray.init(address="auto", logging_level="WARNING", log_to_driver=False)
    try:
        if context.address_info["gcs_address"] != server.gcs_address:
            raise RuntimeError(f"connected to {context.address_info['gcs_address']}, not the server's Ray at "
                               f"{server.gcs_address}")
        replica = client.request(server.url + "/healthz", timeout=CLIENT_TIMEOUT_S).json()["replica"]
        (actor,) = [a for a in ray.util.list_named_actors(all_namespaces=True) if replica in a["name"]]
        handle = ray.get_actor(actor["name"], namespace=actor["namespace"])
        results, answered = [], threading.Semaphore(0)
        loader = threading.Thread(target=lambda: results.extend(client.run_load(
            server.url, payloads(3 * clients, 11, 8), clients=clients, timeout=CLIENT_TIMEOUT_S,
            deadline_s=300, on_reply=lambda i, r: answered.release())))
        loader.start()
        for _ in range(2):
            answered.acquire(timeout=CLIENT_TIMEOUT_S)
        t_kill = time.monotonic()
        ray.kill(handle)
        while True:
            h = client.request(server.url + "/healthz", timeout=5)
            if h.status == 200 and h.json()["replica"] != replica:
                break
            if time.monotonic() - t_kill > 600:
                raise RuntimeError("no replica came back in 600 s")
            time.sleep(0.25)
        back_s = time.monotonic() - t_kill
        loader.join(CLIENT_TIMEOUT_S + 300)
        statuses = {}
        for r in results:
            key = str(r.status) if r is not None else "not sent"
            statuses[key] = statuses.get(key, 0) + 1
        lost = sum(v for k, v in statuses.items() if not (k == "200" or k.startswith("5")))
        after = client.run_load(server.url, payloads(50, 12, 2), clients=min(clients, 8),
                                timeout=CLIENT_TIMEOUT_S, deadline_s=300)
        return {"in_flight_statuses": statuses, "lost_or_hung": lost,
                "max_seconds": max(r.seconds for r in results if r is not None),
                "new_replica_after_s": back_s,
                "next_50_ok": sum(r is not None and r.status == 200 for r in after)}
    finally:
        ray.shutdown()


def throughput(server: Server, n: int, clients: int, seed: int = 21) -> dict:
    from fewstep.serve import client

    replies = client.run_load(server.url, payloads(n, seed, 1), clients=clients, timeout=CLIENT_TIMEOUT_S,
                              deadline_s=900)
    return client.summarize(replies)


def environment() -> dict:
    import ray

    from fewstep.bench.results import environment as env

    e = env(torch.device("cpu"))
    e.update(ray=ray.__version__, python=platform.python_version(), cpus=os.cpu_count(),
             machine=f"{platform.machine()} {platform.processor() or ''}".strip(), host=platform.node(),
             load_average_at_start=os.getloadavg())
    return e


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--throughput-requests", type=int, default=160)
    p.add_argument("--rounds", type=int, default=3, help="throughput rounds per server, alternating (median)")
    p.add_argument("--max-batch", type=int, default=None,
                   help="the merging server's --max-batch (default: fewstep serve's)")
    p.add_argument("--cpus-per-replica", type=float, default=None,
                   help="both servers' --cpus-per-replica (the replica's torch threads; default: serve's)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "benchmarks" / "results"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # the oracle shares this 2-core machine with the server
    from fewstep.serve import ServeOptions, client

    settings = {"requests": args.requests, "clients": args.clients, "solver": "unipc", "nfe": 8,
                "guidance_scale": 1.5, "max_batch": args.max_batch or ServeOptions().max_batch,
                "cpus_per_replica": args.cpus_per_replica or ServeOptions().cpus_per_replica,
                "throughput_requests": args.throughput_requests, "rounds": args.rounds,
                "tolerance_rel": REL_TOL}
    result = {"environment": environment(), "settings": settings}
    cpu_flags = () if args.cpus_per_replica is None else ("--cpus-per-replica", str(args.cpus_per_replica))
    merging_flags = (() if args.max_batch is None else ("--max-batch", str(args.max_batch))) + cpu_flags
    oracle = Oracle("unipc", 8, 1.5)
    result["plan_alone"] = oracle.plan_alone(settings["max_batch"])  # before any server shares the cores
    print(f"the plan alone (one thread): {result['plan_alone']}", flush=True)
    print(f"starting fewstep serve {' '.join(merging_flags)} ...", flush=True)
    server = Server(*merging_flags)
    single = None
    try:
        result["startup_s"] = server.startup_s
        print(f"start-up: /healthz answered {server.startup_s:.1f} s after start", flush=True)
        t = time.monotonic()
        replies = client.run_load(server.url, payloads(args.requests, 1, 8), clients=args.clients,
                                  timeout=CLIENT_TIMEOUT_S, deadline_s=1800)
        load = client.summarize(replies)
        load["seconds"] = time.monotonic() - t
        print(f"correctness load: {load}", flush=True)
        load.update(check_equal(replies, oracle))
        result["correctness"] = load
        print(f"  checked: {load['errors']} errors, worst relative error {load['worst_rel_err']:.2e}, "
              f"{load['merged_responses']} responses from merged plan calls", flush=True)
        result["fault"] = kill_replica_under_load(server, args.clients)
        print(f"replica killed under load: {result['fault']}", flush=True)
        # the second server only now: the fault phase finds the server's Ray as the newest local cluster
        print("starting fewstep serve --max-batch 1 ...", flush=True)
        single = Server("--max-batch", "1", *cpu_flags)
        result["startup_s_max_batch_1"] = single.startup_s
        # rounds alternate between the two servers so that other load on the machine hits both alike
        rounds = {"throughput_merged": [], "throughput_one_at_a_time": []}
        for k in range(args.rounds):
            for key, srv in (("throughput_merged", server), ("throughput_one_at_a_time", single)):
                r = throughput(srv, args.throughput_requests, args.clients, seed=21 + k)
                rounds[key].append(r)
                print(f"round {k + 1} {key}: {r}", flush=True)
        for key, rs in rounds.items():
            med = sorted(rs, key=lambda r: r["requests_per_s"])[len(rs) // 2]
            result[key] = dict(med, rounds_requests_per_s=[r["requests_per_s"] for r in rs])
    finally:
        result["shutdown_s"] = server.stop()
        if single is not None:
            single.stop()
    m, s = result["throughput_merged"], result["throughput_one_at_a_time"]
    result["throughput_ratio"] = m["requests_per_s"] / s["requests_per_s"]
    result["environment"]["load_average_at_end"] = os.getloadavg()
    c, f = result["correctness"], result["fault"]
    result["targets"] = {
        "correctness: 0 errors, all within 1e-5": c["errors"] == 0 and c["within_tolerance"],
        "throughput >= 3x one request at a time": result["throughput_ratio"] >= 3,
        "fault: none lost, next 50 ok": f["lost_or_hung"] == 0 and f["next_50_ok"] == 50,
        "start-up < 60 s": result["startup_s"] < 60,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    host = "".join(ch if ch.isalnum() else "-" for ch in platform.node()).strip("-") or "host"
    path = out / f"serve-{host}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    mb = result["settings"]["max_batch"]
    print(f"\n| workload ({args.clients} clients) | server | requests/s | p50 ms | p99 ms |")
    print("|---|---|---|---|---|")
    print(f"| {args.requests} requests, 1-8 labels | merging (--max-batch {mb}) | "
          f"{c['requests_per_s']:.2f} | {c['p50_ms']:.0f} | {c['p99_ms']:.0f} |")
    for name, r in ((f"merging (--max-batch {mb})", m), ("one request per plan call (--max-batch 1)", s)):
        print(f"| {args.throughput_requests} requests, 1 label | {name} | {r['requests_per_s']:.2f} | "
              f"{r['p50_ms']:.0f} | {r['p99_ms']:.0f} |")
    pa = result["plan_alone"]
    print(f"\nthe plan alone, one thread: batch 1 {pa['batch_1_ms']:.1f} ms, batch {mb} "
          f"{pa[f'batch_{mb}_ms']:.1f} ms: {pa['rows_per_s_ratio']:.2f}x the rows/s")
    print(f"throughput ratio {result['throughput_ratio']:.2f}x; start-up {result['startup_s']:.1f} s; "
          f"targets {result['targets']}\nwrote {path}")
    return 0 if all(result["targets"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
