"""Solver-update details that `make mutate` found untested: the plain-PyTorch reference on its own against a
float64 evaluation written out here (the kernel tests bound the kernel by the reference's own error, so a
wrong reference loosened the bound instead of failing), its own noise stream (``ref_noise``, which no test
reached: every kernel test feeds the kernel's draws to the reference through ``z``), the launch config's size
threshold, the 32-bit offset guard, the launcher's error when it cannot run, and the launch options."""

import hashlib

import pytest
import torch

pytest.importorskip("triton")

from fewstep.kernels import solver_update as su  # noqa: E402
from fewstep.kernels.solver_update import (  # noqa: E402
    KERNEL_CONFIGS,
    KernelConfig,
    StageUpdate,
    pick_config,
    ref_noise,
    solver_update,
    solver_update_ref,
)

from ..kernels.stages import random_stage  # noqa: E402

# (guided, has_ou, has_oc, reg_in, reg_out, has_z, has_net_in, rows in the state): every column kind alone
# and together, a register read and written, outputs without net_in, net_in without register outputs.
STRUCTURES = [
    (False, False, False, (0,), (0,), False, True, 1),
    (False, False, True, (0,), (0,), False, True, 1),
    (True, True, False, (1,), (1,), False, True, 2),
    (True, False, True, (0,), (), False, True, 1),
    (True, True, True, (0, 2), (0, 1), False, True, 3),
    (True, True, True, (0, 1, 2, 3), (0, 3, 1), True, True, 4),
    (False, False, True, (1, 0), (0,), True, False, 2),
    (False, False, False, (2, 0, 1), (1, 2), True, False, 3),
]
U32 = 2.0**-24  # unit roundoff of float32


def _make(structure, n, net_dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    upd, state, net_out, net_in = random_stage(structure, (n,), net_dtype, seed=seed, generator=g)
    return upd, state, net_out, net_in, torch.randn(n, generator=g)


def _exact(upd, state, net_out, z):
    """Rows of the stage in float64, ``{register row or 'net_in': (value, sum of |term|)}``, written out from
    StageUpdate's documented layout: columns O_u (first half), O_c (second half, or the only one), the
    registers ``reg_in`` in order, z; rows ``reg_out`` in order, then net_in."""
    n = state.shape[1]
    cols = []
    if upd.guided and upd.has_ou:
        cols.append(net_out.double()[:n])
    if upd.has_oc:
        cols.append(net_out.double()[n:] if upd.guided else net_out.double())
    cols += [state[r].double() for r in upd.reg_in]
    if upd.has_z:
        cols.append(z.double())
    out = {}
    for o, row in enumerate(list(upd.reg_out) + (["net_in"] if upd.has_net_in else [])):
        terms = [upd.coef[o * len(cols) + i] * c for i, c in enumerate(cols)]
        out[row] = (sum(terms), sum(t.abs() for t in terms))
    return out


def _check_row(got, value, size, n_terms, dtype=torch.float32):
    """float32 evaluation of a sum of ``n_terms`` products: each product and each addition rounds once, the
    coefficient rounds to float32 once (Higham, Accuracy and Stability, 2nd ed., eq. 3.5: |error| <=
    gamma_{n_terms + 1} * sum |term|); a narrower net_in adds its own rounding (half an ulp of the value).
    A bound, not a fit: over 20 seeds of every structure here the error reached 0.74 of it in float32 and 0.99
    with bfloat16's rounding (which attains its half ulp); the 1% covers gamma's second-order terms."""
    assert torch.isfinite(got).all()
    bound = 1.01 * (n_terms + 1) * U32 * size
    if dtype != torch.float32:
        bound = bound + torch.finfo(dtype).eps / 2 * value.abs() * 1.01
    err = (got.double() - value).abs()
    assert (err <= bound).all(), float((err - bound).max())


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("net_dtype", [torch.float32, torch.bfloat16])
def test_reference_matches_float64(structure, net_dtype):
    n = 37
    upd, state, net_out, net_in, z = _make(structure, n, net_dtype, seed=len(structure[3]) + 5 * structure[0])
    st, ni = state.clone(), net_in.clone()
    seed = torch.tensor([5], dtype=torch.int64)  # unused: z is given
    solver_update_ref(upd, st, net_out, ni, seed, z=z.double() if upd.has_z else None)
    exact = _exact(upd, state, net_out, z)
    nc = upd.n_cols
    for r in range(state.shape[0]):
        if r in upd.reg_out:
            _check_row(st[r], *exact[r], nc)
        else:
            assert torch.equal(st[r], state[r])
    if upd.has_net_in:
        halves = ni.view(2 if upd.guided else 1, n)
        for h in halves:
            _check_row(h, *exact["net_in"], nc, net_dtype)
    else:
        assert torch.isnan(ni.float()).all()


def test_reference_writes_the_noise_it_used():
    upd, state, net_out, net_in, z = _make(STRUCTURES[5], 29, seed=1)
    z_out = torch.full((29,), float("nan"))
    solver_update_ref(upd, state.clone(), net_out, net_in.clone(), torch.tensor([11]), z=z, z_out=z_out)
    assert torch.equal(z_out, z)
    seed = torch.tensor([11], dtype=torch.int64)
    solver_update_ref(upd, state.clone(), net_out, net_in.clone(), seed, z_out=z_out)
    assert torch.equal(z_out, _noise_written_out(11, upd.noise_index, 29))


def _noise_written_out(seed, index, n):
    """ref_noise's documented stream: torch's CPU generator seeded with the first 8 bytes (little endian, top
    bit cleared) of BLAKE2b over "seed:index"."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    key = int.from_bytes(digest, "little") % 2**63
    return torch.randn(n, generator=torch.Generator().manual_seed(key), dtype=torch.float32)


@pytest.mark.parametrize("seed, index", [(0, 0), (7, 0), (7, 1), (2**40 + 3, 5), (123456789, 2)])
def test_ref_noise_is_the_documented_stream(seed, index):
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    got = ref_noise(seed, index, 53)
    assert got.dtype == torch.float32 and got.device.type == "cpu" and got.shape == (53,)
    assert torch.equal(got, _noise_written_out(seed, index, 53)), digest.hex()


def test_ref_noise_is_float32_whatever_the_default_dtype():
    """Under torch.set_default_dtype(torch.float64) the stream is still the float32 one (float64 draws are
    other numbers, not a wider copy of the same ones)."""
    want = _noise_written_out(7, 1, 19)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = ref_noise(7, 1, 19)
    finally:
        torch.set_default_dtype(old)
    assert got.dtype == torch.float32 and torch.equal(got, want)


def test_reference_noise_follows_the_state_device():
    """The reference draws on the host and moves the noise to the state's device (meta stands in for a GPU: a
    CPU tensor mixed into a meta state's arithmetic is an error)."""
    upd = StageUpdate((0,), (0,), (0.5, 2.0), False, False, True, False, False, noise_index=1)
    state = torch.empty(1, 40, device="meta")
    seed = torch.tensor([3], dtype=torch.int64, device="meta")
    seed_item = 3
    orig = torch.Tensor.item

    def item(t):  # a meta tensor has no value: the seed the test put in
        return seed_item if t.device.type == "meta" else orig(t)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.Tensor, "item", item)
        solver_update_ref(upd, state, None, None, seed)
    assert state.device.type == "meta"
    assert ref_noise(3, 1, 40, "meta").device.type == "meta"


def test_launch_config_threshold():
    """1024 elements / 4 warps below 2**20 elements per register, 2048 / 8 from there on."""
    assert KERNEL_CONFIGS[0] == KernelConfig(1024, 4) and KERNEL_CONFIGS[1] == KernelConfig(2048, 8)
    for n, want in [(1, KERNEL_CONFIGS[0]), (2**20 - 1, KERNEL_CONFIGS[0]), (2**20, KERNEL_CONFIGS[1]),
                    (2**21, KERNEL_CONFIGS[1]), (3 * 2**21, KERNEL_CONFIGS[1])]:
        assert pick_config(n) == want, n


class _NoLaunch:
    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            raise AssertionError("launched")

        return launch


@pytest.mark.parametrize("case", ["state", "net_out"])
def test_32_bit_offsets_are_checked(monkeypatch, case):
    """The kernel's offsets are int32: 2**31 elements in the state, or in a guided network output of 2**30
    elements per half, is a ValueError before launch (meta tensors: no memory)."""
    monkeypatch.setattr(su, "check_launch", lambda device, op: None)
    monkeypatch.setattr(su, "_solver_update_kernel", _NoLaunch())
    if case == "state":
        upd = StageUpdate((0,), (0,), (1.0,), False, False, False, False, False)
        state, net_out = torch.empty(2, 2**30, device="meta"), None
    else:
        upd = StageUpdate((0,), (0,), (1.0, 1.0), False, True, False, False, True)
        state, net_out = torch.empty(1, 2**30, device="meta"), torch.empty(2**31, device="meta")
    with pytest.raises(ValueError, match="32-bit offsets"):
        solver_update(upd, state, net_out, None, None)
    small = StageUpdate((0,), (0,), (1.0, 1.0), False, True, False, False, True)
    with pytest.raises(AssertionError, match="launched"):  # one element fewer per half: launched
        solver_update(small, torch.empty(1, 2**30 - 1, device="meta"), torch.empty(2**31 - 2, device="meta"),
                      None, None)


def test_launcher_names_itself_and_the_reference_when_it_cannot_run():
    upd = StageUpdate((0,), (0,), (1.0,), False, False, False, False, False)
    with pytest.raises(RuntimeError, match=r"^solver_update runs on CUDA tensors.*use solver_update_ref$"):
        solver_update(upd, torch.empty(1, 8, device="meta"), None, None, None)


@pytest.mark.parametrize("fn", [solver_update, solver_update_ref])
def test_bad_z_out_is_an_error(fn):
    upd = StageUpdate((0,), (0,), (0.0, 1.0), False, False, True, False, False)
    seed = torch.tensor([1], dtype=torch.int64)
    for z_out in (torch.zeros(16, dtype=torch.float64), torch.zeros(32)):
        with pytest.raises(ValueError, match="z_out: expected 16 float32"):
            fn(upd, torch.zeros(1, 16), None, None, seed, z_out=z_out)


def test_launch_asks_for_fma_contraction(monkeypatch):
    """The launch contracts a*b + c to FMA (one rounding per term) whatever TRITON_DEFAULT_FP_FUSION says:
    Triton reads that variable only when the launch leaves enable_fp_fusion unset (None), and Triton 3.9 warns
    that its unset default turns to no fusion in 3.10 (triton/knobs.py, FP_FUSION_DEFAULT_WARNING)."""
    seen = []
    kernel = su._solver_update_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append(kwargs)
                return kernel[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(su, "_solver_update_kernel", Spy())
    upd = StageUpdate((0,), (0,), (2.0,), False, False, False, False, False)
    state = torch.ones(1, 8)
    solver_update(upd, state, None, None, None)
    assert torch.equal(state, torch.full((1, 8), 2.0))
    [kw] = seen
    assert kw["enable_fp_fusion"] is True
