"""The native op ``fewstep::solver_update`` (csrc/, loaded by fewstep/kernels/native.py) against
``solver_update_ref`` for every solver's stages, the Triton kernel's noise stream (under the interpreter, with
a float64 oracle), the Triton launcher's input checks, ``torch.compile(fullgraph=True)``, the loader's refusal
of stale builds, setup.py's handling of a failed build, and (where nvcc / a GPU exist) the CUDA op."""

import os
import shutil
import subprocess
import sys
import sysconfig
import warnings

import numpy as np
import pytest
import torch

from fewstep.kernels import native
from fewstep.kernels.solver_update import StageUpdate, solver_update, solver_update_ref

from .programs import get_program, guided_toy_net, program_ids, toy_net
from .stages import random_stage

try:  # the noise and error-message comparisons run the Triton kernel (interpreted on CPU)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = tl = None

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
needs_cpu_op = pytest.mark.skipif(not native.available("cpu"),
                                  reason=f"fewstep._C is not built here: {native.load_error()}")
needs_triton = pytest.mark.skipif(triton is None, reason="compares with the Triton kernel: needs triton")
EPS = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}

# (guided, has_ou, has_oc, reg_in, reg_out, has_z, has_net_in, rows in the state)
STRUCTURES = [
    (False, False, False, (0,), (0,), False, True, 1),           # prologue: x -> x, net_in
    (False, False, True, (0,), (0,), False, True, 1),             # Euler
    (True, True, True, (0, 2), (0, 1), False, True, 3),           # guided multistep, history written
    (True, True, True, (0, 1, 2, 3), (0, 3, 1), True, True, 4),   # guided, noise, 4 registers read
    (False, False, True, (1, 0), (0,), True, False, 2),           # last stage: no net_in
    (True, False, True, (2, 0), (2, 0), True, True, 3),           # O_c only with guidance, rows swapped
    (True, True, True, (0, 1, 2, 3, 4, 5), (5, 0, 1, 2, 3), True, True, 6),  # 9 in, 6 out: generic
]
SHAPES = [(3, 3, 17, 23), (1, 4, 8, 8), (5, 1, 1, 7)]


def _make(structure, shape, out_dtype, in_dtype, seed=0):
    return random_stage(structure, shape, out_dtype, in_dtype, seed=seed)


def _assert_rel(got, want, tol=1e-6, what=""):
    assert torch.isfinite(got).all(), f"{what}: NaN/Inf"
    err = float((got.double() - want.double()).abs().max())
    scale = float(want.double().abs().max())
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:g} x {scale:.3g}"


def _compare_stage(upd, state, net_out, net_in, seed=1234):
    """Run the stage with the native op and the reference (fed the op's noise); compare every output."""
    n = state.shape[1]
    sd = torch.tensor([seed], dtype=torch.int64)
    z = torch.full((n,), float("nan"))
    st_n, ni_n = state.clone(), net_in.clone()
    native.solver_update_native(upd, st_n, net_out, ni_n, sd, z_out=z if upd.has_z else None)
    st_r, ni_r = state.clone(), net_in.clone()
    solver_update_ref(upd, st_r, net_out, ni_r, sd, z=z if upd.has_z else None)
    if upd.has_z:
        assert torch.isfinite(z).all()
    for row in range(state.shape[0]):
        if row in upd.reg_out:
            _assert_rel(st_n[row], st_r[row], what=f"state row {row}")
        else:
            assert torch.equal(st_n[row], state[row]), f"row {row} is not an output but changed"
    if upd.has_net_in:
        halves = ni_n.reshape(2 if upd.guided else 1, n)
        assert torch.equal(halves[0], halves[-1]), "the two halves of net_in differ"
        # the same fp32 value rounded once to the model dtype: at most one unit of that dtype apart
        _assert_rel(ni_n.float(), ni_r.float(), tol=max(1e-6, EPS[net_in.dtype]), what="net_in")
    else:  # bytes compared: NaN == NaN
        assert torch.equal(ni_n.view(torch.uint8), net_in.view(torch.uint8)), "net_in written without net_in"
    return st_n, ni_n, z


@needs_cpu_op
@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("out_dtype,in_dtype", [
    (torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
    (torch.float32, torch.bfloat16), (torch.float64, torch.float32)])
def test_matches_reference(structure, shape, out_dtype, in_dtype):
    upd, state, net_out, net_in = _make(structure, shape, out_dtype, in_dtype, seed=len(shape) + shape[0])
    _compare_stage(upd, state, net_out, net_in)


@needs_cpu_op
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("guidance", [None, 3.0])
@pytest.mark.parametrize("name", program_ids())
def test_every_solver_stage_matches_reference(name, guidance, dtype):
    """Every stage of every solver, run on the native op's own state: each stage equals the reference's."""
    prog = get_program(name, guidance)
    guided = guidance is not None
    model = guided_toy_net if guided else toy_net
    shape = (3, 3, 17, 23)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    n = noise.numel()
    state = torch.zeros(len(prog.registers), n)
    state[0] = noise.reshape(-1)
    net_in = torch.zeros((2 * shape[0] if guided else shape[0],) + shape[1:], dtype=dtype)
    k = 0
    for st in prog.stages:
        out = model(net_in.double(), st.call.time).to(dtype) if st.call is not None else None
        upd = StageUpdate.from_stage(st, prog.registers, guided, k)
        state, net_in, _ = _compare_stage(upd, state, out, net_in, seed=99)
        k += int(st.noise)
    assert torch.isfinite(state[0]).all()


# -- noise: the Triton kernel's Philox stream ----------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _philox_words(seed_ptr, a_ptr, b_ptr, noise_offset, n, BLOCK: tl.constexpr):
        """The two Philox words tl.randn turns into a normal draw (its randint4x outputs 0 and 1)."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        a, b, _, _ = tl.randint4x(tl.load(seed_ptr), noise_offset + offs.to(tl.int64))
        tl.store(a_ptr + offs, a.to(tl.int32, bitcast=True), mask=offs < n)
        tl.store(b_ptr + offs, b.to(tl.int32, bitcast=True), mask=offs < n)


def _noise_f64(seed: int, noise_offset: int, n: int) -> np.ndarray:
    """tl.randn's draws with the fp32 steps that define them (uniforms, angle) exact and log / sqrt / cos in
    float64: the oracle both fp32 implementations are measured against."""
    a, b = torch.empty(n, dtype=torch.int32), torch.empty(n, dtype=torch.int32)
    _philox_words[(triton.cdiv(n, 1024),)](torch.tensor([seed]), a, b, noise_offset, n, BLOCK=1024)
    a, b = a.numpy(), b.numpy()
    scale = np.float32(4.6566127342e-10)
    u1 = np.maximum(np.float32(1e-7), np.where(a < 0, ~a, a).astype(np.float32) * scale)
    u2 = np.where(b < 0, ~b, b).astype(np.float32) * scale
    th = np.float32(6.283185307179586) * u2
    return np.sqrt(-2.0 * np.log(u1.astype(np.float64))) * np.cos(th.astype(np.float64))


@needs_cpu_op
@needs_triton
@pytest.mark.parametrize("seed,noise_index,n", [
    (1234, 0, 2 * 3 * 17 * 23), (-5, 3, 5001), (2**62 + 5, 1, 4096),
    (7, 2**31, 12)])  # the last one: counters above 2**32
def test_noise_is_the_triton_stream(seed, noise_index, n):
    """Same Philox words and transform as the Triton kernel (run under the interpreter): the draws agree to a
    few ulp (the C library's logf / cosf vs numpy's), and the op's error against a float64 evaluation of the
    same transform is at most twice the interpreter's plus one ulp."""
    upd = StageUpdate((0,), (0,), (0.0, 1.0), False, False, True, False, False, noise_index)
    sd = torch.tensor([seed], dtype=torch.int64)
    z_nat, z_tri = torch.empty(n), torch.empty(n)
    st = torch.zeros(1, n)
    native.solver_update_native(upd, st, None, None, sd, z_out=z_nat)
    assert torch.equal(st[0], z_nat)  # coefficient 1 on z, 0 on x
    solver_update(upd, torch.zeros(1, n), None, None, sd, z_out=z_tri)
    exact = _noise_f64(seed, noise_index * n, n)
    ulp = np.spacing(np.abs(exact).astype(np.float32)).astype(np.float64)
    err_nat = np.abs(z_nat.numpy() - exact) / ulp
    err_tri = np.abs(z_tri.numpy() - exact) / ulp
    assert err_nat.max() <= 2 * err_tri.max() + 1, (err_nat.max(), err_tri.max())
    apart = np.abs(z_nat.numpy().astype(np.float64) - z_tri.numpy()) / ulp
    assert apart.max() <= 8, f"native and Triton draws {apart.max():.1f} ulp apart"


@needs_cpu_op
def test_noise_differs_by_seed_and_index():
    n = 4099
    draws = {}
    for seed, index in [(7, 0), (7, 1), (8, 0)]:
        z = torch.empty(n)
        upd = StageUpdate((0,), (0,), (0.0, 1.0), False, False, True, False, False, index)
        native.solver_update_native(upd, torch.zeros(1, n), None, None, torch.tensor([seed]), z_out=z)
        draws[seed, index] = z
    again = torch.empty(n)
    upd = StageUpdate((0,), (0,), (0.0, 1.0), False, False, True, False, False, 0)
    native.solver_update_native(upd, torch.zeros(1, n), None, None, torch.tensor([7]), z_out=again)
    assert torch.equal(again, draws[7, 0])
    for other in (draws[7, 1], draws[8, 0]):
        assert abs(float(torch.corrcoef(torch.stack([draws[7, 0], other]))[0, 1])) < 0.1


# -- bad input: the launcher's checks, shared ----------------------------------------------------------------

def _bad_cases():
    n = 12
    upd = StageUpdate((0,), (0,), (1.0, 1.0, 1.0, 1.0), False, True, False, True, False)
    noisy = StageUpdate((0,), (0,), (1.0, 1.0), False, False, True, False, False)
    st, out, ni = torch.zeros(1, n), torch.zeros(n), torch.zeros(n)
    return [
        ("float64 state", upd, (st.double(), out, ni, None), {}),
        ("1-d state", upd, (torch.zeros(n), out, ni, None), {}),
        ("not a tensor", upd, ([0.0] * n, out, ni, None), {}),
        ("non-contiguous state", upd, (torch.zeros(n, 2).t(), out, ni, None), {}),
        ("net_out size", upd, (st, torch.zeros(2 * n), ni, None), {}),
        ("integer net_out", upd, (st, torch.zeros(n, dtype=torch.int32), ni, None), {}),
        ("missing net_in", upd, (st, out, None, None), {}),
        ("missing seed", noisy, (st, None, None, None), {}),
        ("int32 seed", noisy, (st, None, None, torch.tensor([1], dtype=torch.int32)), {}),
        ("z_out size", noisy, (st, None, None, torch.tensor([1])), {"z_out": torch.zeros(n + 1)}),
        ("row out of range", StageUpdate((3,), (0,), (1.0,), False, False, False, False, False),
         (st, None, None, None), {}),
    ]


@needs_cpu_op
@needs_triton
@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_input_same_error_as_the_triton_launcher(case):
    _, upd, args, kwargs = case
    with pytest.raises(ValueError) as tri:
        solver_update(upd, *args, **kwargs)
    with pytest.raises(ValueError) as nat:
        native.solver_update_native(upd, *args, **kwargs)
    assert str(nat.value) == str(tri.value)


@needs_cpu_op
def test_direct_op_call_checks_bounds():
    """Called directly (no Python checks), the op still refuses what would read or write out of bounds."""
    st = torch.zeros(2, 8)
    with pytest.raises(RuntimeError, match="state row 5 out of range"):
        torch.ops.fewstep.solver_update(st, None, None, None, None, [5], [0], [1.0], False, False, False,
                                        False, False, 0)
    with pytest.raises(RuntimeError, match="net_in has 8 elements, expected 16"):
        torch.ops.fewstep.solver_update(st, None, torch.zeros(8), None, None, [0], [], [1.0], False, False,
                                        False, True, True, 0)
    with pytest.raises(RuntimeError, match="coef has 1 entries, expected 1 x 2"):
        torch.ops.fewstep.solver_update(st, None, None, None, None, [0, 1], [0], [1.0], False, False, False,
                                        False, False, 0)


# -- torch.compile -------------------------------------------------------------------------------------------

def _compiled_loop_case(steps=3):
    """A guided ancestral program (noise inside the graph) around a tiny network: (loop, fresh buffers)."""
    from .programs import VP, local_ancestral

    prog = local_ancestral(VP, steps, 2.0)
    shape = (3, 3, 5, 7)
    stages, k = [], 0
    for st in prog.stages:
        t = st.call.time if st.call is not None else None
        stages.append((StageUpdate.from_stage(st, prog.registers, True, k), t))
        k += int(st.noise)
    w = torch.randn(1, 3, 1, 1, generator=torch.Generator().manual_seed(0))
    conv = torch.nn.Conv2d(3, 3, 3, padding=1)
    torch.nn.init.normal_(conv.weight, std=0.1, generator=torch.Generator().manual_seed(1))

    def loop(state, net_in, seed):
        for upd, t in stages:
            out = conv(net_in) + w * net_in * (1 + t / 1000) if t is not None else None
            native.solver_update_native(upd, state, out, net_in, seed)
        return state[0].clone()

    def fresh():
        n = int(np.prod(shape))
        state = torch.zeros(len(prog.registers), n)
        state[0] = torch.randn(n, generator=torch.Generator().manual_seed(2))
        return state, torch.zeros((2 * shape[0],) + shape[1:]), torch.tensor([5])

    return loop, fresh


@needs_cpu_op
def test_compile_fullgraph_traces_the_loop():
    """Network calls and native updates trace as one graph (fullgraph=True fails on any break); through
    dynamo, functionalization of the in-place op and its Meta kernel, the result equals eager bit for bit."""
    loop, fresh = _compiled_loop_case()
    with torch.no_grad():
        eager = loop(*fresh())
        torch._dynamo.reset()
        compiled = torch.compile(loop, fullgraph=True, backend="aot_eager")(*fresh())
        state, net_in, seed = fresh()
        graph = torch._dynamo.explain(loop)(state, net_in, seed)
    assert graph.graph_break_count == 0 and graph.graph_count == 1
    assert torch.equal(compiled, eager)


@needs_cpu_op
@pytest.mark.slow
def test_compile_inductor_matches_eager():
    """The same loop through Inductor (generated C++ for the network, the op in place): same sample up to the
    network's float rounding (Inductor fuses the network's pointwise ops)."""
    loop, fresh = _compiled_loop_case(steps=2)
    with torch.no_grad():
        eager = loop(*fresh())
        torch._dynamo.reset()
        compiled = torch.compile(loop, fullgraph=True)(*fresh())
    _assert_rel(compiled, eager, tol=1e-5, what="inductor vs eager")


# -- the loader: stale or mismatched builds ------------------------------------------------------------------

def _fake_extension(tmp_path, info: bytes | None, name="_C.cpython-fake.so"):
    path = tmp_path / name
    path.write_bytes(b"\x7fELF-not-really" + (info or b"") + b"\x00padding")
    return str(path)


@pytest.mark.parametrize("info,why", [
    (None, "no fewstep build info"),
    (b"fewstep-native-build:api=999;torch=%s;cuda=0;", "op version 999"),
    (b"fewstep-native-build:api=%d;torch=0.0.1+other;cuda=0;", "built against torch 0.0.1+other"),
    (b"fewstep-native-build:api=%d;torch=%s;cuda=0;", "failed to load"),
])
def test_loader_refuses_stale_builds_with_one_warning(tmp_path, monkeypatch, info, why):
    if info is not None:
        info = info.replace(b"%d", str(native.NATIVE_API).encode()).replace(b"%s", torch.__version__.encode())
    path = _fake_extension(tmp_path, info)
    monkeypatch.setattr(native, "_extension_path", lambda: path)
    for name, value in [("_loaded", False), ("_devices", frozenset()), ("_error", None), ("_info", None)]:
        monkeypatch.setattr(native, name, value)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not native.available() and not native.available("cpu")
        upd = StageUpdate((0,), (0,), (1.0,), False, False, False, False, False)
        with pytest.raises(RuntimeError, match="use solver_update or solver_update_ref"):
            native.solver_update_native(upd, torch.zeros(1, 4), None, None, None)
    assert len(caught) == 1, [str(w.message) for w in caught]
    assert why in str(caught[0].message) and "ignoring the native extension" in str(caught[0].message)
    assert why in native.load_error()


def test_loader_without_a_build_is_silent():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        devices, info, why = native._load(None)
    assert devices == frozenset() and info is None and "not built" in why and not caught


@needs_cpu_op
def test_built_extension_records_this_torch():
    info = native.build_info()
    assert info == native.read_build_info(native._extension_path())
    assert info["torch"] == torch.__version__ and info["api"] == native.NATIVE_API
    assert str(torch.ops.fewstep.solver_update.default._schema) == native.SCHEMA


# -- setup.py: a failed build does not fail the install ------------------------------------------------------

def _copy_project(dst):
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), dst / name)
    shutil.copytree(os.path.join(ROOT, "csrc"), dst / "csrc")
    (dst / "fewstep").mkdir()
    (dst / "fewstep" / "__init__.py").write_text("")


@pytest.mark.parametrize("mode", ["compile_error", "skip"])
def test_setup_survives_a_failed_or_skipped_build(tmp_path, mode):
    if mode == "compile_error" and shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler")
    _copy_project(tmp_path)
    env = dict(os.environ, FEWSTEP_SKIP_CUDA_BUILD="1")
    if mode == "compile_error":
        src = tmp_path / "csrc" / "solver_update.cpp"
        src.write_text('#include "no_such_header_fewstep_test.h"\n' + src.read_text())
    else:
        env["FEWSTEP_SKIP_NATIVE_BUILD"] = "1"
    r = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    ours = [line for line in r.stdout.splitlines() if line.startswith("fewstep: ")]
    expected = "fewstep: native extension not built" if mode == "compile_error" else \
        "fewstep: native extension skipped: FEWSTEP_SKIP_NATIVE_BUILD=1"
    assert len(ours) == 1 and ours[0].startswith(expected), ours
    assert not list((tmp_path / "fewstep").glob("_C*")), "a failed build left an extension file behind"


# -- CUDA: compiles ahead of time where nvcc exists; bit-exact against Triton on a GPU ----------------------

@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
def test_cuda_op_compiles_for_sm80_and_sm90(tmp_path):
    """nvcc compiles csrc/solver_update.cu for sm_80 and sm_90 (ptxas included), with 128-bit loads and
    stores of the fp32 rows in the PTX of both."""
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths

    includes = [os.path.join(ROOT, "csrc")] + include_paths() + [sysconfig.get_paths()["include"]]
    if torch.version.cuda is None:  # a CPU wheel ships the c10/cuda headers but not this generated one
        shim = tmp_path / "shim" / "c10" / "cuda" / "impl"
        shim.mkdir(parents=True)
        (shim / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        includes.append(str(tmp_path / "shim"))
    keep = tmp_path / "keep"
    keep.mkdir()
    cmd = ["nvcc", "-c", os.path.join(ROOT, "csrc", "solver_update.cu"), "-o", str(tmp_path / "su.o"),
           "-std=c++20", "-O3", "-Xcompiler", "-fPIC", "--keep", "--keep-dir", str(keep), *COMMON_NVCC_FLAGS,
           "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"]
    cmd += [f"-I{d}" for d in includes]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    ptx = {p.name: p.read_text() for p in keep.glob("*.ptx")}
    for arch in ("80", "90"):
        text = "".join(v for k, v in ptx.items() if f"sm_{arch}" in k or f"compute_{arch}" in k)
        assert "sqrt.approx.ftz.f32" in text, f"sm_{arch}: no PTX kept ({sorted(ptx)})"
        assert "ld.global.v4.f32" in text and "st.global.v4.f32" in text, f"sm_{arch}: rows not vectorized"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("shape", [(3, 3, 17, 23), (2, 4, 32, 32)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_op_equals_the_triton_kernel_bit_for_bit(structure, shape, dtype):
    if not native.available("cuda"):
        pytest.skip(f"fewstep._C has no CUDA op here: {native.load_error() or 'built without CUDA'}")
    upd, state, net_out, net_in = _make(structure, shape, dtype, dtype, seed=shape[0])
    state, net_out, net_in = state.cuda(), net_out.cuda(), net_in.cuda()
    seed = torch.tensor([2**40 + 17], dtype=torch.int64, device="cuda")
    n = state.shape[1]
    results = []
    for run in (native.solver_update_native, solver_update):
        st, ni, z = state.clone(), net_in.clone(), torch.full((n,), float("nan"), device="cuda")
        run(upd, st, net_out, ni, seed, z_out=z if upd.has_z else None)
        results.append((st, ni, z))
    (st_n, ni_n, z_n), (st_t, ni_t, z_t) = results
    assert torch.equal(z_n.isnan(), z_t.isnan()) and torch.equal(z_n.nan_to_num(), z_t.nan_to_num())
    assert torch.equal(st_n, st_t)
    assert torch.equal(ni_n.float().nan_to_num(), ni_t.float().nan_to_num())
