"""A real architecture through a plan: diffusers' DiTTransformer2DModel, tiny config, random weights."""

import pytest
import torch

import fewstep as fs

diffusers = pytest.importorskip("diffusers")

DEV = "cuda" if torch.cuda.is_available() else "cpu"
NUM_CLASSES = 10
# CPU: measured <= 2.8e-7 (float32 plan state and network, dpmpp_2m guided); 1.5e-6 is a 5x margin.  A GPU
# may run the patch-embedding conv in TF32 (1e-3 relative rounding) and is not measured here: 1e-4
TOL = 1.5e-6 if DEV == "cpu" else 1e-4


@pytest.fixture(scope="module")
def dit():
    torch.manual_seed(0)
    m = diffusers.DiTTransformer2DModel(sample_size=8, patch_size=2, num_layers=2, num_attention_heads=2,
                                        attention_head_dim=8, in_channels=4, out_channels=8,
                                        num_embeds_ada_norm=NUM_CLASSES)
    with torch.no_grad():  # ada_norm_zero initializes its gates to zero: randomize so the blocks matter
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m.eval().to(DEV)


class DiTNet:
    """Minimal plan network: [null; labels] under guidance, eps channels of the learned-sigma output."""

    def __init__(self, m):
        self.m = m

    def __call__(self, x, t, class_labels):
        if x.shape[0] == 2 * class_labels.shape[0]:
            class_labels = torch.cat([torch.full_like(class_labels, NUM_CLASSES), class_labels])
        out = self.m(x, timestep=t, class_labels=class_labels, return_dict=False)[0]
        return out[:, : x.shape[1]]


def _reference(prog, net, noise, labels):
    def fn(x, t):
        tt = torch.full((x.shape[0],), float(t), device=DEV)
        return net(x.float().to(DEV), tt, labels).double().cpu()

    return fs.solvers.run_reference(prog, fn, noise.double().cpu())


@pytest.mark.parametrize("solver,guidance", [("euler", None), ("dpmpp_2m", 4.0), ("unipc", 1.5)])
def test_tiny_dit_plan_matches_reference(dit, solver, guidance):
    if solver not in fs.solvers.available():
        pytest.skip(f"{solver} not registered")
    spec = fs.ModelSpec(fs.schedules.DiscreteVP(beta_start=1e-4, beta_end=0.02, beta_schedule="linear"))
    labels = torch.tensor([1, 7, 3], device=DEV)
    net = DiTNet(dit)
    with torch.no_grad():
        plan = fs.compile(net, spec, solver=solver, nfe=4, shape=(3, 4, 8, 8), guidance_scale=guidance,
                          cond={"class_labels": labels})
        noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1)).to(DEV)
        out = plan(noise, class_labels=labels)
        ref = _reference(plan.program, net, noise, labels)
    assert torch.isfinite(out).all() and torch.isfinite(ref).all()
    assert float((out.double().cpu() - ref).norm() / ref.norm()) <= TOL
    other = plan(noise, class_labels=torch.tensor([2, 2, 2], device=DEV))
    assert not torch.allclose(other, out)  # the conditioning buffer is live


def _dit_pipeline_loop(m, labels, noise, nfe, guidance):
    """DiTPipeline's loop written out (diffusers' model and EulerDiscreteScheduler with DiT's published
    schedule, no fewstep code): the batch is [labels; null class], eps is the first ``C`` output channels,
    guidance mixes the halves.  The sample is kept in float64, the model runs in float32."""
    sch = diffusers.EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                                           beta_schedule="linear", prediction_type="epsilon",
                                           timestep_spacing="linspace")
    sch.set_timesteps(nfe)
    c = noise.shape[1]
    x = noise.double().cpu() * sch.init_noise_sigma
    y = torch.cat([labels, torch.full_like(labels, NUM_CLASSES)])
    times = []
    for t in sch.timesteps:
        inp = sch.scale_model_input(x, t)
        tt = torch.full((2 * x.shape[0],), float(t), device=DEV)
        out = m(torch.cat([inp, inp]).float().to(DEV), timestep=tt, class_labels=y, return_dict=False)[0]
        cond, uncond = out[:, :c].double().cpu().chunk(2)
        times.append(float(t))
        x = sch.step(uncond + guidance * (cond - uncond), t, x).prev_sample
    return x, times


def test_tiny_dit_through_models_adapter(dit):
    """fs.models.from_diffusers(dit) in a guided plan against DiTPipeline's own loop (independent of the
    adapter: the oracle calls the diffusers model directly)."""
    from fewstep.models import from_diffusers

    fn, spec = from_diffusers(dit)
    labels = torch.tensor([4, 0], device=DEV)
    seen = []

    def logged(x, t, **cond):
        seen.append(float(t[0]))
        return fn(x, t, **cond)

    with torch.no_grad():
        plan = fs.compile(logged, spec, solver="euler", nfe=3, shape=(2, 4, 8, 8), guidance_scale=3.0,
                          cond={"class_labels": labels})
        noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2)).to(DEV)
        seen.clear()
        out = plan(noise, class_labels=labels)
        ref, times = _dit_pipeline_loop(dit, labels, noise, 3, 3.0)
    assert seen == pytest.approx(times, abs=1e-3)
    err = float((out.double().cpu() - ref).norm() / ref.norm())
    assert err <= TOL
