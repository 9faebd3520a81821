"""A built program records the options it was built with (plan files and to_diffusers read them).

Found by `make mutate`: a solver handing its builder no options still built the right stages, and nothing
looked at ``program.options``.
"""

import dataclasses

import pytest

import fewstep as fs

VP = fs.schedules.DiscreteVP(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
EDM = fs.schedules.EDM(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5)

# (solver, spec, nfe, options the caller gives: every one differs from the solver's default)
CASES = [
    ("dpmpp_2m", fs.ModelSpec(VP, "epsilon"), 6,
     {"order": 3, "solver_type": "heun", "lower_order_final": False}),
    ("dpmpp_3m", fs.ModelSpec(VP, "v_prediction"), 6, {"order": 2, "final": "sigma_min", "taylor_d2": True}),
    ("dpmpp_2m_sde", fs.ModelSpec(VP, "epsilon"), 5, {"order": 1, "euler_at_final": True}),
    ("dpmpp_3m_sde", fs.ModelSpec(VP, "sample"), 5, {"order": 2, "lower_order_final": False}),
    ("unipc", fs.ModelSpec(VP, "epsilon"), 6, {"order": 3, "solver_type": "bh1", "corrector": False}),
    ("ipndm", fs.ModelSpec(VP, "epsilon"), 6, {"order": 3, "lower_order_final": True}),
    ("deis", fs.ModelSpec(VP, "epsilon"), 6, {"order": 1, "final": "sigma_min"}),
    ("cm", fs.ModelSpec(EDM, "sample"), 3, {"s_noise": 0.5, "gamma": 0.25}),
]


@pytest.mark.parametrize("name,spec,nfe,opts", CASES, ids=[c[0] for c in CASES])
def test_program_records_the_options_it_was_built_with(name, spec, nfe, opts):
    info = fs.solvers.get(name)
    defaults = {f.name: f.default for f in dataclasses.fields(info.options)}
    assert all(defaults[k] != v for k, v in opts.items()), "each case must set non-default values"
    prog = fs.solvers.build(name, spec, nfe, **opts)
    assert {k: prog.options[k] for k in opts} == opts
    # the options not given are recorded too, at their declared defaults
    assert {k: prog.options[k] for k in defaults if k not in opts} == {k: v for k, v in defaults.items()
                                                                       if k not in opts}
