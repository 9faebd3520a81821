"""Activation-aware INT4 calibration (AWQ, Lin et al. 2023, arXiv:2306.00978) over a plan's own timesteps.

:class:`InputStats` hooks the linear layers of an *unquantized* network and records, per layer, the mean
``|x|`` of every input channel and a sample of input rows (a few per call, so every timestep of the plan
is represented).  :func:`awq_search` then picks, per layer,

* the per-input-channel scale ``s = mean|x| ** alpha`` (normalized), ``alpha`` on a grid in [0, 1] where 0 is
  round-to-nearest, minimizing the output error ``|| x W^T - (x / s) Q(W s)^T ||`` on the sampled rows;
* then per output channel and group a clip ratio of the group's range (AWQ's clipping search), minimizing
  that group's share of the same output error.

The search is done in fp32 with the numerics of :func:`fewstep.kernels.int4_gemm.quantize_int4_ref`, so the
layer that is built afterwards has exactly the weights the search measured.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..kernels.int4_gemm import dequantize_int4_ref, quantize_int4_ref

__all__ = ["InputStats", "LayerStats", "awq_search", "INT4_METHODS"]

INT4_METHODS = ("rtn", "awq")
ALPHAS = tuple(i / 10 for i in range(11))
CLIPS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)


@dataclass
class LayerStats:
    """One layer's inputs: ``mean_abs: (K,)`` fp32 and ``rows: (R, K)`` fp32 sampled inputs."""

    mean_abs: torch.Tensor
    rows: torch.Tensor


class InputStats:
    """Record the inputs of ``net``'s ``nn.Linear`` and 1x1 ``nn.Conv2d`` layers while it runs (a context
    manager).  rows_per_call: input rows kept per layer and call (evenly strided); max_rows: per layer."""

    def __init__(self, net: nn.Module, *, rows_per_call: int = 32, max_rows: int = 512, seed: int = 0):
        self.net, self.rows_per_call, self.max_rows = net, rows_per_call, max_rows
        self._sum: dict[str, torch.Tensor] = {}
        self._count: dict[str, int] = {}
        self._rows: dict[str, list[torch.Tensor]] = {}
        self._handles = []
        self._gen = torch.Generator().manual_seed(seed)

    def __enter__(self) -> "InputStats":
        for name, m in self.net.named_modules():
            if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)):
                self._handles.append(m.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, name: str):
        def hook(module, args):
            x = args[0].detach()
            if isinstance(module, nn.Conv2d):
                x = x.movedim(1, -1)
            x = x.reshape(-1, x.shape[-1]).float()
            s = x.abs().sum(0)
            self._sum[name] = self._sum[name] + s if name in self._sum else s
            self._count[name] = self._count.get(name, 0) + x.shape[0]
            kept = self._rows.setdefault(name, [])
            if sum(r.shape[0] for r in kept) < self.max_rows:
                idx = torch.randperm(x.shape[0], generator=self._gen)[: self.rows_per_call].to(x.device)
                kept.append(x[idx].cpu())

        return hook

    def result(self) -> dict[str, LayerStats]:
        """Per layer name (as ``net.named_modules()`` names it): its :class:`LayerStats`."""
        return {
            n: LayerStats(
                (self._sum[n] / max(self._count[n], 1)).cpu(), torch.cat(self._rows[n])[: self.max_rows]
            )
            for n in self._sum
        }


def _out_err(x: torch.Tensor, w: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
    return (x @ (w - wq).t()).pow(2).mean()


def awq_search(
    w: torch.Tensor,
    stats: LayerStats,
    group_size: int,
    *,
    zero_point: bool = False,
    scale_dtype: torch.dtype = torch.float32,
    alphas=ALPHAS,
    clips=CLIPS,
) -> tuple[torch.Tensor | None, torch.Tensor | None, dict]:
    """``(input_scale or None, clip or None, info)`` for the (N, K) weight ``w`` given its inputs' stats.

    info: ``{"alpha": best alpha, "rtn_error": output MSE of round-to-nearest, "error": after the search}``
    (measured on the sampled rows).  input_scale is None when round-to-nearest (alpha 0) is best, clip None
    when no group clips."""
    w = w.detach().float().reshape(w.shape[0], -1).cpu()
    x = stats.rows.float()
    n, k = w.shape
    if x.shape[1] != k:
        raise ValueError(f"stats: rows have {x.shape[1]} channels, the weight has K = {k}")

    def deq(wf, clip=None):
        return dequantize_int4_ref(
            *quantize_int4_ref(wf, group_size, zero_point=zero_point, scale_dtype=scale_dtype, clip=clip)
        )

    mag = stats.mean_abs.float().clamp_min(1e-5)
    best_alpha, best_err, best_s = 0.0, None, None
    rtn = None
    for alpha in alphas:
        s = mag.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        err = _out_err(x, w, deq(w * s) / s) if alpha else _out_err(x, w, deq(w))
        if alpha == 0:
            rtn = err
        if best_err is None or err < best_err:
            best_alpha, best_err, best_s = alpha, err, (s if alpha else None)
    ws = w * best_s if best_s is not None else w
    xs = x / best_s if best_s is not None else x
    # clip search: per (output channel, group) the ratio with the least output error of that group
    g = k // group_size
    xg = xs.reshape(-1, g, group_size)
    errs = []
    for c in clips:
        delta = (ws - deq(ws, torch.full((n, g), c))).reshape(n, g, group_size)
        errs.append(
            torch.cat(
                [
                    torch.einsum("rgk,ngk->rng", xg, d).pow(2).mean(0)  # (N, G), in chunks of N
                    for d in delta.split(256)
                ]
            )
        )
    pick = torch.stack(errs).argmin(0)
    clip = torch.tensor(clips)[pick]
    if bool((clip == 1.0).all()):
        clip = None
    wq = deq(ws, clip)
    final = _out_err(xs, ws, wq)
    if final > best_err:  # clipping per group cannot hurt the sum, but the fp rounding of ties can
        clip, final = None, best_err
    info = {
        "alpha": best_alpha,
        "rtn_error": float(rtn if rtn is not None else best_err),
        "error": float(final),
    }
    return best_s, clip, info
