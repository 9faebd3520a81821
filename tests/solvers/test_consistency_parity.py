import math

import pytest
import torch

import fewstep as fs
from fewstep.solvers.reference import count_calls
from fewstep.solvers.schedules import EDM, DiscreteVP, Flow

from .harness import diffusers_sample, guided_toy_model, rel_err, toy_model

diffusers = pytest.importorskip("diffusers")
import diffusers.schedulers.scheduling_consistency_models as cm_module  # noqa: E402
import diffusers.schedulers.scheduling_flow_match_euler_discrete as fm_module  # noqa: E402
import diffusers.schedulers.scheduling_lcm as lcm_module  # noqa: E402
import diffusers.schedulers.scheduling_tcd as tcd_module  # noqa: E402

SHAPE = (2, 3, 4, 5)
VP = DiscreteVP(beta_schedule="scaled_linear")


def _randn(seed):
    return torch.randn(*SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def feed_noise(monkeypatch, module, zs):
    """Make `module`'s randn_tensor hand out `zs` in order (diffusers' own per-step draws, made explicit)."""
    it = iter(zs)
    monkeypatch.setattr(module, "randn_tensor",
                        lambda shape, **kw: next(it).to(kw.get("dtype") or torch.float64))


def pipeline_loop(sch, model, noise, steps, guidance=None, set_kw=None, step_kw=None):
    """A diffusers pipeline's loop: scale_model_input, model (CFG), step; returns sample and time inputs."""
    sch.set_timesteps(steps, **(set_kw or {}))
    x, times = noise * sch.init_noise_sigma, []
    for t in sch.timesteps:
        inp = sch.scale_model_input(x, t)
        if guidance is None:
            out = model(inp, float(t))
        else:
            u, c = model(torch.cat([inp, inp]), float(t)).chunk(2)
            out = u + guidance * (c - u)
        times.append(float(t))
        x = sch.step(out, t, x, **(step_kw or {})).prev_sample
    return x, times


def _run_ours(prog, model, noise, zs):
    fn, seen = count_calls(model)
    return fs.solvers.run_reference(prog, fn, noise, step_noise=zs), seen


def _assert_matches_noisy(monkeypatch, module, sch, prog, nfe, seed):
    """``prog`` and ``sch`` (whose step() draws noise from ``module``) on the same noise: same calls, same
    sample."""
    noise, zs = _randn(seed), [_randn(100 * seed + 100 + i) for i in range(nfe)]
    feed_noise(monkeypatch, module, zs)
    ref, times = pipeline_loop(sch, toy_model, noise, nfe)
    ours, seen = _run_ours(prog, toy_model, noise, zs)
    assert seen == times
    # measured 1.6e-7 (LCM/TCD from config, float32 diffusers tables); 6x margin
    assert rel_err(ours, ref) <= 1e-6


# -- LCM ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("nfe", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("guidance", [None, 3.0])
def test_lcm_matches_diffusers(monkeypatch, pred, nfe, guidance):
    spec = fs.ModelSpec(VP, pred)
    prog = fs.solvers.build("lcm", spec, nfe, guidance_scale=guidance)
    sch = fs.solvers.to_diffusers("lcm", spec)
    assert type(sch).__name__ == "LCMScheduler"
    noise, zs = _randn(0), [_randn(100 + i) for i in range(nfe)]
    model = toy_model if guidance is None else guided_toy_model
    feed_noise(monkeypatch, lcm_module, zs)
    ref, times = pipeline_loop(sch, model, noise, nfe, guidance)
    ours, seen = _run_ours(prog, model, noise, zs)
    assert len(seen) == prog.nfe == nfe == len(times)
    assert seen == times  # integer timesteps, exactly
    assert prog.stochastic == (nfe > 1)
    # measured 4.2e-7 (float32 diffusers tables); 5x margin
    assert rel_err(ours, ref) <= 2e-6


@pytest.mark.parametrize("orig,scaling,nfe", [(25, 10.0, 4), (50, 0.05, 6), (8, 10.0, 8)])
def test_lcm_options_match_diffusers(monkeypatch, orig, scaling, nfe):
    spec = fs.ModelSpec(DiscreteVP(beta_schedule="linear", beta_start=1e-4, beta_end=0.02), "epsilon")
    opts = dict(original_inference_steps=orig, timestep_scaling=scaling)
    prog = fs.solvers.build("lcm", spec, nfe, **opts)
    sch = fs.solvers.to_diffusers("lcm", spec, **opts)
    _assert_matches_noisy(monkeypatch, lcm_module, sch, prog, nfe, seed=1)


def test_lcm_explicit_timesteps_match_diffusers(monkeypatch):
    ts = [999, 759, 499, 19, 0]  # at t = 0 the boundary condition returns the sample itself
    spec = fs.ModelSpec(VP, "epsilon")
    prog = fs.solvers.build("lcm", spec, 5, ts)
    sch = fs.solvers.to_diffusers("lcm", spec)
    noise, zs = _randn(2), [_randn(300 + i) for i in range(5)]
    feed_noise(monkeypatch, lcm_module, zs)
    sch.set_timesteps(timesteps=ts)
    x, times = noise.clone(), []
    for t in sch.timesteps:
        times.append(float(t))
        x = sch.step(toy_model(x, float(t)), t, x).prev_sample
    ours, seen = _run_ours(prog, toy_model, noise, zs)
    assert seen == times == ts
    # measured 4.6e-8 (float32 diffusers tables); 6x margin
    assert rel_err(ours, x) <= 3e-7


# -- TCD ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("nfe", [1, 2, 4])
@pytest.mark.parametrize("gamma", [0.0, 0.3, 1.0])
def test_tcd_matches_diffusers(monkeypatch, pred, nfe, gamma):
    guidance = 2.5 if nfe == 4 else None
    spec = fs.ModelSpec(VP, pred)
    prog = fs.solvers.build("tcd", spec, nfe, guidance_scale=guidance, gamma=gamma)
    sch = fs.solvers.to_diffusers("tcd", spec, gamma=gamma)
    assert type(sch).__name__ == "TCDScheduler"
    noise, zs = _randn(3), [_randn(400 + i) for i in range(nfe)]
    model = toy_model if guidance is None else guided_toy_model
    feed_noise(monkeypatch, tcd_module, zs)
    ref, times = pipeline_loop(sch, model, noise, nfe, guidance, step_kw={"eta": gamma})
    ours, seen = _run_ours(prog, model, noise, zs)
    assert len(seen) == prog.nfe == nfe == len(times)
    assert seen == times
    assert prog.stochastic == (gamma > 0 and nfe > 1)
    # measured 4.6e-7 (float32 diffusers tables); 4x margin
    assert rel_err(ours, ref) <= 2e-6


def test_tcd_float32_floor_of_the_intermediate_timestep(monkeypatch):
    """s = floor((1 - gamma) t') is taken in float32 by TCDScheduler; gamma=0.3 at t'=90 sits on the edge
    (float64 gives 62, float32 63)."""
    spec = fs.ModelSpec(VP, "epsilon")
    ts = [999, 500, 90]
    prog = fs.solvers.build("tcd", spec, 3, ts, gamma=0.3)
    sch = fs.solvers.to_diffusers("tcd", spec)
    noise, zs = _randn(4), [_randn(500 + i) for i in range(3)]
    feed_noise(monkeypatch, tcd_module, zs)
    sch.set_timesteps(timesteps=ts)
    x = noise.clone()
    for t in sch.timesteps:
        x = sch.step(toy_model(x, float(t)), t, x, eta=0.3).prev_sample
    ours, _ = _run_ours(prog, toy_model, noise, zs)
    # measured 6.7e-8 (float32 diffusers tables); 4x margin
    assert rel_err(ours, x) <= 3e-7


def test_tcd_final_zero_returns_the_x0_estimate():
    """final='zero' ends on the clean estimate (diffusers' default, 'sigma_min', re-noises it to t = 0)."""
    spec = fs.ModelSpec(VP, "sample")
    target = _randn(5)
    x = fs.solvers.run_reference(fs.solvers.build("tcd", spec, 3, gamma=0.5, final="zero"),
                                 lambda x, t: target.clone(), _randn(6))
    assert rel_err(x, target) <= 1e-12
    prog = fs.solvers.build("tcd", spec, 3, gamma=0.5)
    x = fs.solvers.run_reference(prog, lambda x, t: target.clone(), _randn(6))
    assert rel_err(x, target) > 1e-3


# -- cm: consistency models / CTM gamma-sampling ------------------------------------------------------------
SMIN, SMAX, SDATA = 0.002, 80.0, 0.5


def consistency_net(x, c_noise):
    """A stand-in for a consistency model's raw network F (fed c_in x and c_noise = 250 log sigma)."""
    return toy_model(x, c_noise)


def consistency_denoiser(x, sigma):
    """The consistency function f(x, sigma) = c_skip x + c_out F(c_in x, c_noise) (Song et al. 2023, App. C),
    i.e. what a fewstep adapter hands the sampler as an EDM 'sample' prediction."""
    c_skip = SDATA**2 / ((sigma - SMIN) ** 2 + SDATA**2)
    c_out = (sigma - SMIN) * SDATA / math.sqrt(sigma**2 + SDATA**2)
    c_in, c_noise = 1 / math.sqrt(sigma**2 + SDATA**2), 250 * math.log(sigma + 1e-44)
    return c_skip * x + c_out * consistency_net(c_in * x, c_noise)


@pytest.mark.parametrize("train_steps", [40, 18])
@pytest.mark.parametrize("nfe", [1, 2, 3, 5])
@pytest.mark.parametrize("s_noise", [1.0, 0.7])
def test_cm_matches_cm_stochastic_iterative(monkeypatch, train_steps, nfe, s_noise):
    spec = fs.ModelSpec(EDM(SMIN, SMAX, SDATA), "sample")
    opts = dict(train_steps=train_steps, final="sigma_min", s_noise=s_noise)
    prog = fs.solvers.build("cm", spec, nfe, **opts)
    sch = fs.solvers.to_diffusers("cm", spec, **opts)
    assert type(sch).__name__ == "CMStochasticIterativeScheduler" and not sch.config.clip_denoised
    assert sch.config.s_noise == s_noise
    noise, zs = _randn(7), [_randn(600 + i) for i in range(nfe)]
    feed_noise(monkeypatch, cm_module, zs)
    ref, times = pipeline_loop(sch, consistency_net, noise, nfe)
    ours, seen = _run_ours(prog, consistency_denoiser, noise, zs)
    assert len(seen) == prog.nfe == nfe == len(times)
    assert [250 * math.log(s) for s in seen] == pytest.approx(times, abs=1e-3)
    # measured 2.0e-6 (float32 Karras sigmas in diffusers); 5x margin
    assert rel_err(ours, ref) <= 1e-5


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("nfe", [1, 2, 4])
def test_cm_on_flow_matches_flow_match_euler_stochastic(monkeypatch, shift, nfe):
    """gamma = 1 on a flow schedule is FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)."""
    spec = fs.ModelSpec(Flow(shift=shift), "flow")
    prog = fs.solvers.build("cm", spec, nfe)
    sch = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift, stochastic_sampling=True)
    noise, zs = _randn(8), [_randn(700 + i) for i in range(nfe)]
    feed_noise(monkeypatch, fm_module, zs)
    sch.set_timesteps(nfe)
    x, times = noise.clone(), []
    for t in sch.timesteps:
        times.append(float(t))
        x = sch.step(toy_model(x.double(), float(t)), t, x).prev_sample
    ours, seen = _run_ours(prog, toy_model, noise, zs)
    assert len(seen) == prog.nfe == len(times)
    assert seen == pytest.approx(times, abs=1e-3)
    # measured 7.2e-8 (float32 diffusers sigmas); 4x margin
    assert rel_err(ours, x) <= 3e-7


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("nfe", [1, 2, 5])
def test_cm_gamma0_is_ddim(spacing, pred, nfe):
    """gamma = 0 is the deterministic jump x' = alpha' x0 + sigma' eps: DDIM (eta = 0)."""
    cfg = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
               prediction_type=pred, timestep_spacing=spacing, steps_offset=1, clip_sample=False)
    sch = diffusers.DDIMScheduler(**cfg)
    spec = fs.ModelSpec.from_diffusers_scheduler_config(sch.config)
    prog = fs.solvers.build("cm", spec, nfe, gamma=0.0)
    assert not prog.stochastic
    noise = _randn(9)
    ref, times = diffusers_sample(sch, toy_model, noise, nfe)
    ours, seen = _run_ours(prog, toy_model, noise, None)
    assert seen == times
    # measured 1.6e-7 (float32 diffusers tables); 6x margin
    assert rel_err(ours, ref) <= 1e-6


def cm_gamma_reference(model, noise, sigmas, gamma, zs, guidance=None):
    """CTM gamma-sampling on an EDM denoiser, written from its defining formula in plain torch:
    x' = D + sqrt(1 - gamma^2) sigma' (x - D) / sigma + gamma sigma' z."""
    x = sigmas[0] * noise
    for i, (s, s_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        if guidance is None:
            d = model(x, s)
        else:
            u, c = model(torch.cat([x, x]), s).chunk(2)
            d = u + guidance * (c - u)
        x = d + math.sqrt(1 - gamma**2) * s_next * (x - d) / s
        if s_next > 0:
            x = x + gamma * s_next * zs[i]
    return x


@pytest.mark.parametrize("gamma", [0.0, 0.3, 0.8, 1.0])
@pytest.mark.parametrize("nfe", [1, 3, 6])
@pytest.mark.parametrize("guidance", [None, 2.0])
def test_cm_gamma_sampling_matches_its_formula(gamma, nfe, guidance):
    spec = fs.ModelSpec(EDM(), "sample")
    prog = fs.solvers.build("cm", spec, nfe, "karras", gamma=gamma, guidance_scale=guidance)
    ramp = torch.linspace(0, 1, nfe, dtype=torch.float64)
    karras = (SMAX ** (1 / 7) + ramp * (SMIN ** (1 / 7) - SMAX ** (1 / 7))) ** 7
    sigmas = [float(s) for s in karras.float()] + [0.0]
    assert [c.point.sigma for c in prog.calls] == pytest.approx(sigmas[:-1], rel=1e-6)

    def denoiser(x, s):  # an EDM x0-predictor
        return toy_model(x, s) if guidance is None else guided_toy_model(x, s)

    noise, zs = _randn(10), [_randn(800 + i) for i in range(nfe)]
    ref = cm_gamma_reference(denoiser, noise, sigmas, gamma, zs, guidance)
    ours, seen = _run_ours(prog, denoiser, noise, zs)
    assert seen == pytest.approx(sigmas[:-1], rel=1e-6)
    assert prog.stochastic == (gamma > 0 and nfe > 1)
    # measured 1.0e-7 (float32 sigmas of the formula's grid); 5x margin
    assert rel_err(ours, ref) <= 5e-7


def test_cm_gamma_sampling_on_vp_matches_its_formula():
    """Native VP space: x' = alpha' x0 + sqrt(1 - gamma^2) sigma' eps + gamma sigma' z."""
    spec = fs.ModelSpec(VP, "epsilon")
    prog = fs.solvers.build("cm", spec, 4, "trailing", gamma=0.5)
    pts = [c.point for c in prog.calls] + [fs.schedules.Point(1.0, 0.0, 0.0)]
    noise, zs = _randn(11), [_randn(900 + i) for i in range(4)]
    x = noise
    for i, (p, q) in enumerate(zip(pts[:-1], pts[1:])):
        eps = toy_model(x, p.model_time)
        x0 = (x - p.sigma * eps) / p.alpha
        x = q.alpha * x0 + math.sqrt(1 - 0.25) * q.sigma * eps + 0.5 * q.sigma * zs[i]
    ours, _ = _run_ours(prog, toy_model, noise, zs)
    # measured 4.1e-16 (float64 throughout); 25x margin for another libm
    assert rel_err(ours, x) <= 1e-14


def cm_native_reference(model, to_x0_eps, noise, pts, end, gamma, s_noise, zs):
    """Multistep consistency sampling (Song et al. 2023, Alg. 1) / CTM gamma-sampling in a schedule's native
    variables, written from the formula: the noise at q above the end point is r = alpha' sqrt(s'^2 - s_end^2)
    (s = sigma / alpha; Song et al.'s sqrt(tau^2 - eps^2)), a 1 - gamma^2 share of its variance follows the
    predicted eps and gamma^2 is fresh noise scaled by s_noise: x' = alpha' x0 + sqrt(1 - gamma^2) r eps
    + gamma s_noise r z."""
    x, zs = noise * (pts[0].sigma if pts[0].alpha == 1.0 else 1.0), iter(zs)
    s_end = end.sigma / end.alpha
    for p, q in zip(pts, pts[1:] + [end]):
        x0, eps = to_x0_eps(x, model(x, p.model_time), p)
        r = q.alpha * math.sqrt(max((q.sigma / q.alpha) ** 2 - s_end**2, 0.0))
        x = q.alpha * x0 + math.sqrt(1 - gamma**2) * r * eps
        if r > 0 and gamma * s_noise > 0:
            x = x + gamma * s_noise * r * next(zs)
    return x


def _edm_x0_eps(x, d, p):  # EDM sample prediction: D is x0, alpha = 1
    return d, (x - d) / p.sigma


def _flow_x0_eps(x, v, p):  # rectified flow: x = (1 - t) x0 + t eps, v = eps - x0
    return x - p.sigma * v, x + p.alpha * v


@pytest.mark.parametrize("gamma,s_noise", [(0.0, 1.0), (0.5, 0.7), (1.0, 1.0), (0.5, 0.0)])
@pytest.mark.parametrize("case", ["edm_karras", "edm_train_steps", "flow"])
@pytest.mark.parametrize("final", ["zero", "sigma_min"])
def test_cm_ends_where_final_says(case, final, gamma, s_noise):
    """final="sigma_min" ends at the schedule's smallest noise level (EDM sigma_min; flow t = 1/T) and the
    noise above it is measured from there; final="zero" ends on the clean sample.  s_noise = 0 draws no
    noise."""
    if case == "flow":
        spec, nfe, opts = fs.ModelSpec(Flow(shift=3.0), "flow"), 3, {}
        # FlowMatchEulerDiscreteScheduler's sigmas are float32, the end point included
        end_t = 0.0 if final == "zero" else float(torch.tensor(1 / 1000, dtype=torch.float32))
        end, to_x0_eps = fs.schedules.Point(1.0 - end_t, end_t, 0.0), _flow_x0_eps
    else:
        spec, nfe = fs.ModelSpec(EDM(SMIN, SMAX, SDATA), "sample"), 3
        opts = {"train_steps": 3} if case == "edm_train_steps" else {}
        # the training grid is CMStochasticIterativeScheduler's float32 sigmas, its end point included
        smin = float(torch.tensor(SMIN, dtype=torch.float32)) if opts else SMIN
        end, to_x0_eps = fs.schedules.Point(1.0, 0.0 if final == "zero" else smin, 0.0), _edm_x0_eps
    prog = fs.solvers.build("cm", spec, nfe, gamma=gamma, s_noise=s_noise, final=final, **opts)
    assert prog.stochastic == (gamma > 0 and s_noise > 0)
    assert all(s.info["gamma"] == gamma for s in prog.stages[1:])  # describe() shows it
    noise, zs = _randn(12), [_randn(1000 + i) for i in range(nfe)]
    ref = cm_native_reference(toy_model, to_x0_eps, noise, [c.point for c in prog.calls], end, gamma,
                              s_noise, zs)
    ours, _ = _run_ours(prog, toy_model, noise, zs if prog.stochastic else None)
    # measured <= 2.4e-16 (float64 throughout); 40x margin for another libm.  Ending at the other end point
    # is off by 6e-4..2.6e-3 (measured)
    assert rel_err(ours, ref) <= 1e-14


# -- build-time errors --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,spec,nfe,opts,match", [
    ("lcm", fs.ModelSpec(EDM()), 2, {}, "DiscreteVP"),
    ("tcd", fs.ModelSpec(Flow(), "flow"), 2, {}, "DiscreteVP"),
    ("lcm", fs.ModelSpec(VP), 51, {}, "largest valid nfe is 50 .*original_inference_steps=50"),
    ("lcm", fs.ModelSpec(VP), 5, {"original_inference_steps": 4}, "largest valid nfe is 4 .*original_inf"),
    ("lcm", fs.ModelSpec(VP), 2, {"original_inference_steps": 0}, "positive int"),
    ("lcm", fs.ModelSpec(VP), 2, {"timestep_scaling": -1.0}, "timestep_scaling"),
    ("lcm", fs.ModelSpec(VP), 2, {"final": "sigma_min"}, "final must be 'zero'"),
    ("tcd", fs.ModelSpec(VP), 2, {"gamma": 1.5}, r"gamma must be a number in \[0, 1\]"),
    ("tcd", fs.ModelSpec(VP), 2, {"gamma": -0.1}, r"gamma must be a number in \[0, 1\]"),
    ("cm", fs.ModelSpec(VP), 2, {"gamma": 2.0}, r"gamma must be a number in \[0, 1\]"),
    ("cm", fs.ModelSpec(VP), 2, {"s_noise": -1.0}, "s_noise"),
    ("cm", fs.ModelSpec(VP), 2, {"train_steps": 40}, "needs an EDM schedule"),
    ("cm", fs.ModelSpec(EDM()), 41, {"train_steps": 40}, "largest valid nfe is 40 .*training discretization"),
    ("cm", fs.ModelSpec(EDM()), 2, {"train_steps": 1}, "train_steps must be >= 2"),
])
def test_bad_input_is_a_clear_build_error(name, spec, nfe, opts, match):
    with pytest.raises(ValueError, match=match):
        fs.solvers.build(name, spec, nfe, **opts)


@pytest.mark.parametrize("name", ["lcm", "tcd"])
def test_lcm_tcd_reject_sigma_spacings(name):
    with pytest.raises(ValueError, match="picks its own timesteps"):
        fs.solvers.build(name, fs.ModelSpec(VP), 4, "karras")


def test_cm_without_a_diffusers_equivalent_says_so():
    with pytest.raises(ValueError, match="CMStochasticIterativeScheduler only with"):
        fs.solvers.to_diffusers("cm", fs.ModelSpec(EDM()), gamma=0.5)


# -- a scheduler's own config reproduces it with no options ------------------------------------------------
@pytest.mark.parametrize("name,kw", [
    ("lcm", {}), ("lcm", {"original_inference_steps": 25, "timestep_scaling": 5.0}),
    ("tcd", {}), ("tcd", {"original_inference_steps": 20, "prediction_type": "v_prediction"}),
])
def test_lcm_tcd_from_their_scheduler_config_by_default(monkeypatch, name, kw):
    cls, module = {"lcm": (diffusers.LCMScheduler, lcm_module),
                   "tcd": (diffusers.TCDScheduler, tcd_module)}[name]
    sch = cls(**kw)
    spec = fs.ModelSpec.from_diffusers_scheduler_config(sch.config)
    _assert_matches_noisy(monkeypatch, module, sch, fs.solvers.build(name, spec, 4), 4, seed=11)


@pytest.mark.parametrize("kw", [{}, {"num_train_timesteps": 18, "rho": 5.0, "s_noise": 0.5}])
def test_cm_from_its_scheduler_config_by_default(monkeypatch, kw):
    """clip_denoised clamps x0 to [-1, 1], which no linear program does: that part of the config is not
    reproduced (diffusers_map.py says so)."""
    sch = diffusers.CMStochasticIterativeScheduler(clip_denoised=False, **kw)
    spec = fs.ModelSpec.from_diffusers_scheduler_config(sch.config)
    assert spec == fs.ModelSpec(EDM(SMIN, SMAX, SDATA), "sample")  # the consistency function predicts x0
    nfe = 3
    prog = fs.solvers.build("cm", spec, nfe)
    noise, zs = _randn(12), [_randn(950 + i) for i in range(nfe)]
    feed_noise(monkeypatch, cm_module, zs)
    ref, times = pipeline_loop(sch, consistency_net, noise, nfe)
    ours, seen = _run_ours(prog, consistency_denoiser, noise, zs)
    assert [250 * math.log(s) for s in seen] == pytest.approx(times, abs=1e-3)
    # measured 2.2e-6 (float32 Karras sigmas in diffusers); 4.5x margin
    assert rel_err(ours, ref) <= 1e-5
