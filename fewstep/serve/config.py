"""The Serve config file of a fewstep application (``fewstep serve --print-config``): for a cluster, run
``ray start --head`` on one machine (``ray start --address HEAD:6379`` on the others) and
``serve deploy fewstep.yaml`` with it.  No Ray here.
"""

from __future__ import annotations

import math
from typing import Any

from .options import ServeOptions

__all__ = ["serve_config", "proxy_timeout_s", "APP_IMPORT_PATH", "APP_NAME", "PROXY_TIMEOUT_SLACK_S"]

APP_IMPORT_PATH = "fewstep.serve.app:app_builder"
APP_NAME = "fewstep"
# The proxy's own timeout is the replica's plus this: a replica answers 504 first; the proxy's 408 covers
# time spent waiting for a replica and a replica that cannot answer at all.
PROXY_TIMEOUT_SLACK_S = 2.0


def proxy_timeout_s(options: ServeOptions) -> float:
    """The HTTP proxy's ``request_timeout_s`` for ``options``."""
    return float(math.ceil(options.timeout_s + PROXY_TIMEOUT_SLACK_S))


def serve_config(options: ServeOptions, *, host: str = "0.0.0.0", port: int = 8000) -> dict[str, Any]:
    """A Serve config (``serve deploy`` schema) running ``options`` behind a proxy on every node.  The
    deployment's replicas, request bounds and resources come from ``args`` (see
    ``fewstep.serve.app.deployment_options``); a ``deployments:`` entry in the file overrides them."""
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": host, "port": port, "request_timeout_s": proxy_timeout_s(options)},
        "applications": [{
            "name": APP_NAME,
            "route_prefix": "/",
            "import_path": APP_IMPORT_PATH,
            "args": options.to_args(),
        }],
    }
