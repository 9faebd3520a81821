"""The serving protocol without a server: request checks (every 4xx case), the documented request noise, the
options, the Serve config file, the load client's summary.  No Ray is started here."""

import json
import math

import numpy as np
import pytest
import torch

from fewstep.serve import ServeOptions, serve_config
from fewstep.serve.client import Reply, summarize
from fewstep.serve.protocol import (
    MAX_BODY_BYTES,
    RequestError,
    decode_npy,
    encode_npy,
    parse_sample_request,
    request_noise,
)

SOLVERS = ("unipc", "ddim", "dpmpp_2m_sde")


def parse(body, **kw):
    args = dict(num_classes=10, max_batch=8, max_nfe=50, solvers=SOLVERS, default_solver="unipc",
                default_nfe=8, default_guidance=1.5)
    args.update(kw)
    if not isinstance(body, bytes):
        body = json.dumps(body).encode()
    return parse_sample_request(body, **args)


def test_full_request_and_defaults():
    r = parse({"labels": [0, 9, 3], "seed": 7, "solver": "ddim", "nfe": 4, "guidance_scale": 2.5,
               "format": "png"})
    assert (r.labels, r.seed, r.solver, r.nfe, r.guidance_scale, r.format) == ((0, 9, 3), 7, "ddim", 4, 2.5,
                                                                               "png")
    d = parse({"labels": [1]})
    assert (d.solver, d.nfe, d.guidance_scale, d.format) == ("unipc", 8, 1.5, "npy")
    assert 0 <= d.seed < 2**63  # drawn by the server
    assert parse({"labels": [1], "guidance_scale": 0}).guidance_scale is None  # 0: guidance off
    assert parse({"labels": [1], "guidance_scale": 3}).guidance_scale == 3.0
    assert parse({"labels": [1], "seed": 2**63 - 1}).seed == 2**63 - 1
    assert parse({"labels": [1]}, default_guidance=None).guidance_scale is None
    assert d.plan_key == ("unipc", 8, 1.5)


# (body, words the one-line message must contain)
BAD = [
    (b"{", "malformed JSON"),
    (b"", "malformed JSON"),
    (b"\xff\xfe", "malformed JSON"),
    (b'{"labels": [1], "seed": ' + b"9" * 5000 + b"}", "malformed JSON"),
    ([1, 2], "expected a JSON object"),
    ({"label": [1]}, "unknown field(s) ['label']"),
    ({"seed": 1}, "missing field 'labels'"),
    ({"labels": []}, "labels: expected a non-empty list"),
    ({"labels": 3}, "labels: expected a non-empty list"),
    ({"labels": [1.0]}, "labels: expected a non-empty list of integers"),
    ({"labels": [True]}, "labels: expected a non-empty list of integers"),
    ({"labels": ["1"]}, "labels: expected a non-empty list of integers"),
    ({"labels": [1] * 9}, "at most 8"),
    ({"labels": [10]}, "unknown class label(s) [10]"),
    ({"labels": [-1, 3, 12]}, "unknown class label(s) [-1, 12]"),
    ({"labels": [1], "seed": -1}, "seed: expected an integer in [0, 2**63)"),
    ({"labels": [1], "seed": 2**63}, "seed: expected an integer"),
    ({"labels": [1], "seed": 1.5}, "seed: expected an integer"),
    ({"labels": [1], "seed": "7"}, "seed: expected an integer"),
    ({"labels": [1], "seed": True}, "seed: expected an integer"),
    ({"labels": [1], "solver": "nope"}, "solver: unknown solver \"nope\"; known: ddim, dpmpp_2m_sde, unipc"),
    ({"labels": [1], "solver": 3}, "solver: unknown solver 3"),
    ({"labels": [1], "nfe": 0}, "nfe: expected an integer in 1..50"),
    ({"labels": [1], "nfe": 51}, "nfe: expected an integer in 1..50"),
    ({"labels": [1], "nfe": 4.0}, "nfe: expected an integer"),
    (b'{"labels": [1], "guidance_scale": NaN}',
     "guidance_scale: expected a finite number >= 0 (0: off), got NaN"),
    (b'{"labels": [1], "guidance_scale": Infinity}', "guidance_scale: expected a finite number"),
    (b'{"labels": [1], "guidance_scale": 1e999}', "guidance_scale: expected a finite number"),
    ({"labels": [1], "guidance_scale": -0.5}, "guidance_scale: expected a finite number >= 0"),
    ({"labels": [1], "guidance_scale": "2"}, "guidance_scale: expected a finite number"),
    ({"labels": [1], "guidance_scale": False}, "guidance_scale: expected a finite number"),
    ({"labels": [1], "format": "jpeg"}, "format: expected one of ['npy', 'png']"),
]


@pytest.mark.parametrize("body,says", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_request_is_400_with_one_line(body, says):
    with pytest.raises(RequestError) as e:
        parse(body)
    assert e.value.status == 400
    msg = str(e.value)
    assert says in msg, msg
    assert "\n" not in msg and len(msg) < 400


def test_oversized_body_is_413_and_png_only_where_offered():
    with pytest.raises(RequestError) as e:
        parse(b"{" + b" " * MAX_BODY_BYTES + b"}")
    assert e.value.status == 413 and str(MAX_BODY_BYTES) in str(e.value)
    with pytest.raises(RequestError, match=r"format: expected one of \['npy'\]"):
        parse({"labels": [1], "format": "png"}, formats=("npy",))


def test_request_noise_is_the_documented_formula():
    """The noise a client rebuilds from the docs: randn((len(labels), *sample_shape)) from a seeded CPU
    generator, float32 (the oracle here is that formula written out, with numbers checked by hand once)."""
    x = request_noise(3, (1, 8, 8), 1234)
    g = torch.Generator().manual_seed(1234)
    assert x.dtype == torch.float32 and x.shape == (3, 1, 8, 8)
    assert torch.equal(x, torch.randn((3, 1, 8, 8), generator=g))
    assert not torch.equal(x, request_noise(3, (1, 8, 8), 1235))
    # torch.randn fills rows in order: a longer request with the same seed starts with the same rows
    assert torch.equal(request_noise(5, (1, 8, 8), 1234)[:3], x)


def test_npy_round_trip_and_no_pickles():
    x = torch.randn(2, 1, 8, 8)
    a = decode_npy(encode_npy(x))
    assert a.dtype == np.float32 and np.array_equal(a, x.numpy())
    import io

    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError):
        decode_npy(buf.getvalue())


def test_options_defaults_checks_and_round_trip():
    o = ServeOptions()
    got = (o.model, o.solver, o.nfe, o.guidance, o.max_batch, o.device)
    assert got == ("digits", "unipc", 8, 1.5, 8, "cpu")
    assert ServeOptions(guidance_scale=0).guidance is None
    args = ServeOptions(replicas=2, max_batch=4, quant="fp8-emulated").to_args()
    json.dumps(args)  # plain data: travels in a Serve config file
    assert ServeOptions.from_args(args) == ServeOptions(replicas=2, max_batch=4, quant="fp8-emulated")
    assert ServeOptions.from_args(None) == ServeOptions()
    with pytest.raises(ValueError, match=r"unknown fewstep serve option\(s\) \['max_batchh'\]"):
        ServeOptions.from_args({"max_batchh": 4})


@pytest.mark.parametrize("field,value,says", [
    ("model", "sd15", "ServeOptions.model: expected one of ('digits',)"),
    ("nfe", 0, "ServeOptions.nfe: expected an int >= 1, got 0"),
    ("nfe", 60, "exceeds max_nfe 50"),
    ("max_batch", True, "ServeOptions.max_batch: expected an int >= 1, got True"),
    ("replicas", 1.5, "ServeOptions.replicas"),
    ("guidance_scale", math.nan, "ServeOptions.guidance_scale: expected a finite number >= 0"),
    ("guidance_scale", -1, "ServeOptions.guidance_scale"),
    ("timeout_s", 0, "ServeOptions.timeout_s: expected a finite number > 0"),
    ("cpus_per_replica", 0, "ServeOptions.cpus_per_replica"),
    ("batch_wait_ms", -1, "ServeOptions.batch_wait_ms"),
    ("quant", "int3", "ServeOptions.quant"),
    ("device", "tpu", "ServeOptions.device: expected one of ('cpu', 'cuda')"),
    ("scheduler_config", "s.json", "scheduler_config applies only with a diffusers directory"),
    ("solver", "", "ServeOptions.solver: expected a non-empty string"),
])
def test_options_reject_bad_fields(field, value, says):
    with pytest.raises(ValueError) as e:
        ServeOptions(**{field: value})
    assert says in str(e.value), str(e.value)


def test_serve_config_file():
    o = ServeOptions(replicas=3, timeout_s=10.5)
    cfg = serve_config(o, host="0.0.0.0", port=9000)
    assert cfg["http_options"] == {"host": "0.0.0.0", "port": 9000, "request_timeout_s": 13.0}
    (app,) = cfg["applications"]
    assert app["import_path"] == "fewstep.serve.app:app_builder"
    assert ServeOptions.from_args(app["args"]) == o
    schema = pytest.importorskip("ray.serve.schema")  # Ray's own validator of `serve deploy` files
    parsed = schema.ServeDeploySchema.model_validate(cfg)
    assert parsed.applications[0].args["replicas"] == 3


def test_summarize_percentiles():
    replies = [Reply(200, {}, b"", s / 1000, started=float(i)) for i, s in enumerate(range(1, 101))]
    replies.append(Reply(503, {}, b"", 0.001, started=0.5))
    replies.append(None)  # not sent before the deadline
    s = summarize(replies)
    assert s["statuses"] == {"200": 100, "503": 1} and s["sent"] == 101 and s["requests"] == 102
    ok = np.arange(1, 101, dtype=float)
    assert s["p50_ms"] == pytest.approx(np.percentile(ok, 50))
    assert s["p99_ms"] == pytest.approx(np.percentile(ok, 99))
    assert s["wall_s"] == pytest.approx(99 + 0.1)  # first start 0.0, last end 99 + 100 ms
