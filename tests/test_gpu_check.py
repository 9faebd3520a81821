"""scripts/gpu_check.py without a GPU: the offline wheel install, the results folder's overwrite rule, the
table of README targets, one-line errors.  (`make test` also runs the whole dry run.)"""

import base64
import hashlib
import importlib.util
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
gc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gc)


def _stub_wheel(folder: Path, name: str = "fewstep_stub_pkg", version: str = "0.1") -> Path:
    """A minimal pure-Python wheel (PEP 427 layout) built by hand: no build backend, no network."""
    info = f"{name}-{version}.dist-info"
    files = {f"{name}/__init__.py": f"VALUE = {version!r}\n",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{info}/WHEEL": ("Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                 "Tag: py3-none-any\n")}
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    record.append(f"{name}-{version}.dist-info/RECORD,,")
    files[f"{name}-{version}.dist-info/RECORD"] = "\n".join(record) + "\n"
    whl = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        for path, text in files.items():
            z.writestr(path, text)
    return whl


def test_offline_install_from_the_wheel_folder(tmp_path):
    wheels = tmp_path / "whl"
    wheels.mkdir()
    _stub_wheel(wheels)
    target = tmp_path / "site"
    gc.pip_install_offline(["fewstep_stub_pkg"], wheels, extra=("--target", str(target)))
    out = subprocess.run([sys.executable, "-c", "import fewstep_stub_pkg as p; print(p.VALUE)"],
                         env={"PYTHONPATH": str(target)}, capture_output=True, text=True)
    assert out.stdout.strip() == "0.1", out.stderr
    with pytest.raises(gc.CheckError, match="offline install of .*nothing_like_this"):
        gc.pip_install_offline(["nothing_like_this"], wheels, extra=("--target", str(target)))
    with pytest.raises(gc.CheckError, match="no wheels in .*make wheels"):
        gc.pip_install_offline(["diffusers"], tmp_path / "absent")


def test_results_folder_overwrites_only_its_own_files(tmp_path):
    w = gc.ResultsFolder(tmp_path)
    w.write_text("summary.md", "one")
    w.save_manifest()
    (tmp_path / "notes.md").write_text("a person's notes")
    again = gc.ResultsFolder(tmp_path)  # a re-run with the same SHA
    again.write_text("summary.md", "two")
    assert (tmp_path / "summary.md").read_text() == "two"
    with pytest.raises(gc.CheckError, match="not written by gpu-check"):
        again.write_text("notes.md", "x")
    assert (tmp_path / "notes.md").read_text() == "a person's notes"


def test_targets_table_pass_and_fail():
    results = {
        "bench": {"solver_step": [{"solver": "dpmpp_2m", "shape": [8, 4, 32, 32], "fused_us": 4.2},
                                  {"solver": "dpmpp_2m", "shape": [1, 4, 64, 64], "fused_us": 9.0}],
                  "sample": [{"batch": 8, "nfe": 8, "overhead_ratio": 1.05}]},
        "bench-compiled": {"sample": [{"batch": 8, "nfe": 8, "compiled_plan_ms": 79.0}]},
        "fp8": {"fp8_gemm": [{"m": 4096, "n": 1152, "k": 1152, "vs_scaled_mm": 0.8,
                              "sqnr_vs_scaled_mm_db": 48.0}],
                "fp8_producer": [{"m": 512, "d": 1152, "n": 3456, "speedup": 0.5},
                                 {"m": 4096, "d": 1152, "n": 3456, "speedup": 1.3}],
                "fp8_forward": [{"batch": 16, "fp8_ms": 7.0}]},
    }
    rows = {what: (value, ok) for what, value, _, ok in gc.targets(results)}
    assert rows["solver update per step, dpmpp_2m 8x4x32x32 (us)"] == (4.2, True)
    assert rows["plan / network calls in one graph, DiT-XL/2 b8 NFE 8"] == (1.05, False)
    assert rows["compile_network plan, DiT-XL/2 b8 NFE 8 (ms)"] == (79.0, True)
    assert rows["fp8_gemm vs _scaled_mm, 4096x1152x1152 (x)"] == (0.8, False)
    assert rows["fp8_gemm output vs _scaled_mm, 4096x1152x1152 (dB)"] == (48.0, True)
    assert rows["fused producer + GEMM vs bf16, 4096x1152->3456 (x)"] == (1.3, True)
    assert rows["FP8 DiT-XL/2 forward, batch 16 (ms)"] == (7.0, False)
    assert len(rows) == 7  # only the README's shapes: not the 1x4x64x64 step, not the M=512 producer


def test_summary_marks_a_dry_run(tmp_path):
    (tmp_path / "bench.json").write_text(json.dumps({"solver_step": [], "sample": []}))
    env = {"git_sha": "0" * 40, "gpu": "cpu", "driver": None, "cuda": None, "python": "3", "torch": "t",
           "triton": "x", "diffusers": "d", "time": "now"}
    text = gc.summary(tmp_path, env, {"bench": "ok (1 s)"}, dry=True)
    assert "**Dry run**" in text and "| bench | ok (1 s) |" in text


def test_missing_package_is_one_line(monkeypatch):
    monkeypatch.setattr(gc, "_has", lambda mod: mod != "diffusers")
    with pytest.raises(gc.CheckError) as e:
        gc.environment(dry=True)
    assert "diffusers is not installed" in str(e.value) and "\n" not in str(e.value)


def test_int4_step_has_a_budget_after_fp8_and_the_default_fits_one_command():
    names = list(gc.STEPS)
    assert names.index("int4") == names.index("fp8") + 1
    limit, dry_limit, least = gc.STEPS["int4"]
    assert 0 < least <= limit and dry_limit > 0
    assert gc.DEFAULT_BUDGET < 600  # a lent GPU machine runs one command for at most 10 minutes


def _int4_results():
    gemm = {"model": "Flux", "n": 3072, "k": 3072, "group_size": 128, "sqnr_vs_ref_db": 50.0}
    return {"int4_kernels": [{"sqnr_vs_ref_db": 47.0}, {"sqnr_vs_ref_db": 45.0}],
            "int4_gemm": [dict(gemm, m=1, int4_us=10.0, bf16_us=16.0),  # 1.6x: met
                          dict(gemm, m=64, int4_us=10.0, bf16_us=14.0),  # 1.4x: not
                          dict(gemm, m=512, int4_us=10.0, bf16_us=1.0),  # no target at M = 512
                          dict(gemm, m=4096, int4_us=100.0, bf16_us=89.0, sqnr_vs_ref_db=39.0)],  # 0.89x
            "w4a8_gemm": [dict(gemm, m=4096, w4a8_us=100.0, fp8_us=95.0),
                          dict(gemm, m=8192, w4a8_us=100.0, fp8_us=85.0)],
            "w4a8_forward": [{"batch": 16, "fp8_ms": 10.0, "int4_ms": 10.9, "int4_sqnr_db": 20.0,
                              "int4_emulated_sqnr_db": 21.5}]}


def test_int4_targets_table_pass_and_fail():
    rows = {what: (value, goal, ok) for what, value, goal, ok in gc.targets({"int4": _int4_results()})}
    assert rows["int4_gemm (W4A16) vs cuBLAS bf16, Flux 1x3072x3072 (x)"] == (1.6, ">= 1.5", True)
    assert rows["int4_gemm (W4A16) vs cuBLAS bf16, Flux 64x3072x3072 (x)"] == (1.4, ">= 1.5", False)
    assert rows["int4_gemm (W4A16) vs cuBLAS bf16, Flux 4096x3072x3072 (x)"] == (0.89, ">= 0.9", False)
    assert rows["w4a8_gemm vs fewstep fp8_gemm, Flux 4096x3072x3072 (x)"] == (0.95, ">= 0.9", True)
    assert rows["w4a8_gemm vs fewstep fp8_gemm, Flux 8192x3072x3072 (x)"] == (0.85, ">= 0.9", False)
    assert rows["int4_gemm output vs int4_gemm_ref, worst of 4 (dB)"] == (39.0, ">= 40", False)
    assert rows["w4a8_gemm output vs w4a8_gemm_ref, worst of 2 (dB)"] == (50.0, ">= 40", True)
    ratio, _, ok = rows["W4A8 / FP8 DiT-XL/2 forward time, batch 16 (x)"]
    assert ratio == pytest.approx(1.09) and ok
    assert rows["W4A8 DiT-XL/2 forward SQNR minus its emulation's (dB)"] == (-1.5, ">= -1", False)
    awkward = "INT4 GEMMs on awkward shapes and epilogues vs their _ref, worst of 2 (dB)"
    assert rows[awkward] == (45.0, ">= 40", True)
    assert len(rows) == 10  # not the M = 512 GEMM


def test_int4_rows_survive_a_time_out(tmp_path):
    """benchmarks/test_int4.py appends each row as it is measured; after a time-out (no int4.json) the summary
    reads the rows so far, and a line cut off mid-write is left out."""
    lines = [{"kind": "int4_gemm", "model": "Flux", "m": 1, "n": 3072, "k": 3072, "int4_us": 10.0,
              "bf16_us": 20.0, "sqnr_vs_ref_db": 50.0},
             {"kind": "w4a8_gemm", "model": "Flux", "m": 4096, "n": 3072, "k": 3072, "w4a8_us": 10.0,
              "fp8_us": 9.5, "sqnr_vs_ref_db": 50.0}]
    (tmp_path / gc.INT4_ROWS).write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"kind": "int4_ge')
    rows = gc.int4_rows(tmp_path / gc.INT4_ROWS)
    assert rows["int4_gemm"] == [{k: v for k, v in lines[0].items() if k != "kind"}]
    assert len(rows["w4a8_gemm"]) == 1 and rows["w4a8_forward"] == []
    env = {"git_sha": "0" * 40, "gpu": "H100", "driver": "1", "cuda": "12", "python": "3", "torch": "t",
           "triton": "x", "diffusers": "d", "time": "now"}
    text = gc.summary(tmp_path, env, {"int4": "TIMEOUT after 150 s"}, dry=False)
    assert "| int4_gemm (W4A16) vs cuBLAS bf16, Flux 1x3072x3072 (x) | 2 | >= 1.5 | pass |" in text
    assert "| w4a8_gemm vs fewstep fp8_gemm, Flux 4096x3072x3072 (x) | 0.95 | >= 0.9 | pass |" in text


def test_run_step_clears_the_step_json_before_it_runs(tmp_path, monkeypatch):
    """A step that dies leaves no JSON behind: an earlier run's figures are never summarized as this one's."""
    w = gc.ResultsFolder(tmp_path)
    w.write_text("int4.json", "{}")
    w.write_text(gc.INT4_ROWS, "{}\n")
    w.save_manifest()

    class Dies:
        pid = 0

        def __init__(self, *a, **k):
            pass

        def wait(self, timeout=None):
            return 1

    monkeypatch.setattr(gc.subprocess, "Popen", Dies)
    status = gc.run_step("int4", gc.ResultsFolder(tmp_path), dry=True, timeout=1)
    assert status.startswith("FAILED")
    assert not (tmp_path / "int4.json").exists() and not (tmp_path / gc.INT4_ROWS).exists()


def test_int4_dry_step_writes_rows_the_summary_reads(tmp_path):
    """The dry step's rows come from the same dataclasses as the GPU rows: every field int4_targets reads is
    there (the tiny M = 16 GEMM has a target, so it makes a row)."""
    pytest.importorskip("diffusers")
    import torch

    from fewstep.kernels.triton_support import interpreting

    if torch.cuda.is_available() or not interpreting():
        pytest.skip("the CPU dry run: TRITON_INTERPRET=1 (tests/conftest.py sets it without CUDA)")
    assert gc._step_int4(tmp_path, torch.device("cpu"), True) == 0
    results = json.loads((tmp_path / "int4.json").read_text())
    assert all(len(results[k]) == 1 for k in gc.INT4_KINDS)
    rows = {what: value for what, value, _, _ in gc.int4_targets(results)}
    assert rows["int4_gemm (W4A16) vs cuBLAS bf16, tiny 16x64x128 (x)"] > 0
    assert rows["int4_gemm output vs int4_gemm_ref, worst of 1 (dB)"] >= 40
    assert rows["INT4 GEMMs on awkward shapes and epilogues vs their _ref, worst of 1 (dB)"] >= 40
    assert rows["w4a8_gemm output vs w4a8_gemm_ref, worst of 1 (dB)"] >= 40


def test_tune_dit_step_sits_before_compile_network_and_keeps_the_budget():
    names = list(gc.STEPS)
    assert names.index("tune") < names.index("tune-dit") == names.index("bench-compiled") - 1
    limit, dry_limit, least = gc.STEPS["tune-dit"]
    assert 120 < limit and 0 < least <= limit and dry_limit > 0  # the 120 s target is measured, not cut off
    assert gc.DEFAULT_BUDGET == 540.0


def test_tune_dit_target_pass_and_fail():
    def rows(wall, model="DiT-XL/2", batch=16):
        r = {"tune-dit": {"fs_tune": [{"model": model, "batch": batch, "wall_s": wall}]}}
        return {what: (value, goal, ok) for what, value, goal, ok in gc.targets(r)}

    assert rows(95.0) == {"fs.tune DiT-XL/2 batch 16 (s)": (95.0, "<= 120", True)}
    assert rows(121.0) == {"fs.tune DiT-XL/2 batch 16 (s)": (121.0, "<= 120", False)}
    assert rows(1.0, model="DiT (tiny)") == {} and rows(1.0, batch=8) == {}


def test_tune_dit_dry_step_writes_the_row_the_summary_reads(tmp_path):
    """The dry step runs fs.tune on the tiny DiT (short teacher and budget) and records every field the GPU
    row carries; as a DiT-XL/2 row it makes the README target's line in summary.md."""
    pytest.importorskip("diffusers")
    import math

    import torch

    assert gc._step_tune_dit(tmp_path, torch.device("cpu"), True) == 0
    (row,) = json.loads((tmp_path / "tune-dit.json").read_text())["fs_tune"]
    assert (row["model"], row["batch"], row["solver"], row["nfe"]) == ("DiT (tiny)", 16, "unipc", 8)
    assert (row["calibration_samples"], row["holdout_samples"]) == (12, 4)
    assert row["budget"] == 64 and row["teacher"].endswith("nfe=20")
    # the teacher's 20 calls, the untuned program on the calibration noises, at most the budget of 64 for the
    # search, the untuned and tuned programs on the held-out noises (100 measured here)
    assert 20 + row["nfe"] < row["network_calls"] <= 20 + 64 + 3 * row["nfe"]
    assert 0 < row["tune_seconds"] <= row["wall_s"]
    assert math.isfinite(row["holdout_before"]) and math.isfinite(row["holdout_after"])
    assert row["improved"] == (row["holdout_after"] < row["holdout_before"])
    assert "network calls" in row["summary"] and len(row["timesteps_after"]) == row["nfe"]
    (tmp_path / "tune-dit.json").write_text(json.dumps({"fs_tune": [dict(row, model="DiT-XL/2")]}))
    env = {"git_sha": "0" * 40, "gpu": "H100", "driver": "1", "cuda": "12", "python": "3", "torch": "t",
           "triton": "x", "diffusers": "d", "time": "now"}
    text = gc.summary(tmp_path, env, {"tune-dit": "ok (9 s)"}, dry=False)
    assert f"| fs.tune DiT-XL/2 batch 16 (s) | {row['wall_s']:.3g} | <= 120 | pass |" in text
