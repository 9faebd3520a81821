"""``fewstep serve --tuned FILE``: the tuned program is solver "tuned" (the default), at its own nfe and
guidance only; its samples are those of ``fs.compile(..., solver=tuned)``.  No Ray: the Serve side is the
same EngineCache / run_jobs path tests/serve/test_batching.py covers, and the command line is checked before
Ray starts."""

import pytest
import torch

import fewstep as fs
from fewstep import cli
from fewstep.cli import serve as serve_cmd
from fewstep.models import digits
from fewstep.serve import SampleRequest, ServeOptions, request_noise
from fewstep.serve.batching import Job, run_jobs
from fewstep.serve.models import EngineCache, load_served_model
from fewstep.solvers import Tuned, program_to_dict

NFE, GUIDANCE = 5, 1.5


@pytest.fixture(scope="module")
def tuned_file(tmp_path_factory):
    # a grid other than dpmpp_2m's default, so that serving the default program instead would show
    prog = fs.solvers.build("dpmpp_2m", digits.digits_spec(), NFE, "karras", guidance_scale=GUIDANCE)
    path = tmp_path_factory.mktemp("tuned") / "t.json"
    Tuned(prog, "dpmpp_2m", NFE, "timesteps", True, {}).save(path)
    return path


@pytest.fixture(scope="module")
def served():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_served_model(ServeOptions())
    torch.set_num_threads(n)


def test_tuned_requests_sample_the_tuned_program(served, tuned_file):
    tuned = fs.load_tuned(tuned_file)
    opts = ServeOptions(solver="tuned", nfe=NFE, guidance_scale=GUIDANCE, tuned=str(tuned_file), max_batch=4)
    engines = EngineCache(served, opts)
    assert "tuned" in engines.solvers and "dpmpp_2m" in engines.solvers
    engine = engines.get("tuned", NFE, GUIDANCE)
    assert program_to_dict(engine.program) == program_to_dict(tuned.program)
    jobs = [Job(SampleRequest(tuple(y), seed, "tuned", NFE, GUIDANCE, "npy"), engine,
                request_noise(len(y), (1, 8, 8), seed), torch.tensor(y))
            for y, seed in (([3, 1], 7), ([5], 8))]
    results = run_jobs(jobs, max_batch=4)
    assert results[0].batch_requests == 2  # merged into one plan call
    for j, r in zip(jobs, results):
        cond = {"class_labels": j.labels}
        plan = fs.compile(served.model, served.spec, solver=tuned, nfe=NFE, guidance_scale=GUIDANCE,
                          shape=tuple(j.noise.shape), cond=cond)
        want = plan(j.noise, **cond)
        assert float((r.samples - want).abs().max() / want.abs().max()) <= 1e-5  # as in test_batching.py
        default = fs.compile(served.model, served.spec, solver="dpmpp_2m", nfe=NFE, guidance_scale=GUIDANCE,
                             shape=tuple(j.noise.shape), cond=cond)(j.noise, **cond)
        assert float((default - want).abs().max() / want.abs().max()) > 1e-2


def test_tuned_at_another_nfe_or_guidance_is_refused(served, tuned_file):
    engines = EngineCache(served, ServeOptions(solver="tuned", nfe=NFE, guidance_scale=GUIDANCE,
                                               tuned=str(tuned_file)))
    for nfe, g in ((NFE + 1, GUIDANCE), (NFE, 3.0), (NFE, None)):
        with pytest.raises(ValueError, match=r"the tuned program runs nfe=5, guidance_scale=1.5"):
            engines.get("tuned", nfe, g)
    with pytest.raises(ValueError, match="no tuned program"):
        EngineCache(served, ServeOptions()).get("tuned", NFE, GUIDANCE)
    with pytest.raises(ValueError, match="'tuned' needs a tuned file"):
        ServeOptions(solver="tuned")


def test_a_file_tuned_for_another_spec_fails_the_replica(served, tmp_path):
    flow = fs.ModelSpec(fs.schedules.Flow(), prediction="flow")
    path = tmp_path / "flow.json"
    Tuned(fs.solvers.build("euler", flow, 4), "euler", 4, "timesteps", True, {}).save(path)
    with pytest.raises(fs.solvers.TunedFileError, match="tuned for"):
        EngineCache(served, ServeOptions(solver="tuned", nfe=4, guidance_scale=0, tuned=str(path)))


@pytest.fixture
def no_ray(monkeypatch):
    def started(*a, **k):
        raise AssertionError("Ray started before the arguments were checked")

    monkeypatch.setattr(serve_cmd, "_serve", started)


def test_print_config_carries_the_tuned_default(capsys, no_ray, tuned_file):
    yaml = pytest.importorskip("yaml")
    assert cli.main(["serve", "--print-config", "--tuned", str(tuned_file)]) == 0
    args = yaml.safe_load(capsys.readouterr().out)["applications"][0]["args"]
    assert ServeOptions.from_args(args) == ServeOptions(solver="tuned", nfe=NFE, guidance_scale=GUIDANCE,
                                                        tuned=str(tuned_file.resolve()))


@pytest.mark.parametrize("extra,says", [
    (["--solver", "ddim"], "with --tuned the default solver is 'tuned'"),
    (["--nfe", "6"], "was tuned for --nfe 5"),
    (["--guidance", "2"], "was tuned for --guidance 1.5"),
])
def test_conflicting_defaults_are_one_line_errors(capsys, no_ray, tuned_file, extra, says):
    assert cli.main(["serve", "--tuned", str(tuned_file), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("fewstep serve: error:") and says in err, err


def test_not_a_tuned_file(capsys, no_ray, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    assert cli.main(["serve", "--tuned", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "not a fewstep tuned-solver file" in err, err
