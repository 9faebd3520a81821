"""``fewstep tune`` / ``fewstep sample --tuned``: argument errors come before any model work; a tuned file
drives the sample command's solver, NFE and grid."""

import json

import pytest

import fewstep as fs
from fewstep import cli
from fewstep.models import digits


def _error(capsys, argv) -> str:
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse's own type errors
        code = e.code
    assert code == 2
    return capsys.readouterr().err


def test_tune_help(capsys):
    with pytest.raises(SystemExit):
        cli.main(["tune", "--help"])
    assert "--budget" in capsys.readouterr().out


@pytest.mark.parametrize("argv, msg", [
    (["--nfe", "1", "--out", "t.json"], "expected an integer >= 2, got 1"),
    (["--method", "magic", "--out", "t.json"], "--method must be one of auto, timesteps"),
    (["--out", "t.txt"], "expected a file name ending in .json"),
    (["--solver", "nope", "--out", "t.json"], "nope"),
    (["--samples", "7", "--out", "t.json"], "expected an integer >= 8, got 7"),
])
def test_tune_bad_arguments(argv, msg, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert msg in _error(capsys, ["tune", *argv])


def _tuned_file(tmp_path, spec, solver="dpmpp_2m"):
    prog = fs.solvers.build(solver, spec, 4, fs.solvers.Spacing("timesteps", values=[999, 600, 250, 20]),
                            guidance_scale=1.5)
    path = tmp_path / "t.json"
    fs.Tuned(prog, solver, 4, "timesteps", True, {"holdout_before": 1.0, "holdout_after": 0.5}).save(path)
    return path


def test_sample_refuses_a_tuned_file_for_another_model(capsys, tmp_path):
    other = fs.ModelSpec(fs.schedules.DiscreteVP(beta_schedule="scaled_linear"))
    path = _tuned_file(tmp_path, other)
    err = _error(capsys, ["sample", "--tuned", str(path), "--out", str(tmp_path / "x.png"),
                          "--device", "cpu"])
    assert "t.json: tuned for" in err and "scaled_linear" in err


def test_sample_with_a_tuned_file(capsys, tmp_path):
    pytest.importorskip("diffusers")
    path = _tuned_file(tmp_path, digits.digits_spec())
    out = tmp_path / "x.png"
    assert cli.main(["sample", "--tuned", str(path), "--labels", "3,7", "--out", str(out), "--device",
                     "cpu"]) == 0
    text = capsys.readouterr().out
    assert out.stat().st_size > 0 and "NFE 4" in text and "t.json" in text


def test_accuracy_tuned_rows_beat_the_best_fixed_spacing():
    from fewstep.cli import accuracy

    table = accuracy.accuracy_table(nfes=[4, 6], solvers=["dpmpp_2m"], spacings=["karras", "linspace"],
                                    samples=32, compare_diffusers=False)
    tuned = accuracy.tuned_rows(table, samples=32)
    row = table.rows[0]
    for n in (4, 6):  # both measured on the table's noise against the exact ODE endpoint
        assert tuned["dpmpp_2m"][n] < row.errors[n]
    text = accuracy.format_tuned(table, tuned)
    assert "tuned" in text and row.spacing in text


def test_tune_flags_for_a_diffusers_dir_need_one(capsys, tmp_path):
    err = _error(capsys, ["tune", "--cond", "c.npz", "--out", str(tmp_path / "t.json")])
    assert "--cond: only with --diffusers DIR" in err


def test_tune_a_local_dit_pipeline_end_to_end(capsys, tmp_path):
    pytest.importorskip("diffusers")
    from .test_cli import _tiny_dit_pipeline  # a tiny DiT built here and saved to disk: nothing is downloaded

    pipe = tmp_path / "pipe"
    _tiny_dit_pipeline(pipe)
    # a schedule other than the bundled model's, so a file tuned for the wrong model cannot pass as this one's
    sched_file = pipe / "scheduler" / "scheduler_config.json"
    cfg = json.loads(sched_file.read_text())
    sched_file.write_text(json.dumps({**cfg, "beta_schedule": "scaled_linear"}))
    out = tmp_path / "t.json"
    assert cli.main(["tune", "--diffusers", str(pipe), "--solver", "dpmpp_2m", "--nfe", "3", "--samples", "8",
                     "--teacher-nfe", "8", "--budget", "12", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "wrote" in text and "held-out" in text
    from fewstep.cli.diffusers_dir import load_diffusers_dir

    net, sched, _ = load_diffusers_dir(pipe, None, "cpu")
    model, spec = fs.models.from_diffusers(net, sched)
    assert spec != digits.digits_spec()
    tuned = fs.load_tuned(out, spec=spec, solver="dpmpp_2m")  # tuned for this directory's schedule
    r = tuned.report
    assert tuned.nfe == 3 and r["calibration_samples"] + r["holdout_samples"] == 8
    # teacher, untuned calibration error, budget, held-out error before / after
    assert r["network_calls"] <= 8 + 3 + 12 + 2 * 3
    base = fs.solvers.build("dpmpp_2m", spec, 3, guidance_scale=1.5)
    if tuned.improved:
        assert list(tuned.program.timesteps) == r["timesteps_after"] != list(base.timesteps)
    else:
        assert list(tuned.program.timesteps) == list(base.timesteps)
    import torch

    plan = fs.compile(model, spec, solver=tuned, nfe=3, shape=(2, 4, 8, 8), guidance_scale=1.5,
                      cond={"class_labels": torch.tensor([1, 7])})
    assert torch.isfinite(plan(torch.randn(2, 4, 8, 8), class_labels=torch.tensor([1, 7]))).all()
    # a class-conditional DiT takes no --cond; a bare model directory needs its scheduler config
    import numpy as np

    np.savez(tmp_path / "c.npz", encoder_hidden_states=np.zeros((1, 3, 8), np.float32))
    err = _error(capsys, ["tune", "--diffusers", str(pipe), "--cond", str(tmp_path / "c.npz"),
                          "--out", str(tmp_path / "u.json")])
    assert "DiTTransformer2DModel is class-conditional" in err
    err = _error(capsys, ["tune", "--diffusers", str(pipe / "transformer"), "--out",
                          str(tmp_path / "u.json")])
    assert "needs --scheduler-config" in err


def test_sample_a_local_dit_pipeline_with_its_tuned_file(capsys, tmp_path):
    """``fewstep sample --diffusers DIR --tuned FILE`` gives the latents of the plan built from that file
    directly (the same seed's noise); a file tuned for another schedule is refused."""
    pytest.importorskip("diffusers")
    import torch
    from safetensors.torch import load_file

    from fewstep.cli.diffusers_dir import load_diffusers_dir

    from .test_cli import _tiny_dit_pipeline

    pipe = tmp_path / "pipe"
    _tiny_dit_pipeline(pipe)
    net, sched, _ = load_diffusers_dir(pipe, None, "cpu")
    model, spec = fs.models.from_diffusers(net, sched)
    path = _tuned_file(tmp_path, spec)  # dpmpp_2m, NFE 4, guidance 1.5 on the timesteps 999, 600, 250, 20
    out = tmp_path / "x.png"
    assert cli.main(["sample", "--diffusers", str(pipe), "--tuned", str(path), "--labels", "1,7",
                     "--seed", "3", "--out", str(out), "--device", "cpu"]) == 0
    assert "tuned dpmpp_2m" in capsys.readouterr().out
    got = load_file(str(out.with_suffix(".safetensors")))["latents"]
    labels = torch.tensor([1, 7])
    plan = fs.compile(model, spec, solver=fs.load_tuned(path), nfe=4, shape=tuple(got.shape),
                      guidance_scale=1.5, cond={"class_labels": labels})
    want = plan(torch.randn(got.shape, generator=torch.Generator().manual_seed(3)), class_labels=labels)
    assert torch.equal(got, want)  # the same program, network and noise in the same process
    (tmp_path / "o").mkdir()
    other = _tuned_file(tmp_path / "o", fs.ModelSpec(fs.schedules.DiscreteVP(beta_schedule="scaled_linear")))
    err = _error(capsys, ["sample", "--diffusers", str(pipe), "--tuned", str(other), "--labels", "1",
                          "--out", str(tmp_path / "y.png"), "--device", "cpu"])
    assert "tuned for" in err


def test_tune_the_bundled_model_end_to_end(capsys, tmp_path):
    pytest.importorskip("diffusers")
    pytest.importorskip("matplotlib")
    out, plot = tmp_path / "t.json", tmp_path / "t.png"
    assert cli.main(["tune", "--solver", "unipc", "--nfe", "3", "--samples", "8", "--teacher-nfe", "8",
                     "--budget", "9", "--out", str(out), "--plot", str(plot)]) == 0
    text = capsys.readouterr().out
    tuned = fs.load_tuned(out, spec=digits.digits_spec(), solver="unipc")
    assert tuned.nfe == 3 and tuned.program.guidance_scale == 1.5 and tuned.report["budget"] == 9
    r = tuned.report
    assert f"{r['holdout_before']:10.4g}" in text and f"{r['holdout_after']:10.4g}" in text
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
