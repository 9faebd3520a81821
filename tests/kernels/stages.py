"""Random solver-update stages for the kernel tests (the Triton kernel, the native op, the reference)."""

from __future__ import annotations

import math

import torch

from fewstep.kernels.solver_update import StageUpdate


def random_stage(structure, shape, out_dtype, in_dtype=None, *, seed=0, device="cpu", generator=None):
    """``(upd, state, net_out, net_in)`` for ``structure`` = (guided, has_ou, has_oc, reg_in, reg_out, has_z,
    has_net_in, rows in the state) on samples of ``shape``: coefficients uniform in [-2, 2) (float64), a
    float32 state and network output from one generator (``generator``, else seeded with ``seed``), net_in
    NaN-filled in ``in_dtype`` (default ``out_dtype``) so every element the stage must write is checked."""
    guided, ou, oc, reg_in, reg_out, z, ni, rows = structure
    g = generator if generator is not None else torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    nc = int(ou) + int(oc) + len(reg_in) + int(z)
    nr = len(reg_out) + int(ni)
    coef = tuple((torch.rand(nr * nc, generator=g, dtype=torch.float64) * 4 - 2).tolist())
    upd = StageUpdate(reg_in, reg_out, coef, ou, oc, z, ni, guided, noise_index=seed % 3)
    gg = 2 if guided else 1
    batch = (gg * shape[0],) + tuple(shape[1:])
    state = torch.randn(rows, n, generator=g).to(device)
    net_out = torch.randn(batch, generator=g).to(out_dtype).to(device)
    net_in = torch.full(batch, float("nan"), dtype=in_dtype or out_dtype, device=device)
    return upd, state, net_out, net_in
