"""Train the bundled digits model and its digit classifier; write them to fewstep/models/data/.

    python scripts/train_digits.py                 # the shipped run (seeded, CPU, 2 threads)
    python scripts/train_digits.py --out /tmp/d --dit-steps 200   # a quick try
    python scripts/train_digits.py --export-data   # rewrite fewstep/models/data/digits.npz from scikit-learn

Both networks train on the training split of the digits shipped in ``fewstep/models/data/digits.npz``
(``load_digits_data("train")``); the classifier's accuracy is measured on the held-out test split.  That file
holds scikit-learn's 8x8 digits (``sklearn.datasets.load_digits``) and the stratified split the shipped
networks were trained with (``train_test_split(test_size=0.25, random_state=0, stratify=labels)``);
``--export-data`` regenerates it, which needs scikit-learn (``pip install 'fewstep[train]'``) and nothing else
here does.  Training is deterministic: one seed and a fixed thread count (2), so rerunning gives the same
weights with the same torch build on the same CPU type.

The DiT is diffusers' DiTTransformer2DModel trained with the DDPM epsilon loss (Ho et al. 2020) on the linear
schedule, AdamW with warmup and cosine decay, an EMA of the weights (what ships, in fp16), and 10% label
dropout to the null class for classifier-free guidance (Ho & Salimans 2022).  Label dropout is applied here,
once per sample, with diffusers' own in-model dropout switched off: in train mode every DiT block's embedder
would draw its own dropout mask, so one sample would be conditional in some blocks and unconditional in
others.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import io
import json
import math
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fewstep.models.digits import (  # noqa: E402
    CONFIG_FILE,
    DATA_DIR,
    DATA_FILE,
    NULL_CLASS,
    WEIGHTS_FILE,
    build_dit,
    digits_spec,
    load_digits_data,
)
from fewstep.models.metrics import CLASSIFIER_CONFIG, CLASSIFIER_WEIGHTS, DigitClassifier  # noqa: E402

CONFIG = {
    "seed": 0,
    "threads": 2,
    "data": {"dataset": "sklearn.datasets.load_digits", "split": "train", "test_fraction": 0.25,
             "split_seed": 0, "normalize": "x / 8 - 1 (values 0..16 -> [-1, 1])", "file": DATA_FILE},
    "model": {"hidden": 128, "heads": 4, "layers": 4, "patch_size": 2},
    "schedule": {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
                 "beta_schedule": "linear", "prediction_type": "epsilon"},
    "train": {"steps": 3000, "batch": 128, "lr": 1e-3, "warmup": 200, "final_lr_fraction": 0.05,
              "weight_decay": 0.0, "grad_clip": 1.0, "ema": 0.999, "label_dropout": 0.1, "log_every": 50},
    "classifier": {"arch": {"width": 32, "features": 64}, "epochs": 20, "batch": 64, "lr": 2e-3,
                   "max_shift": 1},
}


def seed_everything(seed: int, threads: int) -> torch.Generator:
    """Seed, and fix the thread count: with a fixed thread count torch's CPU kernels are run-to-run
    deterministic (tests/models/test_digits.py checks two runs give identical weights).
    torch.use_deterministic_algorithms(True) is left off: it made a DiT training step 2.4x slower on 2 CPU
    threads (0.22 s vs 0.09 s, torch 2.13), which the 15-minute budget cannot afford."""
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    return torch.Generator().manual_seed(seed)


def random_shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Shift each image by up to ``max_shift`` pixels (zero = background -1 padding): the classifier's
    augmentation, so generated digits a pixel off-centre are still read correctly."""
    if max_shift == 0:
        return x
    n, c, h, w = x.shape
    pad = F.pad(x, [max_shift] * 4, value=-1.0)
    rows = torch.randint(0, 2 * max_shift + 1, (n, 1), generator=gen) + torch.arange(h)
    cols = torch.randint(0, 2 * max_shift + 1, (n, 1), generator=gen) + torch.arange(w)
    return pad[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None],
               rows[:, None, :, None], cols[:, None, None, :]]


def split(cfg: dict, name: str):
    """The ``name`` split of the shipped array file (the split ``export_digits_data`` stored)."""
    return load_digits_data(name)


def sklearn_digits_arrays(test_fraction: float = 0.25, seed: int = 0) -> dict[str, np.ndarray]:
    """scikit-learn's digits and a stratified train/test split, as the arrays of the shipped data file."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:
        raise ImportError("--export-data reads the digits from scikit-learn: "
                          "pip install 'fewstep[train]'") from e
    d = load_digits()
    if not np.array_equal(d.images, np.round(d.images)) or d.images.min() < 0 or d.images.max() > 16:
        raise ValueError("scikit-learn's digits are no longer integers 0..16: a uint8 file cannot hold them")
    idx_train, idx_test = train_test_split(np.arange(len(d.target)), test_size=test_fraction,
                                           random_state=seed, stratify=d.target)
    return {"images": d.images.astype(np.uint8), "labels": d.target.astype(np.uint8),
            "train_index": idx_train.astype(np.uint16), "test_index": idx_test.astype(np.uint16)}


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> str:
    """``np.savez_compressed`` with fixed zip timestamps, so the same arrays give the same bytes (with the
    same zlib); returns the file's SHA-256.  Plain arrays only: the file loads with ``allow_pickle=False``."""
    with zipfile.ZipFile(path, "w") as zf:
        for name, a in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(a), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, buf.getvalue(), compresslevel=9)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def export_digits_data(path: Path, test_fraction: float = 0.25, seed: int = 0) -> str:
    """Write scikit-learn's digits and their split to ``path`` (the shipped file); returns its SHA-256."""
    return write_npz(path, sklearn_digits_arrays(test_fraction, seed))


def train_classifier(cfg: dict, gen: torch.Generator) -> tuple[DigitClassifier, dict]:
    c = cfg["classifier"]
    x, y = split(cfg, "train")
    xt, yt = split(cfg, "test")
    clf = DigitClassifier(**c["arch"])
    opt = torch.optim.Adam(clf.parameters(), lr=c["lr"])
    steps_per_epoch = math.ceil(len(y) / c["batch"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, c["lr"], total_steps=c["epochs"] * steps_per_epoch)
    for _ in range(c["epochs"]):
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), c["batch"]):
            idx = perm[i:i + c["batch"]]
            loss = F.cross_entropy(clf(random_shift(x[idx], c["max_shift"], gen)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    clf.eval()
    with torch.no_grad():
        train_acc = float((clf(x).argmax(1) == y).float().mean())
        test_acc = float((clf(xt).argmax(1) == yt).float().mean())
    return clf, {"train_accuracy": train_acc, "test_accuracy": test_acc, "n_train": len(y), "n_test": len(yt)}


def lr_at(step: int, t: dict) -> float:
    if step < t["warmup"]:
        return t["lr"] * (step + 1) / t["warmup"]
    p = (step - t["warmup"]) / max(1, t["steps"] - t["warmup"])
    lo = t["final_lr_fraction"]
    return t["lr"] * (lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * p)))


def train_dit(cfg: dict, gen: torch.Generator, log=print, snapshot=None):
    """Returns (EMA DiT, loss curve [(step, mean loss over the last log_every steps)]).

    snapshot: optional ``fn(step, ema)`` called every 10 * log_every steps (to watch quality during a run)."""
    t = cfg["train"]
    x, y = split(cfg, "train")
    dit = build_dit(cfg["model"])
    # eval(): the DiT has no dropout or batch norm, and eval mode switches off diffusers' per-block label
    # dropout (see the module docstring); gradients still flow.
    dit.eval()
    ema = copy.deepcopy(dit).requires_grad_(False)
    opt = torch.optim.AdamW(dit.parameters(), lr=t["lr"], weight_decay=t["weight_decay"])
    abar = torch.tensor(digits_spec().schedule.alphas_cumprod, dtype=torch.float32)
    n_t = len(abar)
    curve, acc, t0 = [], 0.0, time.time()
    for step in range(t["steps"]):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, t)
        idx = torch.randint(0, len(y), (t["batch"],), generator=gen)
        x0, labels = x[idx], y[idx].clone()
        labels[torch.rand(t["batch"], generator=gen) < t["label_dropout"]] = NULL_CLASS
        ts = torch.randint(0, n_t, (t["batch"],), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        a = abar[ts].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        pred = dit(xt, timestep=ts, class_labels=labels, return_dict=False)[0]
        loss = F.mse_loss(pred, eps)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dit.parameters(), t["grad_clip"])
        opt.step()
        decay = min(t["ema"], (1 + step) / (10 + step))  # EMA warmup so early steps are not frozen in
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), dit.parameters()):
                pe.lerp_(p, 1 - decay)
        acc += loss.detach().item()
        if (step + 1) % t["log_every"] == 0:
            curve.append((step + 1, acc / t["log_every"]))
            acc = 0.0
            if (step + 1) % (10 * t["log_every"]) == 0:
                log(f"  step {step + 1}/{t['steps']}  loss {curve[-1][1]:.4f}  {time.time() - t0:.0f}s")
                if snapshot is not None:
                    snapshot(step + 1, ema)
    return ema, curve


def save_state(module: torch.nn.Module, path: Path, dtype: torch.dtype) -> str:
    torch.save({k: v.detach().to(dtype).contiguous() for k, v in module.state_dict().items()}, path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DATA_DIR, help="output folder (default: the package data)")
    ap.add_argument("--dit-steps", type=int, default=None, help="override the DiT's training steps")
    ap.add_argument("--classifier-epochs", type=int, default=None)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--snapshots", action="store_true",
                    help="also save the EMA weights every 10 log intervals")
    ap.add_argument("--export-data", action="store_true",
                    help=f"only write {DATA_FILE} (digits + split) from scikit-learn into --out, then stop")
    args = ap.parse_args(argv)
    if args.export_data:
        args.out.mkdir(parents=True, exist_ok=True)
        d = CONFIG["data"]
        sha = export_digits_data(args.out / DATA_FILE, d["test_fraction"], d["split_seed"])
        print(f"wrote {args.out / DATA_FILE} (SHA-256 {sha})")
        return {"data_file": str(args.out / DATA_FILE), "sha256": sha}
    cfg = copy.deepcopy(CONFIG)
    if args.dit_steps is not None:
        cfg["train"]["steps"] = args.dit_steps
    if args.classifier_epochs is not None:
        cfg["classifier"]["epochs"] = args.classifier_epochs
    if args.seed is not None:
        cfg["seed"] = args.seed
    cfg["data"]["sha256"] = hashlib.sha256((DATA_DIR / DATA_FILE).read_bytes()).hexdigest()  # what it read
    args.out.mkdir(parents=True, exist_ok=True)

    t_start, cpu_start = time.time(), time.process_time()
    gen = seed_everything(cfg["seed"], cfg["threads"])
    print(f"training the digit classifier ({cfg['classifier']['epochs']} epochs)...", flush=True)
    clf, clf_stats = train_classifier(cfg, gen)
    t_clf = time.time() - t_start
    print(f"  classifier: test accuracy {clf_stats['test_accuracy']:.4f} ({t_clf:.0f}s)", flush=True)
    sha = save_state(clf, args.out / CLASSIFIER_WEIGHTS, torch.float32)
    clf_cfg = {"arch": cfg["classifier"]["arch"], "weights_sha256": sha, "training": cfg["classifier"],
               "data": cfg["data"], "seed": cfg["seed"], "seconds": round(t_clf, 1), **clf_stats}
    (args.out / CLASSIFIER_CONFIG).write_text(json.dumps(clf_cfg, indent=2) + "\n")

    print(f"training the digits DiT ({cfg['train']['steps']} steps)...", flush=True)
    t1 = time.time()
    snap = None
    if args.snapshots:
        snap = lambda s, m: save_state(m, args.out / f"snapshot_{s}.pt", torch.float16)  # noqa: E731
    ema, curve = train_dit(cfg, gen, log=lambda s: print(s, flush=True), snapshot=snap)
    t_dit = time.time() - t1
    sha = save_state(ema, args.out / WEIGHTS_FILE, torch.float16)
    with open(args.out / "digits_dit_loss.csv", "w") as f:
        f.write("step,loss\n")
        f.writelines(f"{s},{v:.6f}\n" for s, v in curve)
    total = time.time() - t_start
    meta = {**cfg, "weights_file": WEIGHTS_FILE, "weights_dtype": "float16", "weights_sha256": sha,
            "parameters": sum(p.numel() for p in ema.parameters()),
            "final_loss": curve[-1][1] if curve else None, "loss_curve": "digits_dit_loss.csv",
            "seconds": {"classifier": round(t_clf, 1), "dit": round(t_dit, 1), "total": round(total, 1),
                        "cpu_total": round(time.process_time() - cpu_start, 1)},
            "torch": torch.__version__, "classifier_test_accuracy": clf_stats["test_accuracy"]}
    (args.out / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    print(f"done in {total:.0f}s (classifier {t_clf:.0f}s, DiT {t_dit:.0f}s); final loss "
          f"{meta['final_loss']}; wrote {args.out}", flush=True)
    return meta


if __name__ == "__main__":
    main()
