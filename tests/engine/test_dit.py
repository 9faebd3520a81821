"""A real architecture through a plan: diffusers' DiTTransformer2DModel, tiny config, random weights."""

import pytest
import torch

import fewstep as fs

diffusers = pytest.importorskip("diffusers")

DEV = "cuda" if torch.cuda.is_available() else "cpu"
NUM_CLASSES = 10


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
    assert float((out.double().cpu() - ref).norm() / ref.norm()) <= 1e-4
    other = plan(noise, class_labels=torch.tensor([2, 2, 2], device=DEV))
    assert not torch.allclose(other, out)  # the conditioning buffer is live


def test_tiny_dit_through_models_adapter(dit):
    """The same through helper G's adapter (fs.models.from_diffusers), when it is there."""
    from_diffusers = getattr(getattr(fs, "models", None), "from_diffusers", None)
    if from_diffusers is None:
        try:
            from fewstep.models import from_diffusers
        except ImportError:
            pytest.skip("fs.models.from_diffusers not available")
    fn, spec = from_diffusers(dit)
    labels = torch.tensor([4, 0], device=DEV)
    with torch.no_grad():
        plan = fs.compile(fn, spec, solver="euler", nfe=3, shape=(2, 4, 8, 8), guidance_scale=3.0,
                          cond={"class_labels": labels})
        noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2)).to(DEV)
        out = plan(noise, class_labels=labels)
        ref = fs.solvers.run_reference(
            plan.program, lambda x, t: fn(x.float().to(DEV), t, class_labels=labels).double().cpu(),
            noise.double().cpu())
    assert float((out.double().cpu() - ref).norm() / ref.norm()) <= 1e-4
