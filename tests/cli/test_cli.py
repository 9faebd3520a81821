"""The `fewstep` command: help on every subcommand, the solver listing, `sample` with local diffusers dirs."""

import json

import pytest
import torch

from fewstep import cli

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
    lat = torch.load(out.with_suffix(".pt"))
    assert lat.shape == (2, 4, 8, 8) and torch.isfinite(lat).all()


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


def test_sample_bare_unet_with_cond_file(tmp_path, capsys):
    from ..models.test_adapters import tiny_unet  # the adapters' tiny SD-style UNet (cross-attention dim 24)

    tiny_unet().save_pretrained(tmp_path / "unet")
    sched = tmp_path / "sched.json"
    diffusers.DPMSolverMultistepScheduler(beta_schedule="scaled_linear").save_pretrained(tmp_path / "s")
    sched.write_text((tmp_path / "s" / "scheduler_config.json").read_text())
    cond = tmp_path / "cond.pt"
    torch.save(
        {
            "encoder_hidden_states": torch.randn(1, 5, 24),
            "negative_encoder_hidden_states": torch.zeros(1, 5, 24),
        },
        cond,
    )
    out = tmp_path / "lat.png"
    args = [
        "sample",
        "--diffusers",
        str(tmp_path / "unet"),
        "--scheduler-config",
        str(sched),
        "--nfe",
        "2",
        "--batch",
        "2",
        "--out",
        str(out),
        "--device",
        "cpu",
    ]
    assert cli.main(args) == 2  # text-conditioned without --cond
    assert "--cond" in capsys.readouterr().err
    assert cli.main(args + ["--cond", str(cond)]) == 0, capsys.readouterr().err
    lat = torch.load(out.with_suffix(".pt"))
    assert lat.shape == (2, 4, 8, 8) and torch.isfinite(lat).all()
    assert not out.exists()  # no VAE: latents only
