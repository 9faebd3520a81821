"""``fewstep tune``: fit a solver's grid (or coefficients) to a model and write it as JSON.

``fewstep tune --solver unipc --nfe 4 --out digits_nfe4.json`` tunes for the bundled digits model and prints
the held-out error before and after; ``--plot FILE.png`` draws the untuned and tuned grids.  Use the file with
``fewstep sample --tuned FILE`` or ``fs.compile(..., solver=fs.load_tuned(FILE))``.

``--diffusers DIR`` tunes for a local diffusers directory instead, loaded as ``fewstep sample --diffusers``
loads it (disk and safetensors only): a class-conditional DiT is calibrated on labels cycling over its
classes; a text-conditioned model needs ``--cond FILE``, the conditioning of one image, repeated over the
calibration samples.  Use that file with ``fs.compile(net_model, spec, solver=fs.load_tuned(FILE), ...)``.
"""

from __future__ import annotations

import argparse

from .checks import guidance_arg, guidance_or_none, int_at_least, writable_file

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--solver", default="dpmpp_2m", help="solver to tune (default: dpmpp_2m)")
    p.add_argument("--nfe", type=int_at_least(2), default=4, help="network calls, >= 2 (default: 4)")
    p.add_argument("--method", default="auto", help="auto, timesteps, coefficients or dmn (default: auto)")
    p.add_argument("--budget", type=int_at_least(0), default=None,
                   help="network calls for the search after the teacher (default: fs.tune's)")
    p.add_argument("--samples", type=int_at_least(8), default=30,
                   help="calibration noises, a quarter held out (default: 30)")
    p.add_argument("--teacher-nfe", type=int_at_least(8), default=None,
                   help="teacher NFE (default: fs.tune's)")
    p.add_argument("--guidance", type=guidance_arg, default=1.5, help="guidance scale; 0: off (default: 1.5)")
    p.add_argument("--seed", type=int, default=0, help="calibration noise seed (default: 0)")
    p.add_argument("--out", required=True, help="the tuned solver, a .json file")
    p.add_argument("--plot", default=None, help="also draw the grids before / after to this .png")
    p.add_argument("--diffusers", metavar="PATH", default=None,
                   help="a local diffusers pipeline or model dir (default: the bundled digits model)")
    p.add_argument("--scheduler-config", metavar="JSON", default=None,
                   help="diffusers scheduler config for a bare model directory")
    p.add_argument("--cond", metavar="FILE", default=None,
                   help="conditioning of one image for text models: .safetensors or .npz (never a pickle)")
    p.add_argument("--size", type=int_at_least(1), default=None,
                   help="latent height/width for --diffusers (default: the model's)")


def run(args: argparse.Namespace) -> int:
    import torch

    import fewstep as fs
    from fewstep.models import digits

    if args.method not in fs.solvers.tuning.METHODS:
        methods = ', '.join(fs.solvers.tuning.METHODS)
        raise ValueError(f"--method must be one of {methods}, got {args.method!r}")
    fs.solvers.get(args.solver)
    out = writable_file(args.out, "--out", suffixes=(".json",))
    plot = writable_file(args.plot, "--plot", suffixes=(".png",)) if args.plot else None
    guidance = guidance_or_none(args.guidance)
    if args.diffusers is None:
        given = [f"--{k.replace('_', '-')}" for k in ("scheduler_config", "cond", "size")
                 if getattr(args, k) is not None]
        if given:
            raise ValueError(f"{', '.join(given)}: only with --diffusers DIR (not for the bundled model)")
        # the program alone first (milliseconds): an NFE the solver cannot do fails before the weights
        fs.solvers.build(args.solver, digits.digits_spec(), args.nfe, guidance_scale=guidance)
        dit, _ = digits.load_digits_dit()
        model, spec = fs.models.from_diffusers(dit, digits.digits_scheduler_config())
        shape = (args.samples, *digits.SAMPLE_SHAPE)
        cond = {"class_labels": torch.arange(10).repeat(args.samples // 10 + 1)[: args.samples]}
        spacing = None
    else:
        model, spec, shape, cond, spacing = _diffusers_model(args)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(args.seed))
    teacher = {} if args.teacher_nfe is None else {"teacher_nfe": args.teacher_nfe}
    tuned = fs.tune(model, spec, solver=args.solver, nfe=args.nfe, noise=noise, cond=cond,
                    guidance_scale=guidance, method=args.method, budget=args.budget,
                    spacing=spacing, **teacher)
    tuned.save(out)
    r = tuned.report
    print(f"{'':12s} {'timesteps':40s} {'calibration':>12s} {'held-out':>10s}")
    print(f"{'untuned':12s} {_ts(r['timesteps_before']):40s} {r['calibration_before']:12.4g} "
          f"{r['holdout_before']:10.4g}")
    print(f"{'tuned':12s} {_ts(r['timesteps_after']):40s} {r['calibration_after']:12.4g} "
          f"{r['holdout_after']:10.4g}")
    kept = "kept" if tuned.improved else "NOT kept (no held-out gain): the file holds the untuned program"
    print(f"wrote {out}: {tuned.solver} NFE {tuned.nfe}, method {tuned.method}, tuned program {kept}; "
          f"{r['network_calls']} network calls, {r['seconds']:.1f} s")
    if plot is not None:
        _plot(tuned, plot)
        print(f"wrote {plot}")
    return 0


def _diffusers_model(args):
    """(model, spec, calibration shape, conditioning, untuned spacing) for ``--diffusers DIR`` on the CPU."""
    from pathlib import Path

    import torch

    import fewstep as fs

    from .diffusers_dir import latent_shape, load_diffusers_dir, pipeline_spacing
    from .sample import _load_cond, _repeat_cond  # --cond is read exactly as `fewstep sample` reads it

    cond_path = Path(args.cond) if args.cond is not None else None
    tensors = _load_cond(cond_path) if cond_path is not None else None  # a bad file fails before the model
    net, sched_cfg, _ = load_diffusers_dir(Path(args.diffusers), args.scheduler_config, "cpu")
    model, spec = fs.models.from_diffusers(net, sched_cfg)
    cfg, cls, n = net.config, type(net).__name__, args.samples
    if cls == "DiTTransformer2DModel":
        if tensors is not None:
            raise ValueError(f"{cls} is class-conditional: calibration labels cycle over its classes; --cond "
                             "does not apply")
        cond = {"class_labels": torch.arange(n) % int(cfg.num_embeds_ada_norm)}
    elif tensors is None:
        raise ValueError(f"{cls} is text-conditioned: pass --cond FILE (.safetensors or .npz) with the "
                         "conditioning of one image")
    else:
        cond = _repeat_cond(tensors, n, args.cond, torch.device("cpu"))
    shape = latent_shape(net, n, args.size)
    return model, spec, shape, cond, pipeline_spacing(model, None, args.nfe, shape)


def _ts(ts) -> str:
    return "[" + ", ".join(f"{t:g}" for t in ts) + "]"


def _plot(tuned, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = tuned.report
    fig, ax = plt.subplots(figsize=(6, 2.5))
    for y, key, label in ((1, "timesteps_before", "untuned"), (0, "timesteps_after", "tuned")):
        err = r["holdout_before"] if y else r["holdout_after"]
        ax.plot(r[key], [y] * len(r[key]), "o-", label=f"{label} (held-out error {err:.3g})")
    ax.set_yticks([0, 1], ["tuned", "untuned"])
    ax.set_xlabel("timestep of each network call")
    ax.set_title(f"{tuned.solver}, NFE {tuned.nfe}, method {tuned.method}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
