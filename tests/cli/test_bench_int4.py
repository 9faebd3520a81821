"""``fewstep bench --quant int4|w4a8 --dry-run`` and the checks inside the INT4 GPU benchmarks
(fewstep/bench/int4_speed.py): on the CPU the Triton GEMMs run under the interpreter, the forward emulated."""

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("triton")

import fewstep.kernels.int4_gemm as I  # noqa: E402
import fewstep.quant.int4_linear as L  # noqa: E402
from fewstep.bench import int4_speed as S  # noqa: E402
from fewstep.bench.sample import build_dit  # noqa: E402
from fewstep.cli import main  # noqa: E402
from fewstep.quant import quantized_layers  # noqa: E402

CPU = torch.device("cpu")
only_cpu = pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU run is benchmarks/test_int4.py")
# these hand CPU tensors to the Triton kernels, which needs the interpreter (tests/conftest.py sets it only
# without CUDA); on a GPU the same checks run on the device in benchmarks/test_int4.py
interpreter = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors through the Triton kernels "
                                 "need the interpreter; the GPU run is benchmarks/test_int4.py")


@only_cpu
def test_int4_dry_run_prints_every_table(capsys):
    assert main(["bench", "--quant", "int4", "--dry-run"]) == 0
    out = capsys.readouterr().out
    for head in ("INT4 layers at", "INT4 kernels vs their references", "w4a16 gemm", "INT4 DiT forward",
                 "int4-emulated"):
        assert head in out
    assert "nan" not in out.lower() and "not measured" not in out
    # the forward benchmark quantized copies: the cached DiT the next benchmark gets is still unquantized
    assert quantized_layers(build_dit(S.DIT_INT4_TINY, CPU, torch.float32)) == {}


@only_cpu
def test_w4a8_dry_run_gemm(capsys):
    assert main(["bench", "--quant", "w4a8", "--dry-run", "--int4-what", "gemm"]) == 0
    out = capsys.readouterr().out
    assert "w4a8 gemm" in out and "INT4 DiT forward" not in out and "nan" not in out.lower()


@pytest.mark.parametrize("quant,what", [("int4", "gemm"), ("w4a8", "forward")])
def test_timing_without_a_gpu_is_a_clear_error(capsys, quant, what):
    if torch.cuda.is_available():
        pytest.skip("CPU-only check")
    assert main(["bench", "--quant", quant, "--int4-what", what]) != 0
    assert "needs a CUDA GPU" in capsys.readouterr().err


@interpreter
def test_int4_gemm_rows_carry_shapes_and_a_checked_output():
    r = S.bench_int4_gemm(16, 64, 128, CPU, group_size=64, model="tiny")
    assert (r.m, r.n, r.k, r.group_size, r.model) == (16, 64, 128, 64, "tiny")
    assert r.sqnr_vs_ref_db >= S.GEMM_SQNR_FLOOR_DB
    # 4-bit symmetric groups of Gaussian weights: 18.9 dB measured here; a wrong packing lands near 0 dB
    assert 15.0 < r.sqnr_vs_bf16_db < 25.0
    assert r.int4_us > 0 and r.bf16_us > 0 and r.target == 1.5
    assert S.Int4GemmResult("x", "m", 2048, 8, 8, 8, 1.0, 1.0, "c", 0.0, 0.0).target == 0.9
    assert S.Int4GemmResult("x", "m", 512, 8, 8, 8, 1.0, 1.0, "c", 0.0, 0.0).target is None


def _swap_nibbles(p):
    return ((p & 0xF) << 4) | (p >> 4)


@interpreter
def test_int4_gemm_check_fails_on_a_wrong_nibble_order(monkeypatch):
    real = I.int4_gemm
    monkeypatch.setattr(I, "int4_gemm", lambda a, packed, *args, **kw: real(a, _swap_nibbles(packed), *args,
                                                                             **kw))
    with pytest.raises(RuntimeError, match=r"int4_gemm 16x64x128 vs int4_gemm_ref: SQNR .* below the floor"):
        S.bench_int4_gemm(16, 64, 128, CPU, group_size=64)


@interpreter
def test_w4a8_gemm_rows_and_a_wrong_group_scale(monkeypatch):
    r = S.bench_w4a8_gemm(48, 64, 128, CPU, group_size=64)
    assert r.sqnr_vs_ref_db >= S.GEMM_SQNR_FLOOR_DB and r.fp8_sqnr_vs_ref_db >= S.GEMM_SQNR_FLOOR_DB
    assert 15.0 < r.sqnr_vs_bf16_db < 25.0 and r.speedup == r.fp8_us / r.w4a8_us
    real = I.w4a8_gemm
    # the two groups' scales swapped: a kernel indexing the wrong group
    monkeypatch.setattr(I, "w4a8_gemm", lambda a, s, packed, scales, *args, **kw: real(
        a, s, packed, scales.flip(1).contiguous(), *args, **kw))
    with pytest.raises(RuntimeError, match="w4a8_gemm 48x64x128 vs w4a8_gemm_ref"):
        S.bench_w4a8_gemm(48, 64, 128, CPU, group_size=64)


@interpreter
def test_forward_check_fails_when_the_kernel_layers_are_wrong(monkeypatch):
    """The Triton-mode forward (here: the layer's kernel replaced by its reference with swapped nibbles) must
    not lose more than FORWARD_SQNR_MARGIN_DB against its emulated twin."""
    if not torch.cuda.is_available():
        from fewstep.kernels.triton_support import interpreting

        if not interpreting():
            pytest.skip("needs TRITON_INTERPRET=1 (tests/conftest.py sets it without CUDA)")

    def broken(q, s, packed, *args, **kw):
        kw.pop("config", None)
        return I.w4a8_gemm_ref(q, s, _swap_nibbles(packed), *args, **kw)

    monkeypatch.setattr(L, "w4a8_gemm", broken)
    with pytest.raises(RuntimeError, match=r"DiT forward quant='w4a8' vs unquantized \(emulated: .* dB\)"):
        S.bench_int4_dit_forward(2, CPU, config=S.DIT_INT4_TINY, group_size=32, kernels=True)


def test_bad_forward_mode():
    with pytest.raises(ValueError, match="mode must be 'w4a8' or 'int4'"):
        S.bench_int4_dit_forward(2, CPU, mode="fp8", config=S.DIT_INT4_TINY)


@interpreter
def test_config_sweep_checks_every_candidate_and_picks_one():
    """The CUDA-only sweep over INT4_GEMM_CONFIGS, run here under the interpreter: BLOCK_K cut to the group,
    every candidate's output checked before it is timed."""
    from fewstep.kernels.int4_gemm import INT4_GEMM_CONFIGS, int4_gemm_ref, quantize_int4_ref

    x, w = S._operands(16, 64, 128, CPU)
    packed, scales, _ = quantize_int4_ref(w, 32, scale_dtype=torch.bfloat16)
    expect = int4_gemm_ref(x, packed, scales)
    seen = []

    def run(c):
        seen.append(c)
        return I.int4_gemm(x, packed, scales, config=c)

    us, cfg = S._config_sweep("w4a16", 32, run, expect, CPU)
    assert us > 0 and len({str(c) for c in seen}) == len(INT4_GEMM_CONFIGS["w4a16"])
    assert all(c.block_k == 32 for c in seen) and cfg in {str(c) for c in seen}
    bad = _swap_nibbles(packed)
    with pytest.raises(RuntimeError, match="w4a16 config .* below the floor"):
        S._config_sweep("w4a16", 32, lambda c: I.int4_gemm(x, bad, scales, config=c), expect, CPU)


@interpreter
def test_kernel_check_on_awkward_shapes_and_a_wrong_gate_row(monkeypatch):
    """check_int4_kernels (the GPU run's first check) here under the interpreter, on two of its cases; a
    kernel reading the gate of the wrong batch item fails it."""
    cases = [c for c in S.KERNEL_CASES if c[1] in (1, 3)]  # M = 1 (W4A16) and M = 3 (W4A8, zero points)
    rows = S.check_int4_kernels(CPU, cases)
    assert [(r.kind, r.m) for r in rows] == [("w4a16", 1), ("w4a8", 3)]
    assert all(r.sqnr_vs_ref_db >= S.GEMM_SQNR_FLOOR_DB for r in rows)  # 45-48 dB measured here
    real = I.int4_gemm

    def wrong_gate(*args, gate=None, **kw):
        return real(*args, gate=None if gate is None else gate.roll(1, 0), **kw)

    monkeypatch.setattr(I, "int4_gemm", wrong_gate)
    gated = [c for c in S.KERNEL_CASES if c[0] == "w4a16" and c[6] == "gated"]
    with pytest.raises(RuntimeError, match="w4a16 300x80x384 group 128 zero points False gated vs its _ref"):
        S.check_int4_kernels(CPU, gated)
