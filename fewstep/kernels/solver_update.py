"""One fused kernel per solver stage: ``outputs = coef @ inputs``, per element, in fp32.

A stage of a :class:`~fewstep.solvers.program.StepProgram` reads some of: the network output halves ``O_u`` /
``O_c``, registers of the fp32 state (``x``, ``h0`` ..), fresh noise ``z``; and writes registers and the next
network input ``net_in`` (model dtype, duplicated into both halves with classifier-free guidance).

Buffers (all contiguous, same device):

* ``state``: ``(R, N)`` fp32, one row per register (``program.registers`` order), ``N = batch * C * H * W``.
* ``net_out``: the network output, ``G * N`` elements of any float dtype (``G = 2`` with guidance: ``[uncond;
  cond]``, else 1); None for the prologue.
* ``net_in``: ``G * N`` elements in the model dtype; both halves get the same value.
* ``seed``: ``(1,)`` int64, read on the device so that a graph replay with a new seed draws new noise.

Coefficients are scalars baked into the launch (captured with it by a CUDA graph): the kernel has no
coefficient table to load and a stage's launch is self-contained.  Which inputs and outputs exist, and the
register rows, are ``tl.constexpr``: one specialization per stage *structure*, shared by every stage with the
same structure.  Noise is Philox (``tl.randn``) keyed by the seed, with counter ``noise_index * N + element``,
so stages draw independent streams and the same seed reproduces a sample bit for bit.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .triton_support import LaunchConfig, check_launch, tl, triton

__all__ = ["StageUpdate", "solver_update", "solver_update_ref", "ref_noise", "KernelConfig", "pick_config",
           "KERNEL_CONFIGS", "check_stage_inputs"]


@dataclass(frozen=True)
class StageUpdate:
    """The kernel's view of one stage.

    Columns of ``coef`` (row-major, ``len(rows) x len(cols)``) are, in order: ``O_u`` (if ``has_ou``), ``O_c``
    (if ``has_oc``), the state rows ``reg_in``, ``z`` (if ``has_z``).  Rows: the state rows ``reg_out``, then
    ``net_in`` (if ``has_net_in``).
    """

    reg_in: tuple[int, ...]
    reg_out: tuple[int, ...]
    coef: tuple[float, ...]
    has_ou: bool
    has_oc: bool
    has_z: bool
    has_net_in: bool
    guided: bool
    noise_index: int = 0

    @property
    def n_cols(self) -> int:
        return int(self.has_ou) + int(self.has_oc) + len(self.reg_in) + int(self.has_z)

    @property
    def n_rows(self) -> int:
        return len(self.reg_out) + int(self.has_net_in)

    def __post_init__(self):
        if len(self.coef) != self.n_rows * self.n_cols:
            raise ValueError(f"coef has {len(self.coef)} entries, expected {self.n_rows} x {self.n_cols}")
        if self.n_cols == 0 and self.n_rows > 0:
            raise ValueError("a stage that writes outputs must read at least one input")
        if self.has_ou and not self.guided:
            raise ValueError("O_u (the unconditional half) exists only with guidance")

    @classmethod
    def from_stage(cls, stage, registers: Sequence[str], guided: bool, noise_index: int = 0) -> "StageUpdate":
        """Translate a :class:`~fewstep.solvers.program.Stage` (register names -> rows of ``registers``)."""
        ins, outs = list(stage.inputs), list(stage.outputs)
        unknown = [n for n in ins if n not in ("O_u", "O_c", "z") and n not in registers]
        unknown += [n for n in outs if n != "net_in" and n not in registers]
        if unknown:
            raise ValueError(f"stage uses names {unknown} that are not registers {list(registers)}")
        reg_in = [n for n in ins if n in registers]
        reg_out = [n for n in outs if n in registers]
        if not ins and outs:  # every output is exactly zero: read x with coefficient 0
            reg_in = [registers[0]]
        cols = (["O_u"] if "O_u" in ins else []) + (["O_c"] if "O_c" in ins else []) + reg_in
        cols += ["z"] if "z" in ins else []
        rows = reg_out + (["net_in"] if "net_in" in outs else [])
        coef = tuple(float(stage.coef(o, i)) for o in rows for i in cols)
        return cls(
            reg_in=tuple(registers.index(n) for n in reg_in),
            reg_out=tuple(registers.index(n) for n in reg_out),
            coef=coef,
            has_ou="O_u" in ins,
            has_oc="O_c" in ins,
            has_z="z" in ins,
            has_net_in="net_in" in outs,
            guided=guided,
            noise_index=noise_index,
        )


# The solver update's launch: ``block`` elements per program, ``num_warps``.  A plan records the one it used
# (``Plan.kernel_config``) and passes it back on every launch, so a loaded plan launches as it was built.
KernelConfig = LaunchConfig

# Candidate launch configs, as data.  Not yet measured on a GPU: 1024 elements / 4 warps is Triton's
# elementwise default (8 fp32 per thread, 128-bit accesses); tune on an H100 before trusting it.
KERNEL_CONFIGS: tuple[KernelConfig, ...] = (KernelConfig(1024, 4), KernelConfig(2048, 8))


def pick_config(n_elements: int) -> KernelConfig:
    """The launch config for ``n_elements`` per register (resolved once at plan build and recorded)."""
    return KERNEL_CONFIGS[0] if n_elements < (1 << 20) else KERNEL_CONFIGS[1]


if triton is not None:

    @triton.jit
    def _solver_update_kernel(
        state_ptr, net_out_ptr, net_in_ptr, seed_ptr, z_out_ptr,
        n, noise_offset, coef,
        REG_IN: tl.constexpr, REG_OUT: tl.constexpr,
        HAS_OU: tl.constexpr, HAS_OC: tl.constexpr, HAS_Z: tl.constexpr, HAS_NET_IN: tl.constexpr,
        GUIDED: tl.constexpr, STORE_Z: tl.constexpr, BLOCK: tl.constexpr,
    ):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        vals = ()  # every input is loaded before any output is stored: a register may be read and written
        if HAS_OU:
            vals = vals + (tl.load(net_out_ptr + offs, mask=mask).to(tl.float32),)
        if HAS_OC:
            vals = vals + (tl.load(net_out_ptr + GUIDED * n + offs, mask=mask).to(tl.float32),)
        for r in tl.static_range(len(REG_IN)):
            vals = vals + (tl.load(state_ptr + REG_IN[r] * n + offs, mask=mask),)
        if HAS_Z:
            z = tl.randn(tl.load(seed_ptr), noise_offset + offs.to(tl.int64))
            if STORE_Z:
                tl.store(z_out_ptr + offs, z, mask=mask)
            vals = vals + (z,)
        NC: tl.constexpr = len(vals)
        NR: tl.constexpr = len(REG_OUT) + HAS_NET_IN
        accs = ()
        for o in tl.static_range(NR):
            acc = vals[0] * coef[o * NC]
            for i in tl.static_range(1, NC):
                acc += vals[i] * coef[o * NC + i]
            accs = accs + (acc,)
        for o in tl.static_range(len(REG_OUT)):
            tl.store(state_ptr + REG_OUT[o] * n + offs, accs[o], mask=mask)
        if HAS_NET_IN:
            v = accs[NR - 1].to(net_in_ptr.dtype.element_ty)
            tl.store(net_in_ptr + offs, v, mask=mask)
            if GUIDED:
                tl.store(net_in_ptr + n + offs, v, mask=mask)


def check_stage_inputs(upd: StageUpdate, state, net_out, net_in, seed, z_out) -> int:
    """Check one stage's buffers as every solver-update backend needs them; returns ``N`` (a ValueError
    names the buffer, what was expected and what came)."""
    if not isinstance(state, torch.Tensor) or state.dim() != 2 or state.dtype != torch.float32:
        got = (f"{tuple(state.shape)} {state.dtype}" if isinstance(state, torch.Tensor)
               else type(state).__name__)
        raise ValueError(f"state: expected a (registers, N) float32 tensor, got {got}")
    if not state.is_contiguous():
        raise ValueError("state must be contiguous")
    r, n = state.shape
    used = upd.reg_in + upd.reg_out
    if used and max(used) >= r:
        raise ValueError(f"stage uses state row {max(used)} but state has {r} rows")
    g = 2 if upd.guided else 1
    named = {"net_out": (net_out, upd.has_ou or upd.has_oc), "net_in": (net_in, upd.has_net_in),
             "seed": (seed, upd.has_z), "z_out": (z_out, z_out is not None)}
    for name, (t, needed) in named.items():
        if not needed:
            continue
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: this stage needs a tensor, got {type(t).__name__}")
        if t.device != state.device:
            raise ValueError(f"{name}: expected device {state.device}, got {t.device}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    if upd.has_ou or upd.has_oc:
        if not net_out.is_floating_point() or net_out.numel() != g * n:
            raise ValueError(f"net_out: expected {g} x {n} floating-point elements, got {net_out.numel()} "
                             f"{net_out.dtype}")
    if upd.has_net_in and (not net_in.is_floating_point() or net_in.numel() != g * n):
        raise ValueError(f"net_in: expected {g} x {n} floating-point elements, got {net_in.numel()} "
                         f"{net_in.dtype}")
    if upd.has_z and (seed.dtype != torch.int64 or seed.numel() != 1):
        raise ValueError(f"seed: expected a (1,) int64 tensor, got {tuple(seed.shape)} {seed.dtype}")
    if z_out is not None and (z_out.dtype != torch.float32 or z_out.numel() != n):
        raise ValueError(f"z_out: expected {n} float32 elements, got {z_out.numel()} {z_out.dtype}")
    return n


_check = check_stage_inputs  # the name fewstep.kernels.native used first


def solver_update(upd: StageUpdate, state: torch.Tensor, net_out: torch.Tensor | None,
                  net_in: torch.Tensor | None, seed: torch.Tensor | None, *,
                  z_out: torch.Tensor | None = None, config: KernelConfig | None = None) -> None:
    """Run one stage in place with the fused Triton kernel.

    state: (R, N) fp32, contiguous.  net_out: G*N elements (G = 2 with guidance), any float dtype.  net_in:
    G*N elements, model dtype.  seed: (1,) int64.  z_out: optional (N,) fp32 that receives the noise drawn
    (a debug hook for tests).  config: the launch (default :func:`pick_config`); a plan passes the one it
    recorded.  Outputs are written in place (static buffers of a plan), nothing is allocated.  CPU tensors run
    under Triton's interpreter (``TRITON_INTERPRET=1`` set before triton is imported).
    """
    n = check_stage_inputs(upd, state, net_out, net_in, seed, z_out)
    if config is not None and not isinstance(config, KernelConfig):
        raise ValueError(f"config: expected a KernelConfig (block, num_warps), got {type(config).__name__}")
    check_launch(state.device, "solver_update")
    if upd.n_rows == 0:
        return
    if state.numel() >= 2**31 or (net_out is not None and net_out.numel() >= 2**31):
        raise ValueError(f"solver_update uses 32-bit offsets; state has {state.numel()} elements")
    cfg = config if config is not None else pick_config(n)
    dummy = state  # pointers a stage does not use are never dereferenced
    _solver_update_kernel[(triton.cdiv(n, cfg.block),)](
        state, net_out if net_out is not None else dummy, net_in if net_in is not None else dummy,
        seed if seed is not None else dummy, z_out if z_out is not None else dummy,
        n, upd.noise_index * n, upd.coef,
        REG_IN=upd.reg_in, REG_OUT=upd.reg_out, HAS_OU=upd.has_ou, HAS_OC=upd.has_oc, HAS_Z=upd.has_z,
        HAS_NET_IN=upd.has_net_in, GUIDED=upd.guided, STORE_Z=z_out is not None, BLOCK=cfg.block,
        num_warps=cfg.num_warps,
        enable_fp_fusion=True,  # FMA contraction: one rounding per term instead of two
    )


def ref_noise(seed: int, noise_index: int, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The reference path's noise for one stage: torch's generator keyed by (seed, noise_index).

    Not the kernel's Philox stream (tests feed the kernel's draws through ``z_out`` instead); the same
    (seed, noise_index) always gives the same draws.
    """
    key = hashlib.blake2b(f"{int(seed)}:{int(noise_index)}".encode(), digest_size=8).digest()
    g = torch.Generator(device="cpu").manual_seed(int.from_bytes(key, "little") & ((1 << 63) - 1))
    return torch.randn(n, generator=g, dtype=torch.float32).to(device)


def solver_update_ref(upd: StageUpdate, state: torch.Tensor, net_out: torch.Tensor | None,
                      net_in: torch.Tensor | None, seed: torch.Tensor | None, *,
                      z: torch.Tensor | None = None, z_out: torch.Tensor | None = None) -> None:
    """Plain-PyTorch :func:`solver_update` (same buffers, same fp32 math, in place).

    Noise: ``z`` if given (N elements), else :func:`ref_noise` from the seed (reads the seed on the host).
    """
    n = check_stage_inputs(upd, state, net_out, net_in, seed, z_out)
    if upd.n_rows == 0:
        return
    cols: list[torch.Tensor] = []
    if upd.has_ou or upd.has_oc:
        halves = net_out.reshape(-1).float().view(2 if upd.guided else 1, n)
        if upd.has_ou:
            cols.append(halves[0])
        if upd.has_oc:
            cols.append(halves[-1])
    cols += [state[r] for r in upd.reg_in]
    if upd.has_z:
        if z is not None:
            zz = z.reshape(-1).float()
        else:
            zz = ref_noise(int(seed.item()), upd.noise_index, n, state.device)
        if z_out is not None:
            z_out.view(-1).copy_(zz)
        cols.append(zz)
    nc = len(cols)
    accs = []
    for o in range(upd.n_rows):
        acc = cols[0] * upd.coef[o * nc]
        for i in range(1, nc):
            acc = acc + cols[i] * upd.coef[o * nc + i]
        accs.append(acc)
    for row, acc in zip(upd.reg_out, accs):
        state[row].copy_(acc)
    if upd.has_net_in:
        v = net_in.view(2 if upd.guided else 1, n)
        v.copy_(accs[-1].expand_as(v))
