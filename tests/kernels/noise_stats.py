"""Statistics for noise streams: is one stage's noise another's (or its own) shifted by a few elements?"""

import torch


def max_shifted_corr(a: torch.Tensor, b: torch.Tensor, max_shift: int) -> tuple[float, int]:
    """The largest |Pearson correlation| of ``a[s:]`` with ``b[:-s]`` and of ``a[:-s]`` with ``b[s:]`` over
    shifts ``s`` in 0..max_shift, and the signed shift where it occurs."""
    best, where = 0.0, 0
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    n = a.numel()
    for s in range(max_shift + 1):
        for sign, (x, y) in ((1, (a[s:], b[:n - s])), (-1, (a[:n - s], b[s:]))):
            c = abs(float(torch.corrcoef(torch.stack([x, y]))[0, 1]))
            if c > best:
                best, where = c, sign * s
    return best, where


def corr_bound(n: int) -> float:
    """For two independent N(0, 1) streams of n draws the sample correlation is ~N(0, 1/n): 6 standard
    deviations exceed it with probability 2e-9 per comparison (under 1e-6 over every comparison a test makes);
    a stream that is another one shifted has correlation 1."""
    return 6 / n**0.5


def check_streams_independent(zs, bound: float) -> None:
    """Every stream uncorrelated with itself shifted by 1..len(zs) elements, and every pair of streams
    uncorrelated at every shift in -(len(zs)+2)..len(zs)+2."""
    zs = [z.double().reshape(-1) for z in zs]
    m = len(zs)
    for k, z in enumerate(zs):
        for s in range(1, m + 1):
            c = abs(float(torch.corrcoef(torch.stack([z[s:], z[:-s]]))[0, 1]))
            assert c < bound, f"stage {k}'s noise correlates {c:.3f} with itself shifted by {s}"
        for j in range(k):
            c, s = max_shifted_corr(z, zs[j], m + 2)
            assert c < bound, f"stage {k}'s noise correlates {c:.3f} with stage {j}'s shifted by {s}"
