"""The fused solver-update kernel (under TRITON_INTERPRET=1 on CPU) against its PyTorch reference, a float64
evaluation, and ``run_reference`` for every registered solver."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton")

import fewstep as fs  # noqa: E402
from fewstep.kernels import solver_update as su  # noqa: E402
from fewstep.kernels.solver_update import (  # noqa: E402
    KernelConfig,
    StageUpdate,
    pick_config,
    solver_update,
    solver_update_ref,
)

from .noise_stats import check_streams_independent, corr_bound  # noqa: E402
from .programs import get_program, guided_toy_net, program_ids, toy_net  # noqa: E402
from .stages import random_stage  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
EPS = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}

# (guided, has_ou, has_oc, reg_in, reg_out, has_z, has_net_in, rows in the state)
STRUCTURES = [
    (False, False, False, (0,), (0,), False, True, 1),          # prologue: x -> x, net_in
    (False, False, True, (0,), (0,), False, True, 1),            # Euler
    (True, True, True, (0, 2), (0, 1), False, True, 3),          # guided multistep, history written
    (True, True, True, (0, 1, 2, 3), (0, 3, 1), True, True, 4),  # guided, noise, 4 registers read
    (False, False, True, (1, 0), (0,), True, False, 2),          # last stage: no net_in
]
SHAPES = [(3, 3, 17, 23), (1, 4, 8, 8), (5, 1, 1, 7)]


def _make(structure, shape, net_dtype, seed=0):
    return random_stage(structure, shape, net_dtype, seed=seed, device=DEV)


def _f64(upd, state, net_out, z):
    """The stage in float64 from the same (already rounded) inputs: ``{row or 'net_in': values}``."""
    n = state.shape[1]
    cols = []
    halves = net_out.double().reshape(2 if upd.guided else 1, n)
    if upd.has_ou:
        cols.append(halves[0])
    if upd.has_oc:
        cols.append(halves[-1])
    cols += [state[r].double() for r in upd.reg_in]
    if upd.has_z:
        cols.append(z.double())
    rows = list(upd.reg_out) + (["net_in"] if upd.has_net_in else [])
    return {r: sum(upd.coef[o * len(cols) + i] * c for i, c in enumerate(cols)) for o, r in enumerate(rows)}


def _check_close(got, ref32, exact, dtype=torch.float32):
    """Error vs float64 at most 2x plain PyTorch's in the same dtype (flash-attention's rule), plus one
    rounding unit."""
    assert torch.isfinite(got).all(), "NaN/Inf in kernel output"
    e_kernel = (got.double() - exact).abs()
    e_torch = (ref32.double() - exact).abs()
    unit = EPS[dtype] * exact.abs().max()
    assert e_kernel.max() <= 2 * e_torch.max() + unit, (float(e_kernel.max()), float(e_torch.max()))


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("net_dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_reference(structure, shape, net_dtype):
    upd, state, net_out, net_in = _make(structure, shape, net_dtype, seed=len(shape) + shape[0])
    seed = torch.tensor([1234], dtype=torch.int64, device=DEV)
    n = state.shape[1]
    z = torch.full((n,), float("nan"), device=DEV)
    st_k, ni_k = state.clone(), net_in.clone()
    solver_update(upd, st_k, net_out, ni_k, seed, z_out=z if upd.has_z else None)
    if upd.has_z:
        assert torch.isfinite(z).all()
    st_r, ni_r = state.clone(), net_in.clone()
    solver_update_ref(upd, st_r, net_out, ni_r, seed, z=z if upd.has_z else None)
    exact = _f64(upd, state.cpu(), net_out.cpu(), z.cpu())
    for row in upd.reg_out:
        _check_close(st_k[row].cpu(), st_r[row].cpu(), exact[row])
    untouched = [r for r in range(state.shape[0]) if r not in upd.reg_out]
    for r in untouched:
        assert torch.equal(st_k[r], state[r])
    if upd.has_net_in:
        halves = ni_k.reshape(2 if upd.guided else 1, n)
        assert torch.equal(halves[0], halves[-1])
        _check_close(halves[0].cpu(), ni_r.reshape(-1)[:n].cpu(), exact["net_in"], net_dtype)
    else:
        assert torch.isnan(ni_k.float()).all()  # not written


def test_noise_reproducible_and_independent():
    upd = StageUpdate((0,), (0,), (0.0, 1.0), False, False, True, False, False, noise_index=0)
    n = 2 * 3 * 17 * 23
    seed = torch.tensor([7], dtype=torch.int64, device=DEV)

    def draw(s, index):
        seed.fill_(s)
        st = torch.zeros(1, n, device=DEV)
        solver_update(StageUpdate(upd.reg_in, upd.reg_out, upd.coef, False, False, True, False, False, index),
                      st, None, None, seed)
        return st[0].cpu()

    a, b, c, d = draw(7, 0), draw(7, 0), draw(8, 0), draw(7, 1)
    assert torch.equal(a, b)
    for other in (c, d):
        assert not torch.equal(a, other)
        assert abs(float(torch.corrcoef(torch.stack([a, other]))[0, 1])) < 0.1
    for z in (a, c, d):
        assert torch.isfinite(z).all()
        assert abs(float(z.mean())) < 5 / n**0.5 and abs(float(z.std()) - 1) < 0.05
    big = torch.tensor([2**62 + 5], dtype=torch.int64, device=DEV)
    st = torch.zeros(1, n, device=DEV)
    solver_update(upd, st, None, None, big)
    assert torch.isfinite(st).all() and not torch.equal(st[0].cpu(), a)


def test_noise_streams_of_stages_are_not_shifted_copies():
    """Stage k of one plan draws Philox counters [k*N, (k+1)*N): no stage's noise is another's shifted by a
    few elements (the counter offset ``noise_index`` instead of ``noise_index * N`` makes stage k stage 0's
    noise shifted by k), and each stream is uncorrelated with itself shifted (independent counters).
    N is odd and not a multiple of the launch block."""
    n, stages = 1531, 6
    seed = torch.tensor([2024], dtype=torch.int64, device=DEV)
    zs = []
    for k in range(stages):
        st = torch.zeros(1, n, device=DEV)
        z = torch.empty(n, device=DEV)
        solver_update(StageUpdate((0,), (0,), (0.0, 1.0), False, False, True, False, False, noise_index=k),
                      st, None, None, seed, z_out=z)
        assert torch.equal(st[0], z)  # coefficient 1 on the noise: the state is the noise drawn
        zs.append(z.cpu())
    bound = corr_bound(n)
    check_streams_independent(zs, bound)


def _run_kernel_program(prog, model, noise, update):
    """Execute ``prog`` stage by stage with ``update`` (kernel or reference) in fp32; returns (x, noises)."""
    guided = prog.guidance_scale is not None
    b, n = noise.shape[0], noise.numel()
    state = torch.zeros(len(prog.registers), n, device=DEV)
    state[0] = noise.reshape(-1)
    net_in = torch.zeros((2 * b if guided else b,) + noise.shape[1:], device=DEV)
    seed = torch.tensor([99], dtype=torch.int64, device=DEV)
    zs, k = [], 0
    for st in prog.stages:
        out = None
        if st.call is not None:
            out = model(net_in.double().cpu(), st.call.time).float().to(DEV)
        z = torch.empty(n, device=DEV) if st.noise else None
        update(StageUpdate.from_stage(st, prog.registers, guided, k), state, out, net_in, seed, z_out=z)
        if st.noise:
            zs.append(z.view(noise.shape).cpu())
            k += 1
    return state[0].view(noise.shape).cpu(), zs


@pytest.mark.parametrize("guidance", [None, 3.0])
@pytest.mark.parametrize("name", program_ids())
def test_every_solver_matches_run_reference(name, guidance):
    prog = get_program(name, guidance)
    model = guided_toy_net if guidance is not None else toy_net
    noise = torch.randn(3, 3, 17, 23, generator=torch.Generator().manual_seed(3))
    got, zs = _run_kernel_program(prog, model, noise.to(DEV), solver_update)
    assert len(zs) == sum(st.noise for st in prog.stages)
    feed = list(zs)
    ref32, _ = _run_kernel_program(prog, model, noise.to(DEV), lambda *a, z_out=None: solver_update_ref(
        *a, z=feed.pop(0).reshape(-1).to(DEV) if z_out is not None else None, z_out=z_out))
    exact = fs.solvers.run_reference(prog, model, noise.double(), step_noise=zs)
    assert torch.isfinite(got).all() and torch.isfinite(exact).all()
    rel = float((got.double() - exact).norm() / exact.norm())
    rel32 = float((ref32.double() - exact).norm() / exact.norm())
    assert rel <= max(2 * rel32, 1e-6), (rel, rel32)


def test_launcher_rejects_bad_buffers():
    upd = StageUpdate((0,), (0,), (1.0, 1.0, 1.0, 1.0), False, True, False, True, False)
    n = 12
    state, out, net_in = torch.zeros(1, n, device=DEV), torch.zeros(n, device=DEV), torch.zeros(n, device=DEV)
    with pytest.raises(ValueError, match="float32"):
        solver_update(upd, state.double(), out, net_in, None)
    with pytest.raises(ValueError, match=r"net_out: expected 1 x 12"):
        solver_update(upd, state, torch.zeros(2 * n, device=DEV), net_in, None)
    with pytest.raises(ValueError, match="net_in"):
        solver_update(upd, state, out, None, None)
    noisy = StageUpdate((0,), (0,), (1.0, 1.0), False, False, True, False, False)
    with pytest.raises(ValueError, match="seed"):
        solver_update(noisy, state, None, None, None)
    with pytest.raises(ValueError, match="rows"):
        bad_row = StageUpdate((3,), (0,), (1.0,), False, False, False, False, False)
        solver_update(bad_row, state, None, None, None)
    with pytest.raises(ValueError, match="entries"):
        StageUpdate((0,), (0,), (1.0, 2.0), False, False, False, False, False)


class _SpyKernel:
    """Stands in for the Triton kernel: records each launch's grid and keywords, then runs the real one."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((grid, kwargs))
            return self.kernel[grid](*args, **kwargs)

        return launch


@pytest.mark.parametrize("config", [KernelConfig(64, 2), KernelConfig(8192, 8), None])
def test_given_launch_config_is_used(monkeypatch, config):
    """A plan passes the launch config it recorded: the launcher must launch that one, not its own pick."""
    structure = STRUCTURES[2]  # guided multistep: two registers written, net_in duplicated
    upd, state, net_out, net_in = _make(structure, SHAPES[0], torch.float32)
    n = state.shape[1]  # 3519: not a multiple of any block, so the tail is masked
    spy = _SpyKernel(su._solver_update_kernel)
    monkeypatch.setattr(su, "_solver_update_kernel", spy)
    st_k, ni_k = state.clone(), net_in.clone()
    solver_update(upd, st_k, net_out, ni_k, None, config=config)
    want = config if config is not None else pick_config(n)
    assert config is None or config != pick_config(n)  # a given config differs from the launcher's own pick
    [(grid, kw)] = spy.launches
    assert (kw["BLOCK"], kw["num_warps"]) == (want.block, want.num_warps)
    assert grid == (-(-n // want.block),)
    st_r, ni_r = state.clone(), net_in.clone()
    solver_update_ref(upd, st_r, net_out, ni_r, None)
    exact = _f64(upd, state, net_out, None)
    for row in upd.reg_out:
        _check_close(st_k[row].cpu(), st_r[row].cpu(), exact[row].cpu())
    _check_close(ni_k.reshape(2, n)[1].cpu(), ni_r.reshape(2, n)[1].cpu(), exact["net_in"].cpu())


def test_bad_launch_config_is_a_clear_error():
    upd, state, net_out, net_in = _make(STRUCTURES[1], SHAPES[1], torch.float32)
    with pytest.raises(ValueError, match=r"config: expected a KernelConfig .* got tuple"):
        solver_update(upd, state, net_out, net_in, None, config=(1024, 4))
    with pytest.raises(ValueError, match="block: expected a power of two, got 1000"):
        KernelConfig(1000, 4)
    with pytest.raises(ValueError, match="num_warps: expected one of"):
        KernelConfig(1024, 3)


_AOT = textwrap.dedent('''
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from fewstep.kernels.solver_update import StageUpdate, _solver_update_kernel as k
    cases = [StageUpdate((0, 2), (0, 1), (0.5,) * 12, True, True, False, True, True),
             StageUpdate((0, 1, 2), (0, 2), (0.25,) * 15, False, True, True, True, False, 3),
             StageUpdate((0,), (0,), (1.0, 2.0), False, False, False, True, False)]
    for upd, (o, i) in zip(cases, [("bf16", "bf16"), ("fp32", "fp16"), ("fp32", "fp32")]):
        sig = {"state_ptr": "*fp32", "net_out_ptr": "*" + o, "net_in_ptr": "*" + i, "seed_ptr": "*i64",
               "z_out_ptr": "*fp32", "n": "i32", "noise_offset": "i32", "coef": ("fp32",) * len(upd.coef)}
        cx = dict(REG_IN=upd.reg_in, REG_OUT=upd.reg_out, HAS_OU=upd.has_ou, HAS_OC=upd.has_oc,
                  HAS_Z=upd.has_z, HAS_NET_IN=upd.has_net_in, GUIDED=upd.guided, STORE_Z=upd.has_z,
                  BLOCK=1024)
        sig.update(dict.fromkeys(cx, "constexpr"))
        attrs = {(j,): [["tt.divisibility", 16]] for j in range(6)}
        c = triton.compile(ASTSource(k, sig, constexprs=cx, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": 4})
        assert c.asm["cubin"] and "ld.global.v4" in c.asm["ptx"], "no cubin / loads not vectorized"
    print("ok")
''')


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests launch the compiled kernel directly")
def test_kernel_compiles_for_h100():
    """The interpreter does not prove the kernel compiles: compile it for sm_90 with ptxas (no GPU needed)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", _AOT], env=env, capture_output=True, text=True, timeout=300)
    if r.returncode != 0 and "ptxas" in r.stderr and "not found" in r.stderr:
        pytest.skip("ptxas not available")
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]
