"""Benchmark results files: the machine, versions and git SHA beside every row (GPU runs only)."""

from __future__ import annotations

import dataclasses
import json
import platform
import subprocess
import time
from pathlib import Path

import torch

__all__ = ["environment", "save_results"]


def environment(device: torch.device) -> dict:
    import diffusers

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:  # pragma: no cover
        triton_version = None
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        sha = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {"device": name,
            "torch": torch.__version__, "triton": triton_version, "diffusers": diffusers.__version__,
            "git_sha": sha, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def save_results(kind: str, results: list, device: torch.device, out_dir: Path) -> Path:
    """Write ``{environment, results}`` to ``out_dir/<kind>-<gpu>-<time>.json`` (real GPU runs only)."""
    if device.type != "cuda":
        raise ValueError("benchmark results are saved only from GPU runs")
    env = environment(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    gpu = "".join(ch if ch.isalnum() else "-" for ch in env["device"]).strip("-").lower()
    path = out_dir / f"{kind}-{gpu}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    rows = [dict(dataclasses.asdict(r), **{p: getattr(r, p) for p in ("speedup", "overhead_ratio",
                                                                       "step_overhead_us") if hasattr(r, p)})
            for r in results]
    path.write_text(json.dumps({"environment": env, "results": rows}, indent=2) + "\n")
    return path


