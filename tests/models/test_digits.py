"""The bundled digits DiT and its quality metrics: loading, errors, a short sampling run, reproducibility."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
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
    # the split is disjoint: no test image also in train (the 1,797 images are pairwise distinct)
    assert not (torch.cdist(x.flatten(1), xtr.flatten(1)).min(1).values == 0).any()
    acc = M.class_accuracy(x, y, clf)
    assert acc >= 0.95
    recorded = json.loads((D.DATA_DIR / M.CLASSIFIER_CONFIG).read_text())["test_accuracy"]
    assert acc == pytest.approx(recorded, abs=1e-6)


# -- the shipped digits array file -----------------------------------------------------------------------

# Pinned facts of scikit-learn's digits (sklearn.datasets.load_digits, the UCI optdigits test set) and of the
# stratified split of scripts/train_digits.py: exported once with scikit-learn 1.9.1, checked equal to
# train_test_split(range(1797), test_size=0.25, random_state=0, stratify=labels) and to the
# images / labels scikit-learn returns.
DATA_SHA256 = "7405517a49e87a73cb8e125a76fe3b164f82c5c637f305535fa44add37f0c350"
LABEL_COUNTS = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
TEST_LABEL_COUNTS = [45, 46, 44, 46, 45, 46, 45, 45, 43, 45]
PIXEL_SUM = 561718  # sum of all 1797 x 64 pixel values (0..16)
TRAIN_HEAD, TEST_HEAD = [447, 836, 1749, 146, 1200], [1364, 1579, 1023, 1176, 1151]


def test_data_file_matches_pinned_facts():
    path = D.DATA_DIR / D.DATA_FILE
    assert hashlib.sha256(path.read_bytes()).hexdigest() == DATA_SHA256
    assert path.stat().st_size < 100_000, "the digits file must stay small"
    with np.load(path, allow_pickle=False) as f:
        a = {k: f[k] for k in f.files}
    assert sorted(a) == ["images", "labels", "test_index", "train_index"]
    assert a["images"].shape == (1797, 8, 8) and a["images"].dtype == np.uint8
    assert a["labels"].shape == (1797,) and a["labels"].dtype == np.uint8
    assert a["images"].max() == 16 and a["images"].min() == 0
    assert int(a["images"].astype(np.int64).sum()) == PIXEL_SUM
    assert np.bincount(a["labels"]).tolist() == LABEL_COUNTS
    assert np.bincount(a["labels"][a["test_index"]]).tolist() == TEST_LABEL_COUNTS
    assert len(a["train_index"]) == 1347 and len(a["test_index"]) == 450
    assert a["train_index"][:5].tolist() == TRAIN_HEAD and a["test_index"][:5].tolist() == TEST_HEAD
    assert np.array_equal(np.sort(np.concatenate([a["train_index"], a["test_index"]])), np.arange(1797))
    # the bundled networks record the file they were trained on
    for cfg in (D.CONFIG_FILE, M.CLASSIFIER_CONFIG):
        data = json.loads((D.DATA_DIR / cfg).read_text())["data"]
        assert (data["file"], data["sha256"]) == (D.DATA_FILE, DATA_SHA256)


def test_load_digits_data_applies_the_stored_split():
    """x = pixel / 8 - 1, and the splits are the stored index lists, in their order."""
    with np.load(D.DATA_DIR / D.DATA_FILE, allow_pickle=False) as f:
        images, labels, tr, te = f["images"], f["labels"], f["train_index"], f["test_index"]
    x, y = D.load_digits_data("all")
    assert x.dtype == torch.float32 and y.dtype == torch.long and x.shape == (1797, 1, 8, 8)
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0
    assert x[5, 0, 3, 4].item() == images[5, 3, 4] / 8 - 1 and y[5].item() == labels[5]
    xtr, ytr = D.load_digits_data("train")
    xte, yte = D.load_digits_data("test")
    assert torch.equal(xtr[0, 0], torch.tensor(images[tr[0]], dtype=torch.float32) / 8 - 1)
    assert torch.equal(ytr, torch.tensor(labels[tr].astype(np.int64)))
    assert torch.equal(yte, torch.tensor(labels[te].astype(np.int64)))
    with pytest.raises(ValueError, match="split must be"):
        D.load_digits_data("val")


def test_data_file_equals_a_fresh_sklearn_export(tmp_path):
    """Where scikit-learn is installed (the `train` extra): the export gives the shipped arrays."""
    pytest.importorskip("sklearn")
    td = _train_module()
    td.export_digits_data(tmp_path / D.DATA_FILE)
    with np.load(tmp_path / D.DATA_FILE, allow_pickle=False) as new, \
            np.load(D.DATA_DIR / D.DATA_FILE, allow_pickle=False) as shipped:
        assert sorted(new.files) == sorted(shipped.files)
        for k in shipped.files:
            assert new[k].dtype == shipped[k].dtype and np.array_equal(new[k], shipped[k]), k


def test_runtime_does_not_need_sklearn():
    """The package loads its digits without scikit-learn (a fresh interpreter where it cannot import)."""
    code = ("import sys; sys.modules['sklearn'] = None\n"
            "from fewstep.models import digits, metrics\n"
            "x, y = digits.load_digits_data('test'); print(len(y), metrics.class_accuracy(x, y) > 0.9)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["450", "True"]


@pytest.mark.parametrize("how", ["missing", "truncated", "garbage", "pickled", "missing_key", "bad_dtype"])
def test_bad_data_file_names_the_file(tmp_path, how):
    d = _copy_data(tmp_path)
    path = d / D.DATA_FILE
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    if how == "missing":
        path.unlink()
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "garbage":
        path.write_bytes(b"not a zip file" * 100)
    elif how == "pickled":  # an object array needs unpickling: refused, never loaded
        np.savez(path, **{**arrays, "labels": np.array([_Boom()] * 1797, dtype=object)})
    elif how == "missing_key":
        np.savez(path, **{k: v for k, v in arrays.items() if k != "test_index"})
    else:
        np.savez(path, **{**arrays, "images": arrays["images"].astype(np.float64)})
    err = FileNotFoundError if how == "missing" else RuntimeError
    with pytest.raises(err, match=D.DATA_FILE):
        D.load_digits_data("test", data_dir=d)
    assert not _Boom.ran


class _Boom:
    """Unpickling this would set ``ran``: the loader must never get that far."""

    ran = False

    def __reduce__(self):
        return (_Boom._run, ())

    @staticmethod
    def _run():
        _Boom.ran = True


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
