"""The IR builder: register placement, pointer rotation, guidance folding, finiteness."""

import numpy as np
import pytest
import torch

import fewstep as fs
from fewstep.solvers.program import Lin, ProgramBuilder

SPEC = fs.ModelSpec(fs.schedules.DiscreteVP())
P = [SPEC.schedule.point_at_timestep(t) for t in (999, 700, 400, 100)] + [fs.schedules.Point(1.0, 0.0, 0.0)]


def test_lin_arithmetic_and_linearity_guard():
    a, b = Lin({"x": 2.0}), Lin({"x": 1.0, "h0": 3.0})
    assert (a + b).terms == {"x": 3.0, "h0": 3.0}
    assert (a - a).terms == {}
    assert (0.5 * b / 2).terms == {"x": 0.25, "h0": 0.75}
    with pytest.raises(TypeError, match="linear"):
        a * b


def _two_history_program():
    """A toy 2-step multistep method keeping the last two x0 predictions."""
    b = ProgramBuilder("toy", SPEC)
    x = b.start()
    hist = []
    for i in range(4):
        out, kept = b.call(x, P[i], keep=[x] + hist)
        x, hist = kept[0], kept[1:]
        d = out.x0
        x = 0.9 * x + 0.1 * d + sum((0.01 * h for h in hist), Lin())
        hist = ([d] + hist)[:2]
    return b.finish(x)


def test_history_rotates_by_pointer_not_copy():
    prog = _two_history_program()
    assert prog.registers == ("x", "h0", "h1")
    for st in prog.stages[1:-1]:
        written = [o for o in st.outputs if o.startswith("h")]
        assert len(written) == 1, f"one new history entry per stage, got writes {written}"
    # the slot written alternates: the older entry is overwritten, the newer stays in place
    slots = [next(o for o in st.outputs if o.startswith("h")) for st in prog.stages[1:-1]]
    assert slots[0] != slots[1] and slots[1] != slots[2]


def test_program_executes_same_as_direct_loop():
    prog = _two_history_program()
    torch.manual_seed(0)
    noise = torch.randn(3, 5, dtype=torch.float64)

    def model(x, t):
        return torch.sin(x) * (1 + t / 1000)

    got = fs.solvers.run_reference(prog, model, noise)
    # the same method written directly
    x, hist = noise.clone(), []
    for i in range(4):
        eps = model(x, P[i].model_time)
        d = (x - P[i].sigma * eps) / P[i].alpha
        x = 0.9 * x + 0.1 * d + sum((0.01 * h for h in hist), torch.zeros_like(x))
        hist = ([d] + hist)[:2]
    assert torch.allclose(got, x, rtol=1e-12, atol=1e-12)


def test_guidance_is_folded_into_coefficients():
    b = ProgramBuilder("g", SPEC, guidance_scale=3.0)
    x = b.start()
    out, (x,) = b.call(x, P[0], keep=[x])
    prog = b.finish(out.x0)
    st = prog.stages[1]
    cu, cc = st.coef("x", "O_u"), st.coef("x", "O_c")
    full = -P[0].sigma / P[0].alpha
    assert cu == pytest.approx(full * (1 - 3.0)) and cc == pytest.approx(full * 3.0)


def test_evaluation_point_reused_without_extra_register():
    """Heun-like: x_eval is a combination of kept registers, so no register holds it."""
    b = ProgramBuilder("h", SPEC)
    x = b.start()
    out, (x,) = b.call(x, P[0], keep=[x])
    d = out.x0
    x_eval = 0.5 * x + 0.5 * d
    out2, (x, d) = b.call(x_eval, P[1], keep=[x, d])
    prog = b.finish(x + out2.x0 - d)
    assert prog.registers == ("x", "h0")


def test_non_finite_coefficients_rejected_at_build():
    b = ProgramBuilder("bad", SPEC)
    x = b.start()
    out, (x,) = b.call(x, P[0], keep=[x])
    with pytest.raises(ValueError, match="non-finite"):
        b.finish(x * float("inf") + out.x0)


def test_noise_once_per_stage():
    b = ProgramBuilder("n", SPEC)
    b.start()
    b.noise()
    with pytest.raises(RuntimeError, match="once"):
        b.noise()


def test_describe_lists_every_call():
    prog = fs.solvers.build("euler", SPEC, 3)
    text = prog.describe()
    assert text.count("call ") == 3 and "prologue" in text
    assert len(prog.timesteps) == prog.nfe == 3
    assert np.all(np.diff(prog.sigmas) < 0)
