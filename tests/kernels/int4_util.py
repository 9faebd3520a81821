"""Models of what a GPU's MMA does to the INT4 GEMMs' numbers, for the floors of the CUDA runs of the INT4
kernel and layer tests (on the CPU the interpreter computes in plain fp32 and the tests compare closely).

* W4A16 with fp32 activations: Triton's ``tl.dot`` on fp32 operands runs TF32 on the tensor cores (its
  default ``input_precision``): both operands keep 10 of their 23 mantissa bits.  Modelled as truncation,
  the pessimistic end (rounding halves the error).
* W4A8: the FP8 MMA keeps about 13-14 mantissa bits in its accumulator (tests/kernels/test_fp8_gemm.py);
  the kernel starts a fresh ``tl.dot`` per weight group, so the running sum is truncated to 13 bits after
  every 32 products inside a group, then scaled and added in fp32.

A floor is the model's SQNR against the exact float64 product less 6 dB (twice the model's error), at most
100 dB.
"""

import torch

from fewstep.kernels.int4_gemm import SYMMETRIC_ZERO, unpack_int4_ref

from .fp8_util import sqnr_db

TF32_BITS = 11  # significant bits of a TF32 operand: 10 stored + the implicit one
ACC_BITS = 13  # mantissa bits Hopper's FP8 accumulator keeps (tests/kernels/test_fp8_gemm.py)
MARGIN_DB = 6.0
CAP_DB = 100.0


def round_mantissa(x: torch.Tensor, bits: int) -> torch.Tensor:
    """``x`` (float64) truncated to ``bits`` significant bits, toward zero."""
    m, e = torch.frexp(x.double())
    return torch.ldexp(torch.trunc(m * 2.0**bits) / 2.0**bits, e)


def tf32(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a TF32 operand (float64, on the CPU)."""
    return round_mantissa(x.double().cpu(), TF32_BITS)


def w4a8_accumulation(aq: torch.Tensor, packed, scales, zeros=None, k_step: int = 32) -> torch.Tensor:
    """``aq @ W.T`` (float64, on the CPU; before the activation scale) as the W4A8 kernel sums it on a GPU:
    one FP8 MMA per group of ``q - zero`` with a 13-bit running sum, scaled by the group's scale in fp32."""
    a = aq.double().cpu()
    q = unpack_int4_ref(packed.cpu()).double()
    n, k = q.shape
    groups = scales.shape[1]
    g = k // groups
    z = zeros.cpu().double() if zeros is not None else torch.full((n, groups), float(SYMMETRIC_ZERO))
    qz = q - z.repeat_interleave(g, dim=1)
    s = scales.cpu().double()
    out = torch.zeros(a.shape[0], n, dtype=torch.float64)
    for j in range(groups):
        part = torch.zeros_like(out)
        for k0 in range(j * g, (j + 1) * g, k_step):
            part = round_mantissa(part + a[:, k0 : k0 + k_step] @ qz[:, k0 : k0 + k_step].t(), ACC_BITS)
        out = out + part * s[:, j]
    return out


def floor_db(model: torch.Tensor, exact: torch.Tensor) -> float:
    """The SQNR a GPU result must reach: the model's against ``exact``, less the margin, capped."""
    return min(CAP_DB, sqnr_db(model.double().cpu(), exact.double().cpu()) - MARGIN_DB)
