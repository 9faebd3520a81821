"""The bundled digits model: a small class-conditional DiT trained by ``scripts/train_digits.py`` on
scikit-learn's 8x8 digits (1 channel, values in [-1, 1]), which ship here as an array file.

The network is diffusers' own :class:`~diffusers.DiTTransformer2DModel` (patch 2, so 16 tokens), so the
demo runs the real DiT code path.  It predicts epsilon on a DDPM linear schedule (1000 steps, betas 1e-4 ..
0.02) and takes the discrete timestep; labels 0..9 are the digits and label 10 is the null class used for
classifier-free guidance (trained with 10% label dropout).  Weights ship in ``fewstep/models/data/`` as an
fp16 state dict with the training config (``digits_dit.json``, which records the file's SHA-256) and the loss
curve.  Guidance 1.5 gives the best Frechet distance; larger scales trade diversity for class accuracy.

    model, spec = fs.models.load_digits_model()
    y = torch.arange(10)
    prog = fs.solvers.build("dpmpp_2m", spec, nfe=10, guidance_scale=1.5)
    fn = lambda x, t: model(x, t, class_labels=torch.cat([torch.full_like(y, model.null_class), y]))
    x0 = fs.solvers.run_reference(prog, fn, torch.randn(10, *model.sample_shape)).clamp(-1, 1)
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..solvers.schedules import DiscreteVP
from ..solvers.spec import ModelSpec

__all__ = ["DigitsDenoiser", "load_digits_model", "load_digits_dit", "digits_spec", "digits_scheduler_config",
           "load_digits_data", "check_class_labels", "DATA_DIR", "DATA_FILE", "NUM_CLASSES", "NULL_CLASS",
           "SAMPLE_SHAPE"]

DATA_DIR = Path(__file__).resolve().parent / "data"
WEIGHTS_FILE = "digits_dit.pt"
CONFIG_FILE = "digits_dit.json"
# images (N, 8, 8) uint8 0..16, labels (N,) uint8, train_index / test_index: scripts/train_digits.py writes it
DATA_FILE = "digits.npz"
_DATA_KEYS = ("images", "labels", "train_index", "test_index")
NUM_CLASSES = 10
NULL_CLASS = 10
SAMPLE_SHAPE = (1, 8, 8)

# The diffusers scheduler config the model was trained for (DDPM linear schedule, epsilon prediction).
_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "epsilon",
}


def digits_scheduler_config() -> dict:
    """The diffusers scheduler config keys of the digits model's schedule (fit any diffusers scheduler)."""
    return dict(_SCHEDULER_CONFIG)


def digits_spec() -> ModelSpec:
    """The digits model's contract: DiscreteVP linear schedule, epsilon prediction, discrete time input."""
    c = _SCHEDULER_CONFIG
    sched = DiscreteVP(num_train_timesteps=c["num_train_timesteps"], beta_start=c["beta_start"],
                       beta_end=c["beta_end"], beta_schedule=c["beta_schedule"])
    return ModelSpec(sched, prediction="epsilon", time_input="discrete")


def dit_config(arch: dict) -> dict:
    """DiTTransformer2DModel keyword arguments for an architecture block of the training config."""
    return dict(
        num_attention_heads=arch["heads"],
        attention_head_dim=arch["hidden"] // arch["heads"],
        in_channels=SAMPLE_SHAPE[0],
        out_channels=SAMPLE_SHAPE[0],
        num_layers=arch["layers"],
        sample_size=SAMPLE_SHAPE[-1],
        patch_size=arch["patch_size"],
        num_embeds_ada_norm=NUM_CLASSES,
        norm_num_groups=1,
    )


def build_dit(arch: dict):
    """A freshly initialised DiTTransformer2DModel for ``arch`` (shared by the training script and loader)."""
    try:
        from diffusers import DiTTransformer2DModel
    except ImportError as e:  # diffusers is what runs the bundled model
        raise ImportError("the bundled digits model runs on diffusers' DiTTransformer2DModel: pip install "
                          "diffusers") from e
    return DiTTransformer2DModel(**dit_config(arch))


def check_class_labels(class_labels: Any, *, allow_null: bool = True) -> torch.Tensor:
    """Validate digit labels (0..9, and 10 = the null class when ``allow_null``); returns a long tensor.

    Raises ValueError naming the offending labels.  Call it before sampling: a plan's forward on a GPU cannot
    check label values without a host sync.
    """
    y = torch.as_tensor(class_labels)
    if y.dtype.is_floating_point or y.dtype == torch.bool or y.dtype.is_complex:
        raise ValueError(f"class labels must be integers, got dtype {y.dtype}")
    y = y.long().reshape(-1)
    hi = NULL_CLASS if allow_null else NUM_CLASSES - 1
    bad = y[(y < 0) | (y > hi)]
    if bad.numel():
        valid = "0..9 (10 = the null class)" if allow_null else "0..9"
        raise ValueError(f"unknown class label(s) {sorted(set(bad.tolist()))}; the digits model knows "
                         f"{valid}")
    return y


class DigitsDenoiser(torch.nn.Module):
    """``model(x, t, class_labels=y) -> epsilon``: the bundled digits DiT as a plain callable.

    x: (batch, 1, 8, 8) float; t: the discrete timestep (a float, or a tensor of shape () or (batch,));
    class_labels: (batch,) ints in 0..9, or 10 (``null_class``) for the unconditional half under guidance.
    """

    num_classes = NUM_CLASSES
    null_class = NULL_CLASS
    sample_shape = SAMPLE_SHAPE

    def __init__(self, dit, metadata: dict | None = None):
        super().__init__()
        self.dit = dit
        self.metadata = dict(metadata or {})

    def forward(self, x: torch.Tensor, t, class_labels: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or tuple(x.shape[1:]) != SAMPLE_SHAPE:
            raise ValueError(f"x must have shape (batch, {', '.join(map(str, SAMPLE_SHAPE))}), got "
                             f"{tuple(x.shape)}")
        if not isinstance(class_labels, torch.Tensor):
            class_labels = torch.as_tensor(class_labels)
        if class_labels.device.type == "cpu":  # a GPU check would sync; there callers use check_class_labels
            class_labels = check_class_labels(class_labels)
        if class_labels.shape != (x.shape[0],):
            raise ValueError(f"class_labels must have shape ({x.shape[0]},), got {tuple(class_labels.shape)}")
        dtype = next(self.dit.parameters()).dtype
        t = torch.as_tensor(t, dtype=torch.float32, device=x.device).reshape(-1).expand(x.shape[0])
        out = self.dit(x.to(dtype), timestep=t, class_labels=class_labels.to(x.device), return_dict=False)[0]
        return out.to(x.dtype)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _read_config(data_dir: Path) -> dict:
    path = data_dir / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"digits model config {path} is missing; reinstall fewstep or rerun "
                                "scripts/train_digits.py")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RuntimeError(f"digits model config {path} is corrupt ({e}); reinstall fewstep or rerun "
                           "scripts/train_digits.py") from e


def load_state_dict_checked(path: Path, sha256: str | None, what: str) -> dict:
    """torch.load a shipped state dict, with errors that name the file (missing, checksum, unreadable)."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} weights file {path} is missing; reinstall fewstep or rerun "
                                "scripts/train_digits.py")
    if sha256 is not None and _sha256(path) != sha256:
        raise RuntimeError(f"{what} weights file {path} is corrupt: its SHA-256 does not match the one "
                           "recorded at training; reinstall fewstep or rerun scripts/train_digits.py")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RuntimeError(f"{what} weights file {path} is corrupt or unreadable "
                           f"({type(e).__name__}: {e})") from e
    if not isinstance(state, dict):
        raise RuntimeError(f"{what} weights file {path} does not hold a state dict")
    return state


def load_digits_dit(data_dir: str | Path | None = None):
    """The bundled DiTTransformer2DModel (float32, eval mode) and its training config."""
    data_dir = Path(data_dir) if data_dir is not None else DATA_DIR
    config = _read_config(data_dir)
    path = data_dir / config.get("weights_file", WEIGHTS_FILE)
    state = load_state_dict_checked(path, config.get("weights_sha256"), "digits model")
    dit = build_dit(config["model"])
    try:
        dit.load_state_dict({k: v.float() for k, v in state.items()})
    except RuntimeError as e:
        raise RuntimeError(f"digits model weights file {path} does not fit the architecture in "
                           f"{data_dir / CONFIG_FILE}: {e}") from e
    return dit.eval().requires_grad_(False), config


def load_digits_model(data_dir: str | Path | None = None) -> tuple[DigitsDenoiser, ModelSpec]:
    """The bundled digits model as ``(model(x, t, class_labels=...), fs.ModelSpec)``.

    ``model.metadata`` holds the training config (architecture, steps, seed, final loss, measured time);
    ``model.null_class`` is the label of the unconditional branch; samples have shape ``model.sample_shape``
    and live in [-1, 1].  Missing or corrupt weights raise an error naming the file.
    """
    dit, config = load_digits_dit(data_dir)
    return DigitsDenoiser(dit, config), digits_spec()


def _read_digits_file(path: Path) -> dict[str, np.ndarray]:
    """The arrays of the shipped digits file, checked; errors name the file and what is wrong."""
    if not path.is_file():
        raise FileNotFoundError(f"digits data file {path} is missing; reinstall fewstep or rerun "
                                "scripts/train_digits.py --export-data")
    try:
        with np.load(path, allow_pickle=False) as f:  # plain arrays only: never unpickles
            arrays = {k: f[k] for k in f.files}
    except Exception as e:  # a truncated / garbled zip, an object array, a bad header
        raise RuntimeError(f"digits data file {path} is corrupt or unreadable "
                           f"({type(e).__name__}: {e})") from e
    missing = [k for k in _DATA_KEYS if k not in arrays]
    if missing:
        raise RuntimeError(f"digits data file {path} is corrupt: arrays {missing} are missing "
                           f"(found {sorted(arrays)})")
    images, labels = arrays["images"], arrays["labels"]
    n = len(labels)
    problems = []
    if images.dtype != np.uint8 or images.shape != (n, *SAMPLE_SHAPE[1:]) or images.max(initial=0) > 16:
        problems.append(f"images must be ({n}, 8, 8) uint8 in 0..16, got {images.shape} {images.dtype}")
    if labels.dtype != np.uint8 or labels.ndim != 1 or labels.max(initial=0) >= NUM_CLASSES:
        problems.append(f"labels must be (N,) uint8 in 0..9, got {labels.shape} {labels.dtype}")
    both = np.concatenate([arrays["train_index"].ravel(), arrays["test_index"].ravel()])
    if both.dtype.kind not in "iu" or not np.array_equal(np.sort(both), np.arange(n)):
        problems.append(f"train_index and test_index must split 0..{n - 1} into two disjoint parts")
    if problems:
        raise RuntimeError(f"digits data file {path} is corrupt: {'; '.join(problems)}")
    return arrays


def load_digits_data(split: str = "all", *, data_dir: str | Path | None = None):
    """The bundled digits as ``(x, y)``: x (N, 1, 8, 8) float32 in [-1, 1], y (N,) long.

    The 1,797 images and labels of scikit-learn's ``load_digits`` ship in ``data/digits.npz`` with the
    stratified train / test split (75 / 25 %, seed 0) both bundled networks were trained with.
    split: "all", or "train" / "test" (in the order the split was drawn).
    """
    if split not in ("all", "train", "test"):
        raise ValueError(f"split must be 'all', 'train' or 'test', got {split!r}")
    arrays = _read_digits_file((Path(data_dir) if data_dir is not None else DATA_DIR) / DATA_FILE)
    x = torch.from_numpy(arrays["images"]).float().unsqueeze(1) / 8.0 - 1.0
    y = torch.from_numpy(arrays["labels"]).long()
    if split == "all":
        return x, y
    idx = torch.from_numpy(arrays[f"{split}_index"].astype(np.int64))
    return x[idx], y[idx]
