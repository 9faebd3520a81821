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
