"""``fewstep serve``: serve a model over HTTP on Ray Serve (the ``serve`` extra: ``fewstep[serve]``).

``fewstep serve --model digits --host 127.0.0.1 --port 8000`` starts a local Ray instance, deploys the
application of :mod:`fewstep.serve.app` and serves until interrupted (Ctrl-C or SIGTERM), then shuts Serve
and Ray down.  ``--print-config`` writes the Serve config file of the same application instead, for a
cluster: ``ray start --head`` on one machine, ``ray start --address HEAD:6379`` on the others,
``serve deploy fewstep.yaml``.

API: ``POST /v1/sample`` with ``{"labels": [...], "seed": ..., "solver": ..., "nfe": ...,
"guidance_scale": ..., "format": "npy" | "png"}``, ``GET /healthz``, ``GET /v1/models``.
"""

from __future__ import annotations

import argparse
import math
import signal
import socket
import sys
import time
from pathlib import Path

from .checks import guidance_arg, int_at_least, positive_int_arg

# Ray's raylet waits a fixed 15 s for the node's dashboard agent to write its ports (WaitForPersistedPort in
# Ray's src/ray/util/port_persistence.h); on a machine busy with other work the agent can take longer, and
# ray.init then fails with this message.
_RAY_SLOW_START = "timed out during startup"


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return v


def _nonnegative_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not math.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return v


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..serve.options import QUANT_MODES

    p.add_argument("--model", default="digits", help="the bundled model to serve (default: digits)")
    p.add_argument("--diffusers", metavar="DIR", default=None,
                   help="serve a local diffusers class-conditional DiT (pipeline or model directory) instead")
    p.add_argument("--scheduler-config", metavar="JSON", default=None,
                   help="diffusers scheduler config for a bare model directory")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int_at_least(1), default=8000, help="port to listen on (default: 8000)")
    p.add_argument("--replicas", type=positive_int_arg, default=1, help="Serve replicas (default: 1)")
    p.add_argument("--max-batch", type=positive_int_arg, default=8,
                   help="most samples in one plan call, and in one request (default: 8)")
    p.add_argument("--batch-calls", type=positive_int_arg, default=1,
                   help="plan calls a busy replica's next run may make from waiting requests (default: 1)")
    p.add_argument("--batch-wait-ms", type=_nonnegative_float, default=5.0,
                   help="how long a replica waits for more requests to merge (default: 5)")
    p.add_argument("--solver", default=None,
                   help="default solver of a request (default: unipc, or \"tuned\" with --tuned)")
    p.add_argument("--nfe", type=positive_int_arg, default=None,
                   help="default nfe of a request (default: 8, or the tuned program's)")
    p.add_argument("--guidance", type=guidance_arg, default=None,
                   help="default classifier-free guidance scale, >= 0; 0: off (default: 1.5, or the tuned "
                        "program's)")
    p.add_argument("--tuned", metavar="FILE", default=None,
                   help="a tuned program (fewstep tune) served as solver \"tuned\", the default")
    p.add_argument("--quant", choices=QUANT_MODES, default=None,
                   help="quantize the network's linear layers (default: off)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="cpu, or cuda with one GPU per replica (default: cuda if this machine has one)")
    p.add_argument("--max-nfe", type=positive_int_arg, default=50, help="largest nfe a request may ask for")
    p.add_argument("--max-engines", type=positive_int_arg, default=4,
                   help="programs (solver, nfe, guidance) a replica keeps compiled (default: 4)")
    p.add_argument("--max-ongoing", type=positive_int_arg, default=32,
                   help="requests one replica holds at once (default: 32)")
    p.add_argument("--max-queued", type=positive_int_arg, default=64,
                   help="requests waiting for a replica; beyond this: 503 with Retry-After (default: 64)")
    p.add_argument("--timeout-s", type=_positive_float, default=30.0,
                   help="a request not answered in this many seconds gets 504 (default: 30)")
    p.add_argument("--cpus-per-replica", type=_positive_float, default=None,
                   help="Ray CPUs per replica; a CPU replica runs its network on that many threads "
                        "(default: 1)")
    p.add_argument("--num-cpus", type=positive_int_arg, default=None,
                   help="CPUs of the local Ray instance (default: what the replicas need, at least 1)")
    p.add_argument("--print-config", action="store_true",
                   help="write the Serve config YAML for `serve deploy` to stdout and exit")


def _options(args: argparse.Namespace):
    import torch

    import fewstep as fs
    from fewstep.serve import ServeOptions

    solver, nfe, guidance, tuned = _default_program(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    name = args.model
    if args.diffusers is not None:
        if not Path(args.diffusers).is_dir():
            raise FileNotFoundError(f"--diffusers {args.diffusers}: no such directory")
        name = Path(args.diffusers).resolve().name if args.model == "digits" else args.model
    elif args.scheduler_config is not None:
        raise ValueError("--scheduler-config applies only with --diffusers DIR")
    if nfe > args.max_nfe:
        raise ValueError(f"--nfe {nfe} exceeds --max-nfe {args.max_nfe}")
    def resolved(path):
        return None if path is None else str(Path(path).resolve())

    options = ServeOptions(
        model=name, diffusers=resolved(args.diffusers), scheduler_config=resolved(args.scheduler_config),
        solver=solver, nfe=nfe, guidance_scale=guidance, quant=args.quant, tuned=resolved(args.tuned),
        device=device,
        replicas=args.replicas, cpus_per_replica=args.cpus_per_replica or 1.0, max_batch=args.max_batch,
        batch_calls=args.batch_calls, batch_wait_ms=args.batch_wait_ms, max_nfe=args.max_nfe,
        max_engines=args.max_engines, max_ongoing=args.max_ongoing, max_queued=args.max_queued,
        timeout_s=args.timeout_s)
    if args.diffusers is None:  # the program alone (milliseconds): an nfe the solver cannot take fails here
        from fewstep.models import digits

        if tuned is not None:
            fs.load_tuned(args.tuned, spec=digits.digits_spec())  # tuned for this model's spec
        else:
            fs.solvers.build(options.solver, digits.digits_spec(), options.nfe,
                             guidance_scale=options.guidance)
    return options


def _default_program(args: argparse.Namespace):
    """(solver, nfe, guidance_scale, tuned) of a request that names none: the command line's, or the tuned
    program's (whose nfe and guidance are fixed)."""
    import fewstep as fs
    from fewstep.serve.options import TUNED

    if args.tuned is None:
        solver = args.solver or "unipc"
        fs.solvers.get(solver)  # an unknown name lists the valid ones
        return (solver, 8 if args.nfe is None else args.nfe, 1.5 if args.guidance is None else args.guidance,
                None)
    tuned = fs.load_tuned(args.tuned)  # one line naming the file if it is not a tuned file
    g = tuned.program.guidance_scale or 0.0
    if args.solver not in (None, TUNED):
        raise ValueError(f"--solver {args.solver}: with --tuned the default solver is {TUNED!r} (the tuned "
                         f"{tuned.solver} program); other solvers stay available to requests")
    for flag, given, fixed in (("--nfe", args.nfe, tuned.nfe), ("--guidance", args.guidance, g)):
        if given is not None and given != fixed:
            raise ValueError(f"{flag} {given:g}: {args.tuned} was tuned for {flag} {fixed:g}")
    return TUNED, tuned.nfe, g, tuned


def _check_port_free(host: str, port: int) -> None:
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as e:
        raise ValueError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e})") from None


def run(args: argparse.Namespace) -> int:
    options = _options(args)
    if args.print_config:
        import yaml

        from fewstep.serve import serve_config

        sys.stdout.write(yaml.safe_dump(serve_config(options, host=args.host, port=args.port),
                                        sort_keys=False))
        return 0
    if options.device == "cuda":  # a replica asks Ray for one GPU: without them it would never start
        import torch

        from .checks import device as check_device

        check_device("cuda")
        if torch.cuda.device_count() < options.replicas:
            raise ValueError(f"--replicas {options.replicas}: each CUDA replica takes one GPU; this machine "
                             f"has {torch.cuda.device_count()}")
    _check_port_free(args.host, args.port)
    return _serve(options, args.host, args.port, args.num_cpus)


def _serve(options, host: str, port: int, num_cpus: int | None) -> int:
    t0 = time.perf_counter()
    import logging

    import ray
    from ray import serve

    from fewstep.serve.app import build_app
    from fewstep.serve.config import APP_NAME, proxy_timeout_s

    needed = math.ceil(options.replicas * options.cpus_per_replica)
    try:
        context = ray.init(num_cpus=max(num_cpus or 0, needed, 1),
                           num_gpus=None if options.device == "cuda" else 0, include_dashboard=False,
                           object_store_memory=128 * 1024**2, logging_level=logging.WARNING,
                           log_to_driver=False)
    except Exception as e:
        if _RAY_SLOW_START not in str(e):
            raise
        raise RuntimeError("the local Ray instance did not start: Ray gives its node agent 15 s to come up, "
                           "which a machine busy with other work can exceed (see "
                           "/tmp/ray/session_latest/logs/raylet.out); try again when the machine is less "
                           "loaded") from e

    def stop(signum, frame):
        raise KeyboardInterrupt

    # Ctrl-C and SIGTERM stop the server (also when a shell started it with SIGINT ignored, as in a script)
    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # the driver's own "deploying..." lines
    try:
        serve.start(http_options={"host": host, "port": port, "request_timeout_s": proxy_timeout_s(options)},
                    logging_config={"log_level": "WARNING"})
        serve.run(build_app(options), name=APP_NAME, route_prefix="/")
        print(f"fewstep serve: {options.model} on http://{host}:{port} ({options.replicas} replica(s), "
              f"{options.device}, {options.solver} nfe {options.nfe}, max batch {options.max_batch}); ready "
              f"in {time.perf_counter() - t0:.1f} s; Ray at {context.address_info.get('gcs_address')}; "
              f"Ctrl-C stops", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("fewstep serve: stopping", file=sys.stderr, flush=True)
        return 0
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
