"""``fewstep serve`` arguments: --print-config and every argument error, checked before Ray starts.
(The command serving for real is tests/serve/test_server.py.)"""

import socket

import pytest

from fewstep import cli
from fewstep.cli import serve as serve_cmd
from fewstep.serve import ServeOptions


@pytest.fixture
def no_ray(monkeypatch):
    def started(*a, **k):
        raise AssertionError("Ray started before the arguments were checked")

    monkeypatch.setattr(serve_cmd, "_serve", started)


def test_print_config_is_a_serve_deploy_file(capsys, no_ray):
    yaml = pytest.importorskip("yaml")
    argv = ["serve", "--print-config", "--host", "0.0.0.0", "--port", "8100", "--replicas", "3",
            "--max-batch", "16", "--batch-wait-ms", "2", "--solver", "ddim", "--nfe", "6", "--guidance", "0",
            "--device", "cuda", "--max-queued", "10", "--timeout-s", "20"]
    assert cli.main(argv) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["http_options"] == {"host": "0.0.0.0", "port": 8100, "request_timeout_s": 22.0}
    (app,) = cfg["applications"]
    want = ServeOptions(solver="ddim", nfe=6, guidance_scale=0, device="cuda", replicas=3, max_batch=16,
                        batch_wait_ms=2, max_queued=10, timeout_s=20)
    assert ServeOptions.from_args(app["args"]) == want
    schema = pytest.importorskip("ray.serve.schema")
    schema.ServeDeploySchema.model_validate(cfg)
    from fewstep.serve.app import app_builder, deployment_options  # imports Ray; starts nothing

    assert deployment_options(want)["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 1}
    built = app_builder(app["args"])
    assert type(built).__name__ == "Application"


def _port_in_use():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    return s


@pytest.mark.parametrize("argv,says", [
    (["--solver", "warp"], "unknown solver 'warp'"),
    (["--nfe", "60"], "--nfe 60 exceeds --max-nfe 50"),
    (["--nfe", "1001", "--max-nfe", "2000"], "1001"),
    (["--scheduler-config", "s.json"], "--scheduler-config applies only with --diffusers DIR"),
    (["--diffusers", "/no/such/dir"], "--diffusers /no/such/dir: no such directory"),
    (["--model", "sd15"], "ServeOptions.model: expected one of ('digits',)"),
    (["--max-batch", "0"], "--max-batch"),
    (["--timeout-s", "nan"], "--timeout-s"),
    (["--guidance", "-1"], "--guidance"),
    (["--device", "tpu"], "--device"),
    (["--quant", "int3"], "--quant"),
    pytest.param(["--device", "cuda"], "CUDA is not available", marks=pytest.mark.skipif(
        __import__("torch").cuda.is_available(), reason="a machine without CUDA")),
])
def test_argument_errors_are_one_line_before_ray(capsys, no_ray, argv, says):
    try:
        rc = cli.main(["serve", *argv])
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("fewstep serve: error:") and says in err, err


def test_port_in_use_fails_before_ray(capsys, no_ray):
    with _port_in_use() as s:
        port = s.getsockname()[1]
        assert cli.main(["serve", "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"--port {port}: cannot listen there" in err and "\n" not in err
