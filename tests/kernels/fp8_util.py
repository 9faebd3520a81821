"""Shared helpers of the FP8 kernel and layer tests."""

import torch


def sqnr_db(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of ``approx`` against ``exact`` in dB (NaN anywhere -> -inf)."""
    a, e = approx.double(), exact.double()
    if not torch.isfinite(a).all():
        return float("-inf")
    noise = (a - e).pow(2).mean()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(e.pow(2).mean() / noise))


def activations(m: int, k: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """Transformer-like activations: Gaussian tokens with a few large-magnitude channels (outliers)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    ch = torch.exp(torch.randn(k, generator=g) * 0.75)  # per-channel magnitudes over ~1.5 decades
    ch[torch.randperm(k, generator=g)[: max(1, k // 64)]] *= 8.0
    return (x * ch).to(dtype)
