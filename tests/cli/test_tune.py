"""``fewstep tune`` / ``fewstep sample --tuned``: argument errors come before any model work; a tuned file
drives the sample command's solver, NFE and grid."""

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
    (["--samples", "3", "--out", "t.json"], "expected an integer >= 4, got 3"),
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
