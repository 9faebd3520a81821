"""``fewstep accuracy`` on a tiny setting: the table, the PNG and the markdown exist, numbers are finite and
equal to a closed-form oracle (one Gaussian, Euler written out)."""

from __future__ import annotations

import math
import re

import pytest
import torch

import fewstep as fs
from fewstep.cli import accuracy

TINY = dict(samples=6, dim=3, seed=2)


def _cells(text: str, solver: str, impl: str = "fewstep") -> list[str]:
    for line in text.splitlines():
        parts = line.split()
        if impl == "fewstep" and parts[:1] == [solver] and "fewstep" in parts:
            return parts[parts.index("fewstep") + 1 :]
    raise AssertionError(f"no {impl} row for {solver} in:\n{text}")


def test_cli_writes_table_png_and_markdown(tmp_path, capsys):
    png, md = tmp_path / "acc.png", tmp_path / "acc.md"
    rc = accuracy.main(
        [
            "--solvers",
            "euler,heun",
            "--nfe",
            "4,5",
            "--samples",
            "6",
            "--dim",
            "3",
            "--spacings",
            "karras,linspace",
            "--out",
            str(png),
            "--markdown",
            str(md),
        ]
    )
    out = capsys.readouterr()
    assert rc == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    text = md.read_text()
    assert "| euler |" in text and "| heun |" in text
    assert "best spacing" in out.err or "[1/2]" in out.err  # progress lines on stderr
    euler = _cells(out.out, "euler")
    assert all(math.isfinite(float(v)) and float(v) > 0 for v in euler[:2])
    heun = _cells(out.out, "heun")
    assert heun[0] == "-" and math.isfinite(float(heun[1]))  # heun cannot do an even NFE


def _euler_on_one_gaussian(sigmas, mu, v, noise):
    """Euler in k-diffusion space (y = x / alpha, dy/dsigma = E[eps | y]) on data N(mu, diag(v)), written out:
    E[eps | y] = sigma (y - mu) / (v + sigma^2).  Starts from pure noise at sigmas[0] (x = sigma_0 * noise,
    so y = sigma_tilde_0 * noise) and ends at sigma = 0.  Returns (sample, exact ODE endpoint): along the
    probability-flow ODE of one Gaussian, (y - mu) / sqrt(v + sigma^2) is constant."""
    y = sigmas[0] * noise
    y0 = y
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        y = y + (s_next - s) * s * (y - mu) / (v + s * s)
    exact = mu + torch.sqrt(v / (v + sigmas[0] ** 2)) * (y0 - mu)
    return y, exact


def test_table_numbers_match_a_closed_form_gaussian_oracle():
    """With one mixture component every cell of the euler row has a closed form: a hand-written Euler loop
    on the Gaussian's exact denoiser against the exact ODE endpoint, RMS over every element."""
    table = accuracy.accuracy_table(
        None, (4, 6), solvers=["euler"], spacings=["karras", "linspace"], compare_diffusers=False,
        components=1, **TINY
    )
    row = table.rows[0]
    mu = torch.as_tensor(table.gmm.means[0], dtype=torch.float64)
    v = torch.as_tensor(table.gmm.variances[0], dtype=torch.float64)
    for n, err in row.errors.items():
        prog = fs.solvers.build("euler", table.spec, n, spacing=row.spacing)  # the grid the cell used
        sigmas = [c.point.sigma_tilde for c in prog.calls] + [0.0]
        x, exact = _euler_on_one_gaussian(sigmas, mu, v, table.noise)
        want = float(((x - exact) ** 2).mean().sqrt())
        assert math.isfinite(err) and err == pytest.approx(want, rel=1e-9), (n, err, want)
    # the chosen spacing is the best of the eligible ones it tried
    assert row.tried[row.spacing] == min(row.tried[s] for s in row.tried if s != "leading")
    assert "diffusers column: disabled" in accuracy.format_text(table)


def test_diffusers_column_matches_fewstep_where_parity_holds():
    pytest.importorskip("diffusers")
    table = accuracy.accuracy_table(
        None, (4, 5, 8), solvers=["euler", "dpmpp_2m"], spacings=["karras", "linspace"], **TINY
    )
    for row in table.rows:
        assert row.diffusers_name is not None, row.diffusers_note
        for n in (4, 5, 8):
            ours, theirs = row.errors[n], row.diffusers_errors[n]
            assert theirs is not None and math.isfinite(theirs)
            assert theirs == pytest.approx(ours, rel=1e-4, abs=1e-7)


def test_diffusers_compared_at_the_best_spacing_it_can_run():
    """AYS has no diffusers config: the row then carries a second pair at the best spacing diffusers runs."""
    pytest.importorskip("diffusers")
    table = accuracy.accuracy_table(None, (4, 6), solvers=["euler"], spacings=["ays", "karras"], **TINY)
    row = table.rows[0]
    pair = row.alt if row.spacing == "ays" else row
    assert pair is not None and pair.spacing == "karras"
    for n in (4, 6):
        assert pair.diffusers_errors[n] == pytest.approx(pair.errors[n], rel=1e-4)
    if row.spacing == "ays":
        assert all(v is None for v in row.diffusers_errors.values())
        assert (
            "no config for spacing 'ays'" in row.diffusers_note
        )  # to_diffusers refuses, never runs linspace
        assert "the best spacing diffusers can run" in accuracy.format_text(table)


def test_diffusers_cell_is_rejected_when_diffusers_runs_another_grid():
    """A diffusers run on other timesteps than the program's gives '-' with the reason, not a number."""
    pytest.importorskip("diffusers")
    spec = accuracy.default_spec("vp")
    prog = fs.solvers.build("euler", spec, 5, spacing="karras")
    gmm = fs.solvers.gmm.GaussianMixture.random(d=3, k=2, seed=0)
    noise = torch.randn(4, 3, dtype=torch.float64)
    ref = gmm.ode_reference(prog, noise)
    wrong = [t + 10.0 for t in prog.timesteps]
    with pytest.raises(ValueError, match="other timesteps"):
        accuracy.diffusers_error("euler", spec, "karras", 5, gmm, noise, ref, expect_times=wrong)
    err = accuracy.diffusers_error("euler", spec, "karras", 5, gmm, noise, ref, expect_times=prog.timesteps)
    assert math.isfinite(err) and err > 0


def test_leading_spacing_is_not_chosen_for_its_shorter_path():
    """'leading' starts lower at low NFE (a shorter ODE path): it is not eligible for 'best spacing'."""
    table = accuracy.accuracy_table(
        None, (4,), solvers=["euler"], spacings=["leading", "linspace"], compare_diffusers=False, **TINY
    )
    assert table.rows[0].spacing == "linspace"


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="not deterministic"):
        accuracy.accuracy_table(None, (4,), solvers=["no_such_solver"], compare_diffusers=False)
    with pytest.raises(ValueError, match="do not fit"):
        accuracy.accuracy_table(None, (4,), solvers=["euler"], spacings=["flow"], compare_diffusers=False)
    with pytest.raises(ValueError, match="NFE"):
        accuracy.accuracy_table(None, (0,), solvers=["euler"], compare_diffusers=False)
    with pytest.raises(ValueError, match="schedule"):
        accuracy.default_spec("ddpm")


def test_fewstep_cli_dispatches_to_accuracy(tmp_path, capsys):
    from fewstep import cli

    png = tmp_path / "a.png"
    rc = cli.main(
        [
            "accuracy",
            "--solvers",
            "euler",
            "--nfe",
            "4",
            "--samples",
            "4",
            "--dim",
            "2",
            "--spacings",
            "karras",
            "--no-diffusers",
            "--quiet",
            "--out",
            str(png),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and png.exists()
    assert re.search(r"euler\s+karras\s+fewstep\s+\d\.\d\de-\d\d", out)


def test_missing_diffusers_prints_dashes_and_why(tmp_path, capsys, monkeypatch):
    """Without diffusers (an optional dependency) the table still comes out, with the reason stated."""
    monkeypatch.setitem(__import__("sys").modules, "diffusers", None)  # makes `import diffusers` fail
    png = tmp_path / "a.png"
    rc = accuracy.main(
        solvers=["euler"], nfe=[4, 5], samples=4, dim=2, spacings=["karras"], out=str(png), quiet=True
    )
    out = capsys.readouterr().out
    assert rc == 0 and png.exists()
    assert "diffusers column: diffusers is not importable" in out
    assert "diffusers  " not in out  # no diffusers rows


def test_outputs_are_checked_before_the_table(tmp_path, monkeypatch):
    """An unwritable --out or --markdown fails at once, not after minutes of computing the table."""

    def table(*a, **k):
        raise AssertionError("the table was computed before the outputs were checked")

    monkeypatch.setattr(accuracy, "accuracy_table", table)
    with pytest.raises(ValueError, match="--markdown .*does not exist"):
        accuracy.main(["--out", str(tmp_path / "a.png"), "--markdown", str(tmp_path / "no" / "a.md")])
    with pytest.raises(ValueError, match="--out .*is a directory"):
        accuracy.main(["--out", str(tmp_path)])
    assert not list(tmp_path.iterdir())
