"""The bundled digits DiT and its quality metrics: loading, errors, a short sampling run, reproducibility."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import fewstep as fs
from fewstep.models import digits as D
from fewstep.models import metrics as M

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bundled():
    return D.load_digits_model()


def _guided_fn(model, y):
    labels = torch.cat([torch.full_like(y, model.null_class), y])
    return lambda x, t: model(x.float(), t, class_labels=labels).double()


def _copy_data(tmp_path: Path) -> Path:
    dst = tmp_path / "data"
    shutil.copytree(D.DATA_DIR, dst)
    return dst


# -- the shipped files ------------------------------------------------------------------------------------


def test_shipped_weights_load_and_describe_themselves(bundled):
    model, spec = bundled
    assert isinstance(spec, fs.ModelSpec) and spec == D.digits_spec()
    assert spec.prediction == "epsilon" and spec.time_input == "discrete"
    meta = model.metadata
    assert meta["weights_sha256"] and meta["final_loss"] > 0 and meta["classifier_test_accuracy"] > 0
    assert (D.DATA_DIR / meta["loss_curve"]).is_file()
    weights = D.DATA_DIR / meta["weights_file"]
    assert weights.stat().st_size < 4 * 2**20, "the bundled weights must stay a few MB"
    x = torch.randn(3, *model.sample_shape)
    out = model(x, 500.0, class_labels=torch.tensor([0, 7, model.null_class]))
    assert out.shape == x.shape and torch.isfinite(out).all()
    # the network uses its inputs: time, label and sample all change the output
    assert not torch.allclose(out, model(x, 20.0, class_labels=torch.tensor([0, 7, model.null_class])))
    assert not torch.allclose(out[:1], model(x[:1], 500.0, class_labels=torch.tensor([3])))


def test_scheduler_config_reads_back_as_the_same_spec():
    cfg = {"_class_name": "DDIMScheduler", **D.digits_scheduler_config()}
    assert fs.ModelSpec.from_diffusers_scheduler_config(cfg) == D.digits_spec()


def test_classifier_accuracy_on_held_out_split():
    clf = M.load_digit_classifier()
    x, y = D.load_digits_data("test")
    xtr, _ = D.load_digits_data("train")
    assert len(y) + len(xtr) == 1797
    # the split is disjoint (no test image also in train)
    assert not (torch.cdist(x.flatten(1), xtr.flatten(1)).min(1).values == 0).all()
    acc = M.class_accuracy(x, y, clf)
    assert acc >= 0.95
    recorded = json.loads((D.DATA_DIR / M.CLASSIFIER_CONFIG).read_text())["test_accuracy"]
    assert acc == pytest.approx(recorded, abs=1e-6)


# -- a short real sampling run ------------------------------------------------------------------------------


def test_short_sampling_run_gives_the_asked_digits(bundled):
    """Euler, NFE 10, guidance 3, 30 samples: class accuracy far above chance (0.1), FD far below noise's.

    Floors: the measured accuracy of this setting is ~0.95 on 200 samples (see the report table); 0.7 leaves
    room for sampling noise on 30 samples while a broken model, solver or label path lands near 0.1.
    """
    model, spec = bundled
    y = torch.arange(10).repeat(3)
    prog = fs.solvers.build("euler", spec, nfe=10, guidance_scale=3.0)
    noise = torch.randn(len(y), *model.sample_shape, generator=torch.Generator().manual_seed(0))
    calls, seen = fs.solvers.reference.count_calls(_guided_fn(model, y))
    with torch.no_grad():
        x = fs.solvers.run_reference(prog, calls, noise)
    assert len(seen) == prog.nfe == 10
    assert torch.isfinite(x).all()
    x = x.float().clamp(-1, 1)
    acc = M.class_accuracy(x, y)
    assert acc >= 0.7, acc
    fd_samples, fd_noise = M.frechet_distance(x), M.frechet_distance(noise)
    assert np.isfinite(fd_samples) and fd_samples < 0.25 * fd_noise, (fd_samples, fd_noise)


# -- bad input ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("labels", [[11], [-1], [3, 10, 12]])
def test_unknown_class_label_is_rejected(bundled, labels):
    model, _ = bundled
    x = torch.randn(len(labels), *model.sample_shape)
    with pytest.raises(ValueError, match="unknown class label"):
        model(x, 10.0, class_labels=torch.tensor(labels))
    with pytest.raises(ValueError, match="unknown class label"):
        D.check_class_labels(labels)


def test_label_type_shape_and_null_class_checks(bundled):
    model, _ = bundled
    with pytest.raises(ValueError, match="integers"):
        D.check_class_labels(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="shape"):
        model(torch.randn(2, *model.sample_shape), 10.0, class_labels=torch.tensor([1]))
    with pytest.raises(ValueError, match="shape"):
        model(torch.randn(2, 8, 8), 10.0, class_labels=torch.tensor([1, 2]))
    # the null class conditions the unconditional branch but is not a digit to score against
    with pytest.raises(ValueError, match="unknown class label"):
        M.class_accuracy(torch.zeros(1, 1, 8, 8), [10])
    with pytest.raises(ValueError, match="NaN"):
        M.frechet_distance(torch.full((4, 1, 8, 8), float("nan")))


@pytest.mark.parametrize("which", ["dit", "classifier"])
def test_missing_weights_file_names_the_file(tmp_path, which):
    d = _copy_data(tmp_path)
    name = D.WEIGHTS_FILE if which == "dit" else M.CLASSIFIER_WEIGHTS
    (d / name).unlink()
    with pytest.raises(FileNotFoundError, match=name):
        D.load_digits_model(d) if which == "dit" else M.load_digit_classifier(d)


@pytest.mark.parametrize("which", ["dit", "classifier"])
@pytest.mark.parametrize("how", ["truncated", "garbage_no_checksum"])
def test_corrupt_weights_file_names_the_file(tmp_path, which, how):
    d = _copy_data(tmp_path)
    name, cfg_name = (D.WEIGHTS_FILE, D.CONFIG_FILE) if which == "dit" else (M.CLASSIFIER_WEIGHTS,
                                                                           M.CLASSIFIER_CONFIG)
    path = d / name
    if how == "truncated":  # caught by the recorded checksum
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:  # no checksum to compare: torch.load itself fails, and the error still names the file
        cfg = json.loads((d / cfg_name).read_text())
        del cfg["weights_sha256"]
        (d / cfg_name).write_text(json.dumps(cfg))
        path.write_bytes(b"not a torch file" * 100)
    with pytest.raises(RuntimeError, match=f"{name}.*corrupt"):
        D.load_digits_model(d) if which == "dit" else M.load_digit_classifier(d)


def test_missing_config_names_the_file(tmp_path):
    d = _copy_data(tmp_path)
    (d / D.CONFIG_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=D.CONFIG_FILE):
        D.load_digits_model(d)


# -- metrics ------------------------------------------------------------------------------------------------


def test_frechet_distance_matches_the_sqrtm_formula():
    from scipy import linalg

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    c1, c2 = a @ a.T + 0.1 * np.eye(6), b @ b.T + 0.1 * np.eye(6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(c1 + c2 - 2 * linalg.sqrtm(c1 @ c2).real)
    assert M.frechet_distance_from_stats(mu1, c1, mu2, c2) == pytest.approx(expected, rel=1e-8)
    assert M.frechet_distance_from_stats(mu1, c1, mu1, c1) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_ranks_real_above_noise():
    x, _ = D.load_digits_data("test")
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    fd_real, fd_noise = M.frechet_distance(x), M.frechet_distance(noise)
    assert 0 <= fd_real < 0.05 * fd_noise, (fd_real, fd_noise)


# -- the training script ------------------------------------------------------------------------------------


def _train_module():
    spec = importlib.util.spec_from_file_location("train_digits", REPO / "scripts" / "train_digits.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_training_is_reproducible_and_learns():
    td = _train_module()
    cfg = json.loads(json.dumps(td.CONFIG))
    cfg["model"] = {"hidden": 32, "heads": 2, "layers": 1, "patch_size": 2}
    cfg["train"].update(steps=20, batch=16, warmup=5, log_every=10)
    threads = torch.get_num_threads()
    try:
        runs = [td.train_dit(cfg, td.seed_everything(3, 1), log=lambda s: None) for _ in range(2)]
    finally:
        torch.set_num_threads(threads)
    (m1, curve1), (m2, curve2) = runs
    assert curve1 == curve2 and all(np.isfinite(v) for _, v in curve1)
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert curve1[-1][1] < curve1[0][1]  # the loss goes down
