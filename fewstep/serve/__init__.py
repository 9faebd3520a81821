"""fewstep.serve: serving plans over HTTP on Ray Serve (the ``serve`` extra: ``pip install fewstep[serve]``).

``fewstep serve --model digits`` starts a local Ray instance and serves; ``build_app(ServeOptions(...))`` is
the Serve application for ``serve.run``; ``fewstep serve --print-config`` writes the Serve config file of a
cluster.  The API (``POST /v1/sample``, ``GET /healthz``, ``GET /v1/models``) is described in
:mod:`fewstep.serve.protocol` and :mod:`fewstep.serve.app`.

Ray is imported only by :mod:`fewstep.serve.app` (``build_app``, ``app_builder``): the options, the request
protocol, the batching and the config file work without it.
"""

from .config import serve_config
from .options import ServeOptions
from .protocol import RequestError, SampleRequest, decode_npy, parse_sample_request, request_noise

__all__ = ["ServeOptions", "serve_config", "request_noise", "decode_npy", "parse_sample_request",
           "SampleRequest", "RequestError", "build_app", "app_builder"]


def __getattr__(name):
    if name in ("build_app", "app_builder"):
        from . import app

        return getattr(app, name)
    raise AttributeError(f"module 'fewstep.serve' has no attribute {name!r}")
