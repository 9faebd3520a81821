"""The `fewstep` command: help on every subcommand, the solver listing, `sample` with local diffusers dirs,
and errors: every one is a single line on stderr with a non-zero exit status, raised before expensive work."""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from fewstep import cli
from fewstep.cli import checks

diffusers = pytest.importorskip("diffusers")


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in ("demo", "sample", "bench", "accuracy", "solvers"):
        assert name in out


@pytest.mark.parametrize("name", ["demo", "sample", "bench", "accuracy", "solvers"])
def test_subcommand_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([name, "--help"])
    assert e.value.code == 0
    assert "usage: fewstep " + name in capsys.readouterr().out


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_solvers_lists_registry(capsys):
    import fewstep as fs

    assert cli.main(["solvers"]) == 0
    out = capsys.readouterr().out
    for name in fs.solvers.available():
        assert name in out
    assert cli.main(["solvers", "dpmpp_2m", "--nfe", "3"]) == 0
    assert "call 2" in capsys.readouterr().out


def test_unknown_solver_is_a_clean_error(capsys):
    assert cli.main(["solvers", "nope"]) == 2
    assert "valid solvers" in capsys.readouterr().err


def _tiny_dit_pipeline(root):
    torch.manual_seed(0)
    dit = diffusers.DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=1,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=10,
        norm_type="ada_norm_zero",
    )
    dit.save_pretrained(root / "transformer")
    vae = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        norm_num_groups=4,
        sample_size=8,
    )
    vae.save_pretrained(root / "vae")
    diffusers.DDIMScheduler(beta_schedule="linear").save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "DiTPipeline"}))


def test_sample_local_dit_pipeline(tmp_path, capsys):
    _tiny_dit_pipeline(tmp_path / "pipe")
    out = tmp_path / "img.png"
    rc = cli.main(
        [
            "sample",
            "--diffusers",
            str(tmp_path / "pipe"),
            "--labels",
            "1,7",
            "--nfe",
            "3",
            "--solver",
            "dpmpp_2m",
            "--out",
            str(out),
            "--device",
            "cpu",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lat = load_file(out.with_suffix(".safetensors"))["latents"]
    assert lat.shape == (2, 4, 8, 8) and torch.isfinite(lat).all()
    from PIL import Image

    img = Image.open(out)
    assert img.mode == "RGB" and img.size == (2 * 8, 8)  # two decoded 8x8 images side by side (one-block VAE)


def test_sample_rejects_unknown_label_and_bad_dirs(tmp_path, capsys):
    _tiny_dit_pipeline(tmp_path / "pipe")
    assert (
        cli.main(["sample", "--diffusers", str(tmp_path / "pipe"), "--labels", "10", "--device", "cpu"]) == 2
    )
    assert "unknown class label" in capsys.readouterr().err
    assert cli.main(["sample", "--diffusers", str(tmp_path / "missing")]) == 2
    assert "no such directory" in capsys.readouterr().err
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "config.json").write_text(json.dumps({"_class_name": "UNet1DModel"}))
    sched = tmp_path / "s.json"
    sched.write_text(json.dumps({"beta_schedule": "linear"}))
    assert cli.main(["sample", "--diffusers", str(tmp_path / "bare"), "--scheduler-config", str(sched)]) == 2
    assert "unsupported model class 'UNet1DModel'" in capsys.readouterr().err


def _tiny_unet_dir(tmp_path):
    from ..models.test_adapters import tiny_unet  # the adapters' tiny SD-style UNet (cross-attention dim 24)

    tiny_unet().save_pretrained(tmp_path / "unet")
    sched = tmp_path / "sched.json"
    diffusers.DPMSolverMultistepScheduler(beta_schedule="scaled_linear").save_pretrained(tmp_path / "s")
    sched.write_text((tmp_path / "s" / "scheduler_config.json").read_text())
    return tmp_path / "unet", sched


def test_sample_bare_unet_with_cond_file(tmp_path, capsys):
    unet, sched = _tiny_unet_dir(tmp_path)
    cond = tmp_path / "cond.safetensors"
    save_file(
        {
            "encoder_hidden_states": torch.randn(1, 5, 24),
            "negative_encoder_hidden_states": torch.zeros(1, 5, 24),
        },
        str(cond),
    )
    out = tmp_path / "lat.png"
    args = ["sample", "--diffusers", str(unet), "--scheduler-config", str(sched), "--nfe", "2",
            "--batch", "2", "--out", str(out), "--device", "cpu"]
    assert cli.main(args) == 2  # text-conditioned without --cond
    assert "--cond" in capsys.readouterr().err
    assert cli.main(args + ["--cond", str(cond)]) == 0, capsys.readouterr().err
    lat = load_file(out.with_suffix(".safetensors"))["latents"]
    assert lat.shape == (2, 4, 8, 8) and torch.isfinite(lat).all()
    assert not out.exists()  # no VAE: latents only


# -- errors: one line on stderr, a non-zero exit, never a traceback -----------------------------------------


def _one_line_error(err: str, *needles: str) -> str:
    """The single stderr line of a failed command; it must contain each of ``needles``."""
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("fewstep") and "error:" in lines[0], lines[0]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def _fails(argv, capsys, *needles) -> str:
    """Run ``fewstep argv`` in-process; it must fail with one line on stderr containing ``needles``."""
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse's usage errors exit
        rc = e.code
    assert rc not in (0, None), f"{argv} succeeded"
    return _one_line_error(capsys.readouterr().err, *needles)


@pytest.fixture
def no_model_loads(monkeypatch):
    """Loading the bundled model, a diffusers directory or computing the accuracy table fails the test: the
    argument checks must stop a bad command before any of that work."""

    def loaded(*a, **k):
        raise AssertionError("expensive work started before the arguments were checked")

    from fewstep.cli import accuracy, sample
    from fewstep.models import digits

    monkeypatch.setattr(digits, "load_digits_dit", loaded)
    monkeypatch.setattr(sample, "_load_dir", loaded)
    monkeypatch.setattr(accuracy, "accuracy_table", loaded)


def _unwritable_out(tmp_path, how, monkeypatch) -> tuple[str, str]:
    """(an --out path that cannot be written, what the error says)."""
    if how == "missing_dir":
        return str(tmp_path / "no" / "x.png"), "does not exist"
    if how == "parent_is_file":
        (tmp_path / "f").write_text("")
        return str(tmp_path / "f" / "x.png"), "not a directory"
    if how == "is_dir":
        (tmp_path / "d.png").mkdir()
        return str(tmp_path / "d.png"), "is a directory"
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if os.access(ro, os.W_OK):  # root ignores the mode: the OS refusal is simulated instead

        def refuse(*a, **k):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(checks.tempfile, "mkstemp", refuse)
    return str(ro / "x.png"), "Permission denied"


@pytest.mark.parametrize("how", ["missing_dir", "parent_is_file", "is_dir", "read_only"])
@pytest.mark.parametrize("command", ["demo", "sample", "sample_diffusers", "accuracy"])
def test_unwritable_out_fails_before_any_work(tmp_path, capsys, monkeypatch, no_model_loads, command, how):
    out, says = _unwritable_out(tmp_path, how, monkeypatch)
    argv = {"demo": ["demo"], "sample": ["sample"], "accuracy": ["accuracy"],
            "sample_diffusers": ["sample", "--diffusers", str(tmp_path)]}[command]
    _fails(argv + ["--out", out, "--device", "cpu"] if command != "accuracy" else argv + ["--out", out],
           capsys, "--out", says)
    assert not list(Path(tmp_path).rglob(".fewstep-write-check-*"))  # the probe leaves nothing behind


def test_out_check_changes_nothing(tmp_path):
    existing = tmp_path / "old.png"
    existing.write_bytes(b"keep")
    assert checks.writable_file(existing) == existing and existing.read_bytes() == b"keep"
    assert checks.writable_file(tmp_path / "new.png") == tmp_path / "new.png"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.png"]
    with pytest.raises(ValueError, match="ending in .png"):
        checks.writable_file(tmp_path / "x.jpg", suffixes=(".png",))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", ["demo", "sample"])
def test_device_cuda_without_cuda(capsys, no_model_loads, command, tmp_path):
    _fails([command, "--device", "cuda", "--out", str(tmp_path / "x.png")], capsys, "--device cuda",
           "CUDA is not available")
    _fails([command, "--device", "tpu", "--out", str(tmp_path / "x.png")], capsys, "--device",
           "expected cpu, cuda or cuda:N")


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-1", "two"])
@pytest.mark.parametrize("command", ["demo", "sample"])
def test_bad_guidance_is_rejected(capsys, no_model_loads, command, value):
    _fails([command, f"--guidance={value}"], capsys, "--guidance", "finite number >= 0" if value != "two"
           else "a number >= 0")


def test_guidance_zero_means_off():
    assert checks.guidance_arg("0") == 0.0 and checks.guidance_or_none(0.0) is None
    assert checks.guidance_or_none(checks.guidance_arg("1.5")) == 1.5


@pytest.mark.parametrize("argv, needles", [
    (["sample", "--nfe", "0"], ("--nfe", ">= 1")),
    (["sample", "--nfe", "2000"], ("2000",)),  # the solver's own limit, before the weights load
    (["demo", "--nfe", "2000"], ("2000",)),
    (["demo", "--nfes", "4,2000"], ("--nfes", "2000")),
    (["demo", "--nfes", "0"], ("--nfes", ">= 1")),
    (["demo", "--per-class", "1"], ("--per-class", ">= 2")),
    (["demo", "--solvers", "euler,nope"], ("unknown solver 'nope'",)),
    (["sample", "--solver", "nope"], ("unknown solver 'nope'",)),
    (["sample", "--spacing", "nope"], ("nope",)),
    (["sample", "--labels", "1,x"], ("--labels",)),
    (["sample", "--labels", ","], ("--labels", "at least one")),
    (["sample", "--labels", "3,12"], ("unknown class label", "12")),
    (["sample", "--cond", "c.safetensors"], ("--cond", "only applies with --diffusers")),
    (["sample", "--out", "x.jpg"], ("--out", ".png")),
    (["accuracy", "--samples", "0"], ("--samples",)),
    (["accuracy", "--nfe", "4,x"], ("--nfe",)),
    (["solvers", "euler", "--nfe", "2000"], ("2000",)),
    (["solvers", "euler", "--nfe", "-1"], ("--nfe",)),
    (["bench", "--nfe", "x"], ("--nfe",)),
    (["nope"], ("invalid choice",)),
])
def test_bad_arguments_are_one_line(tmp_path, capsys, monkeypatch, no_model_loads, argv, needles):
    monkeypatch.chdir(tmp_path)  # the default --out files land here, if anything ever wrote them
    _fails(argv, capsys, *needles)
    assert capsys.readouterr().out == ""  # nothing printed to stdout before the error either
    assert not list(tmp_path.iterdir())


def test_accuracy_unknown_solver_is_one_line(capsys, tmp_path):
    _fails(["accuracy", "--solvers", "nope", "--out", str(tmp_path / "a.png")], capsys, "nope")
    assert not list(tmp_path.iterdir())


def test_solvers_help_and_good_arguments_work(capsys):
    assert cli.main(["solvers", "euler", "--nfe", "2"]) == 0
    assert "call 1" in capsys.readouterr().out


class _Payload:
    """A pickle that touches ``marker`` when unpickled: a loader that unpickles it runs code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_corrupt_or_pickled_weights_under_diffusers_dir(tmp_path, capsys):
    pipe = tmp_path / "pipe"
    _tiny_dit_pipeline(pipe)
    weights = pipe / "transformer" / "diffusion_pytorch_model.safetensors"
    good = weights.read_bytes()
    argv = ["sample", "--diffusers", str(pipe), "--device", "cpu", "--nfe", "2",
            "--out", str(tmp_path / "o.png")]
    weights.write_bytes(good[: len(good) // 2])  # truncated
    _fails(argv, capsys, "--diffusers", "cannot load DiTTransformer2DModel", str(pipe / "transformer"))
    weights.write_bytes(b"\0" * 64)  # garbage
    _fails(argv, capsys, "cannot load DiTTransformer2DModel")
    # only a pickled .bin: never loaded (a pickle can run code), so the payload must not run
    weights.unlink()
    marker = tmp_path / "payload-ran"
    (pipe / "transformer" / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps({"w": _Payload(marker)}))
    _fails(argv, capsys, "cannot load DiTTransformer2DModel")
    assert not marker.exists()
    weights.write_bytes(good)
    (pipe / "transformer" / "config.json").write_text("{not json")
    _fails(argv, capsys, "model config", "config.json", "not readable JSON")
    assert not (tmp_path / "o.png").exists() and not (tmp_path / "o.safetensors").exists()


def test_unloadable_cond_files(tmp_path, capsys):
    unet, sched = _tiny_unet_dir(tmp_path)
    base = ["sample", "--diffusers", str(unet), "--scheduler-config", str(sched), "--nfe", "2",
            "--device", "cpu", "--out", str(tmp_path / "o.png")]
    marker = tmp_path / "payload-ran"
    pt = tmp_path / "cond.pt"
    pt.write_bytes(pickle.dumps({"encoder_hidden_states": _Payload(marker)}))
    _fails(base + ["--cond", str(pt)], capsys, "--cond", ".safetensors or .npz", "not loaded")
    npz = tmp_path / "cond.npz"
    np.savez(npz, encoder_hidden_states=np.array([_Payload(marker)], dtype=object))
    _fails(base + ["--cond", str(npz)], capsys, "--cond", "not a readable .npz")
    assert not marker.exists()
    st = tmp_path / "cond.safetensors"
    save_file({"encoder_hidden_states": torch.randn(1, 5, 24)}, str(st))
    st.write_bytes(st.read_bytes()[:40])  # truncated
    _fails(base + ["--cond", str(st)], capsys, "--cond", "not a readable .safetensors")
    _fails(base + ["--cond", str(tmp_path / "missing.safetensors")], capsys, "--cond", "no such file")
    save_file({"encoder_hidden_states": torch.randn(3, 5, 24)}, str(st))  # a batch of 3 for --batch 2
    _fails(base + ["--cond", str(st), "--batch", "2"], capsys, "'encoder_hidden_states'", "(3, 5, 24)")
    assert not (tmp_path / "o.png").exists() and not (tmp_path / "o.safetensors").exists()


def test_cond_npz_loads_as_data(tmp_path):
    from fewstep.cli.sample import _load_cond

    arrays = {"encoder_hidden_states": np.random.default_rng(0).normal(size=(1, 5, 24)).astype(np.float32),
              "time_ids": np.arange(6, dtype=np.int64)}
    np.savez(tmp_path / "c.npz", **arrays)
    got = _load_cond(tmp_path / "c.npz")
    assert sorted(got) == sorted(arrays)
    for k, v in arrays.items():
        assert torch.equal(got[k], torch.from_numpy(v))


def test_any_exception_is_one_line_and_debug_reraises(capsys, monkeypatch):
    from fewstep.cli import solvers

    def boom(args):
        raise RuntimeError("first line\n  second line\n\n")

    monkeypatch.setattr(solvers, "run", boom)
    assert cli.main(["solvers"]) == 1
    line = _one_line_error(capsys.readouterr().err)
    assert line == "fewstep solvers: error: RuntimeError: first line second line"

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(solvers, "run", interrupted)
    assert cli.main(["solvers"]) == 130
    assert capsys.readouterr().err.strip() == "fewstep solvers: interrupted"

    monkeypatch.setattr(solvers, "run", boom)
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(RuntimeError, match="first line"):
        cli.main(["solvers"])


def test_long_messages_are_cut():
    assert len(cli.one_line("x" * 10_000)) == cli.MAX_MESSAGE


def _fewstep(*argv, env=None):
    return subprocess.run([sys.executable, "-m", "fewstep.cli", *argv], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def test_errors_in_a_real_process(tmp_path):
    """The process itself: one stderr line and exit status 2, a usage error and a run-time check alike; with
    FEWSTEP_DEBUG=1 the traceback."""
    r = _fewstep("sample", "--guidance", "nan")
    assert r.returncode == 2 and r.stdout == ""
    _one_line_error(r.stderr, "--guidance")
    r = _fewstep("sample", "--out", str(tmp_path / "missing" / "x.png"), "--device", "cpu")
    assert r.returncode == 2
    _one_line_error(r.stderr, "--out", "does not exist")
    r = _fewstep("solvers", "nope", env={"FEWSTEP_DEBUG": "1"})
    assert r.returncode == 1 and "Traceback" in r.stderr and "unknown solver" in r.stderr
    r = _fewstep("--help")
    assert r.returncode == 0 and "FEWSTEP_DEBUG=1" in r.stdout


# -- images ----------------------------------------------------------------------------------------------


def test_image_grid_layout():
    from fewstep.cli.images import image_grid

    imgs = np.stack([np.full((2, 3), v) for v in (-1.0, 0.0, 1.0)])  # three 2x3 tiles: 0, 128, 255
    grid = image_grid(imgs, rows=2, scale=2, pad=1)
    expected = np.zeros((2 * (4 + 1) + 1, 2 * (6 + 1) + 1), np.uint8)  # 2 rows x 2 columns, black padding
    expected[1:5, 1:7] = 0
    expected[1:5, 8:14] = 128
    expected[6:10, 1:7] = 255
    assert np.array_equal(grid, expected)


@pytest.mark.parametrize("shape", [(37, 53), (20, 11, 3)])
def test_png_round_trip(tmp_path, shape):
    from PIL import Image

    from fewstep.cli.images import save_png

    a = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    save_png(tmp_path / "a.png", a)
    img = Image.open(tmp_path / "a.png")
    assert img.format == "PNG" and img.mode == ("L" if len(shape) == 2 else "RGB")
    assert np.array_equal(np.asarray(img), a)
    with pytest.raises(ValueError, match="uint8"):
        save_png(tmp_path / "b.png", a.astype(np.float32))


def test_demo_small_run(tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "d.png"
    rc = cli.main(["demo", "--nfe", "2", "--solvers", "euler,heun", "--nfes", "2", "--per-class", "2",
                   "--repeats", "1", "--device", "cpu", "--out", str(out)])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    img = Image.open(out)
    assert img.mode == "L" and img.size == (10 * 33 + 1, 10 * 33 + 1)  # 10x10 tiles of 8x8 pixels x4, 1 pad
    rows = {line.split()[0]: line.split() for line in cap.out.splitlines() if line.split()}
    assert rows["euler"][1] == "2" and 0.0 <= float(rows["euler"][3]) <= 1.0
    assert rows["heun"][2:5] == ["-", "-", "-"]  # heun takes odd NFE only: a '-' row with the reason
    assert rows["real"][2] == "0.996"  # the held-out split's recorded accuracy, from the shipped array file
