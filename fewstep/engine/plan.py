"""A Plan: a StepProgram bound to a network and static buffers, run as one CUDA-graph replay.

Building a plan allocates every buffer once (fp32 register file, network input in the model dtype,
time inputs, conditioning, seed), runs the loop eagerly to warm the network and JIT the kernels, and on
CUDA captures all network calls and all solver updates into one CUDA graph.  A call copies the inputs into
the static buffers and replays: no host sync, no allocation and no Python per step.  On CPU, or with
``cuda_graph=False``, the same loop runs eagerly (on CPU through the native C++ op, or the kernels' PyTorch
references without it).

Threads: a plan's buffers are static, so one call at a time may use them.  Each plan holds a lock for the
whole call (copy-in, replay, copy-out); calls on one plan from many threads are serialized and each gets its
own result, calls on different plans run in parallel.  On CUDA every call is enqueued on the device's default
stream (ordered after the caller's current stream and before its next work), so the GPU runs the calls of all
plans one after another, in the order their locks were taken: plans that share a graph memory pool
(``fs.Engine``) never replay at the same time, which is what sharing a pool requires.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from ..kernels import native
from ..kernels.solver_update import StageUpdate, pick_config, solver_update, solver_update_ref
from ..solvers import StepProgram
from ._checks import as_device, as_dtype, as_shape
from .config import PlanConfig, from_plan_file, plan_config
from .planfile import write_plan_file

__all__ = ["Plan", "CaptureError", "check_required_cond"]

Model = Callable[..., torch.Tensor]
_CAPTURE_LOCK = threading.Lock()  # one CUDA graph capture at a time in this process (see _capture)


class CaptureError(RuntimeError):
    """The network did something a CUDA graph cannot record (a host sync or a host-to-device copy)."""


class Plan:
    """A compiled sampler; call it as ``plan(noise, seed=None, generator=None, copy=True, **cond)``.

    ``Plan(model, program, shape=..., device=None, cond=None, config=PlanConfig(...))``, or the config's
    fields as keywords.  cond: example conditioning tensors (their shapes and dtypes are those of every call;
    their values feed the warm-up).  graph_pool: a CUDA graph memory pool shared with other plans
    (``fs.Engine`` passes one).  quant: the :class:`fewstep.quant.QuantConfig` the model was quantized with
    (for :meth:`save`).
    """

    def __init__(self, model: Model, program: StepProgram, *, shape: Sequence[int], device=None,
                 cond: Mapping[str, torch.Tensor] | None = None, config: PlanConfig | None = None,
                 graph_pool: Any = None, quant: Any = None, **options: Any):
        if not callable(model):
            raise TypeError(f"model must be callable as model(x, t, **cond), got {type(model).__name__}")
        if not isinstance(program, StepProgram):
            raise TypeError(f"program must be a StepProgram, got {type(program).__name__}")
        config = plan_config(config, options)
        self.program = program
        self.shape = as_shape(shape)
        net = _network(model)  # an adapter's network gives the default device and dtype, as a module would
        self.device = as_device(device, net)
        self.dtype = as_dtype(config.dtype, net)
        self.guided = program.guidance_scale is not None
        self.check_finite = config.check_finite
        self.compile_network = config.compile_network
        n = math.prod(self.shape)
        self.kernel_config = config.kernel_config or pick_config(n)
        self._model, self._quant = model, quant
        self._lock = threading.Lock()
        _check_register_reads(program)
        g, b = (2 if self.guided else 1), self.shape[0]
        self._stage_calls, self._updates, noise_index = [], [], 0
        for st in program.stages:
            self._updates.append(StageUpdate.from_stage(st, program.registers, self.guided, noise_index))
            self._stage_calls.append(st.call is not None)
            noise_index += int(st.noise)
        # kernel_timings: {"triton": ms, "cuda": ms} for one pass of the stages when "auto" timed both
        resolve = functools.partial(_resolve_kernels, device=self.device, updates=self._updates,
                                    n_regs=len(program.registers), n=n, g=g, dtype=self.dtype,
                                    kernel_config=self.kernel_config)
        try:
            self.kernels, self.kernel_timings = resolve(config.kernels)
        except ValueError as e:
            if not from_plan_file(config):
                raise
            # a plan file records the backend its plan ran with; where that one cannot run, choose again
            warnings.warn(f"the plan file's {e}; re-resolving kernels='auto'", RuntimeWarning, stacklevel=2)
            self.kernels, self.kernel_timings = resolve("auto")
        kernels = self.kernels
        if kernels == "torch" and self.device.type == "cuda" and config.cuda_graph and program.stochastic:
            raise ValueError("kernels='torch' draws noise on the host and cannot be captured in a CUDA "
                             "graph; use kernels='triton' or cuda_graph=False")
        # the recorded launch goes to every Triton call (the references and the native op have no launch)
        self._update = _update_fn(kernels, self.kernel_config)
        # what save() writes: the request, with the dtype, backend and launch this plan resolved
        self.config = dataclasses.replace(config, dtype=self.dtype, kernels=kernels,
                                          kernel_config=self.kernel_config)
        for k, v in (cond or {}).items():
            if not isinstance(v, torch.Tensor):
                raise TypeError(f"cond[{k!r}] must be a tensor, got {type(v).__name__}")
        check_required_cond(model, cond)
        self._net = _maybe_compile(model, config.compile_network, self.device)
        dev = self.device
        # Normal tensors even when built under torch.inference_mode (later calls outside it write into them);
        # no autograd anywhere in a plan.
        with torch.inference_mode(False), torch.no_grad():
            self._state = torch.zeros(len(program.registers), n, dtype=torch.float32, device=dev)
            self._net_in = torch.zeros((g * b,) + self.shape[1:], dtype=self.dtype, device=dev)
            # one tensor per call (not views of one table): each is aligned and a distinct torch.compile input
            self._t = [torch.full((g * b,), t, dtype=torch.float32, device=dev) for t in program.timesteps]
            self._seed = torch.zeros(1, dtype=torch.int64, device=dev)
            self._z = ([torch.zeros(n, dtype=torch.float32, device=dev) for _ in range(noise_index)]
                       if config.record_noise else None)
            self._cond = {k: torch.empty(v.shape, dtype=v.dtype, device=dev).copy_(v)
                          for k, v in (cond or {}).items()}
            self._graph = None
            t0 = time.perf_counter()
            self._warm_up_and_capture(config.cuda_graph, graph_pool)
            self.build_seconds = time.perf_counter() - t0

    # -- public -----------------------------------------------------------------------------------------
    @property
    def nfe(self) -> int:
        return self.program.nfe

    @property
    def timesteps(self) -> tuple[float, ...]:
        """The network's time input at each call."""
        return self.program.timesteps

    @property
    def sigmas(self) -> tuple[float, ...]:
        return self.program.sigmas

    @property
    def stochastic(self) -> bool:
        return self.program.stochastic

    @property
    def cuda_graph(self) -> bool:
        """Whether the loop runs as one captured CUDA graph."""
        return self._graph is not None

    def __call__(self, noise: torch.Tensor, *, seed: int | None = None,
                 generator: torch.Generator | None = None, copy: bool = True,
                 **cond: torch.Tensor) -> torch.Tensor:
        """Sample from standard-normal ``noise`` of the plan's shape; returns the fp32 sample.

        seed / generator (a CPU generator) pick the noise of stochastic solvers (default: a fresh seed from
        torch's global generator); the same seed reproduces a sample bit for bit.  Never records autograd,
        whatever the inputs.  Thread-safe: a lock makes each call atomic on the plan's buffers.
        copy=False returns the plan's static output buffer instead of a copy: it is valid only until the next
        call of this plan, from any thread, overwrites it; with several threads use copy=True.
        """
        self._check_inputs(noise, cond)
        seed = _draw_seed(seed, generator) if self.program.stochastic else None
        with self._lock, torch.no_grad(), _on_default_stream(self.device) as caller:
            self._state[0].copy_(noise.reshape(-1))
            for k, v in cond.items():
                self._cond[k].copy_(v)
            if seed is not None:
                self._seed.fill_(seed)
            if self._graph is not None:
                self._graph.replay()
            else:
                self._run_loop()
            out = self._state[0].view(self.shape)
            if self.check_finite:
                bad = int((~torch.isfinite(out)).sum())
                if bad:
                    raise FloatingPointError(f"plan output has {bad} non-finite values (NaN/Inf) of "
                                             f"{out.numel()}; check the network in dtype {self.dtype} and "
                                             f"the solver settings")
            if copy:
                out = out.clone()
                if caller is not None:  # allocated on the plan's stream, used on the caller's
                    out.record_stream(caller)
        return out

    def recorded_noise(self) -> list[torch.Tensor]:
        """The noise each noisy stage drew in the last call (plans built with ``record_noise=True``)."""
        if self._z is None:
            raise RuntimeError("build the plan with record_noise=True to record its noise")
        with self._lock:
            return [z.view(self.shape).clone() for z in self._z]

    def describe(self) -> str:
        """The plan (shape, dtype, device, graph, kernels), every stage's time input, sigma, coefficients."""
        cond = {k: (tuple(v.shape), str(v.dtype)) for k, v in self._cond.items()}
        kc = self.kernel_config
        head = (f"Plan: shape={self.shape} dtype={self.dtype} device={self.device} "
                f"cuda_graph={self.cuda_graph} kernels={self.kernels}{_timings_text(self.kernel_timings)} "
                f"(block={kc.block}, warps={kc.num_warps}) "
                f"cond={cond} build={self.build_seconds:.2f}s")
        return head + "\n" + self.program.describe()

    def __repr__(self) -> str:
        return (f"Plan({self.program.solver}, nfe={self.nfe}, shape={self.shape}, dtype={self.dtype}, "
                f"device={self.device}, cuda_graph={self.cuda_graph})")

    def save(self, path) -> None:
        """Write the plan (program, shapes, config, kernel launch, FP8 state; not the network) for fs.load.

        The file is data: a safetensors file whose metadata holds a versioned JSON document (see
        ``fewstep.engine.planfile``); loading it never unpickles.
        """
        q = self.quant_state() or {"config": None, "layers": None, "tensors": {}}
        cond = {k: (tuple(v.shape), v.dtype) for k, v in self._cond.items()}
        write_plan_file(path, program=self.program, shape=self.shape, cond=cond, config=self.config,
                        quant=q["config"], quant_layers=q["layers"], tensors=q["tensors"])

    def export_onnx(self, path, *, opset: int = 19):
        """Write the whole sampler as one ONNX file (see :mod:`fewstep.export`): inputs ``noise``, the plan's
        conditioning keywords (and ``stage_noise`` for stochastic solvers), output ``sample``; returns an
        :class:`fewstep.export.ExportReport`.  Holds the plan's lock: FP8 layers are swapped for Q/DQ views
        while the network is traced."""
        from ..export import export_plan

        with self._lock:
            return export_plan(self._model, self.program, path, shape=self.shape, dtype=self.dtype,
                               device=self.device, cond=self._cond, opset=opset, quant=self._quant)

    def quant_state(self) -> dict | None:
        """``{"config", "layers", "tensors"}``: the QuantConfig, per FP8 layer its buffer names and resolved
        launch configs, and its buffers (on the CPU); None without quantization."""
        if self._quant is None:
            return None
        from ..quant import export_state

        layers, tensors = export_state(self._model)
        return {"config": self._quant, "layers": layers, "tensors": tensors}

    # -- internals --------------------------------------------------------------------------------------
    def _run_loop(self, validate: bool = False) -> None:
        call = 0
        for is_call, upd, z in zip(self._stage_calls, self._updates, self._z_for_stages()):
            out = None
            if is_call:
                out = self._net(self._net_in, self._t[call], **self._cond)
                call += 1
                if validate:
                    self._check_output(out)
                if not out.is_contiguous():
                    out = out.contiguous()
            self._update(upd, self._state, out, self._net_in, self._seed, z_out=z)

    def _z_for_stages(self):
        if self._z is None:
            return [None] * len(self._updates)
        return [self._z[u.noise_index] if u.has_z else None for u in self._updates]

    def _warm_up(self) -> None:
        try:
            self._run_loop(validate=True)
        except TypeError as e:
            clear = _cond_type_error(e, self._model, self._cond)
            if clear is None:
                raise
            raise clear from e

    def _warm_up_and_capture(self, cuda_graph: bool, pool: Any) -> None:
        if self.device.type != "cuda":
            self._warm_up()
            return
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self._warm_up()  # compiles the network (torch.compile) and the kernels
        torch.cuda.current_stream(self.device).wait_stream(side)
        if cuda_graph:
            self._graph = _capture(self._run_loop, self.device, pool)

    def _check_output(self, out) -> None:
        want = (self._net_in.shape[0],) + self.shape[1:]
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"the model must return a tensor, got {type(out).__name__} (wrap it so it "
                            f"returns the raw prediction, e.g. `.sample`)")
        if tuple(out.shape) != want or not out.is_floating_point() or out.device != self.device:
            raise ValueError(f"model output: expected shape {want} floating point on {self.device}, got "
                             f"{tuple(out.shape)} {out.dtype} on {out.device}")

    def _check_inputs(self, noise, cond: Mapping[str, Any]) -> None:
        if not isinstance(noise, torch.Tensor):
            raise TypeError(f"noise must be a torch.Tensor, got {type(noise).__name__}")
        if tuple(noise.shape) != self.shape:
            raise ValueError(f"noise shape: expected {self.shape}, got {tuple(noise.shape)}")
        if noise.dtype not in (torch.float32, self.dtype):
            raise ValueError(f"noise dtype: expected torch.float32 or {self.dtype}, got {noise.dtype}")
        if noise.device != self.device:
            raise ValueError(f"noise device: expected {self.device}, got {noise.device}")
        missing, extra = sorted(set(self._cond) - set(cond)), sorted(set(cond) - set(self._cond))
        if missing or extra:
            raise ValueError(f"conditioning: the plan was compiled with {sorted(self._cond)}, got "
                             f"{sorted(cond)} (missing {missing}, unexpected {extra}); pass examples with "
                             f"fs.compile(cond=...)")
        for k, v in cond.items():
            ref = self._cond[k]
            if not isinstance(v, torch.Tensor):
                raise ValueError(f"cond[{k!r}]: expected a tensor, got {type(v).__name__}")
            checks = (("shape", tuple(ref.shape), tuple(v.shape)), ("dtype", ref.dtype, v.dtype),
                      ("device", ref.device, v.device))
            for what, want, got in checks:
                if want != got:
                    raise ValueError(f"cond[{k!r}] {what}: expected {want}, got {got}")


# -- helpers -------------------------------------------------------------------------------------------------
def check_required_cond(model: Model, cond: Mapping[str, Any] | None) -> None:
    """Raise if ``model`` declares conditioning keywords (``model.required_cond``, as the adapters of
    ``fs.models.from_diffusers`` do) that ``cond`` lacks."""
    fn, required = model, None
    while required is None and fn is not None:  # through wrappers (functools.wraps, Calibrator.wrap)
        required = getattr(fn, "required_cond", None)
        fn = getattr(fn, "__wrapped__", None)
    missing = [k for k in (required or ()) if k not in (cond or {})]
    if missing:
        raise ValueError(f"{_name(model)} needs the conditioning {missing}, got {sorted(cond or {})}: pass "
                         f"example tensors as fs.compile(..., cond={{{missing[0]!r}: ...}}) (with fs.Engine, "
                         f"as keywords of each call); they fix the shapes and dtypes of every call")


_MISSING_ARG = re.compile(r"missing \d+ required (?:keyword-only |positional )?arguments?: (.+)$")
_EXTRA_ARG = re.compile(r"got an unexpected keyword argument '(\w+)'")


def _cond_type_error(e: TypeError, model: Model, cond: Mapping[str, Any]) -> TypeError | None:
    """A clear error for a model called without a conditioning keyword it needs (or with one it does not
    take), else None.  Python's own message names the arguments; one we passed cannot be the missing one."""
    msg = str(e)
    m = _MISSING_ARG.search(msg)
    names = re.findall(r"'(\w+)'", m[1]) if m else []
    if names and not set(names) & set(cond):
        return TypeError(f"{_name(model)} needs the conditioning keyword(s) {names} (the plan has "
                         f"{sorted(cond)}): pass example tensors as fs.compile(..., cond={{{names[0]!r}: "
                         f"...}}) (with fs.Engine, as keywords of each call). The model raised: {msg}")
    m = _EXTRA_ARG.search(msg)
    if m and m[1] in cond:
        return TypeError(f"{_name(model)} does not take the conditioning keyword {m[1]!r} given in cond=. "
                         f"The model raised: {msg}")
    return None


def _name(model) -> str:
    return f"the model ({type(model).__name__})" if not hasattr(model, "__name__") else \
        f"the model ({model.__name__})"


@contextmanager
def _on_default_stream(device: torch.device):
    """Run the block on ``device``'s default stream, after the caller's current stream's work and before its
    next; yields the caller's stream if it is another one (else None).  CPU: nothing to do."""
    if device.type != "cuda":
        yield None
        return
    plan_stream, caller = torch.cuda.default_stream(device), torch.cuda.current_stream(device)
    if plan_stream == caller:
        yield None
        return
    plan_stream.wait_stream(caller)
    try:
        with torch.cuda.stream(plan_stream):
            yield caller
    finally:
        caller.wait_stream(plan_stream)


def _has_triton() -> bool:
    from ..kernels import solver_update as su

    return su.triton is not None


def _update_fn(kernels: str, kernel_config) -> Callable:
    if kernels == "triton":
        return functools.partial(solver_update, config=kernel_config)
    if kernels in ("cpp", "cuda"):
        return native.solver_update_native
    return solver_update_ref


def _native_fits(updates) -> bool:
    """Whether every stage is within the native CUDA kernel's register limits."""
    return all(len(u.reg_in) <= native.CUDA_MAX_REG_IN and u.n_rows <= native.CUDA_MAX_ROWS for u in updates)


def _resolve_kernels(kernels: str, *, device: torch.device, updates, n_regs: int, n: int, g: int,
                     dtype: torch.dtype, kernel_config) -> tuple[str, dict | None]:
    """The solver-update backend a plan on ``device`` uses for ``kernels`` (and, when "auto" timed the two
    CUDA backends, their times); a ValueError when an explicit backend cannot run here."""
    if kernels in ("cpp", "cuda"):
        want = "cpu" if kernels == "cpp" else "cuda"
        if device.type != want:
            raise ValueError(f"kernels={kernels!r} runs the native op on {want} tensors, this plan is on "
                             f"{device}; use kernels={'cuda' if kernels == 'cpp' else 'cpp'!r} or 'auto'")
        if not native.available(want):
            raise ValueError(f"kernels={kernels!r}: the native extension is not available "
                             f"({native.load_error() or 'fewstep._C was built without CUDA'}); use "
                             f"kernels='auto'")
        if kernels == "cuda" and not _native_fits(updates):
            raise ValueError(f"kernels='cuda': a stage reads more than {native.CUDA_MAX_REG_IN} state rows "
                             f"or writes more than {native.CUDA_MAX_ROWS} outputs; use kernels='triton'")
        return kernels, None
    if kernels == "triton" and not _has_triton():
        raise ValueError("kernels='triton': triton is not installed; use kernels='auto'")
    if kernels != "auto":
        return kernels, None
    if device.type != "cuda":
        return ("cpp" if native.available("cpu") else "torch"), None
    has_native = native.available("cuda") and _native_fits(updates)
    if not _has_triton():
        return ("cuda" if has_native else "torch"), None
    if not has_native:
        return "triton", None
    times = _time_cuda_backends(updates, n_regs, n, g, dtype, device, kernel_config)
    return ("cuda" if times["cuda"] < times["triton"] else "triton"), times


def _time_cuda_backends(updates, n_regs: int, n: int, g: int, dtype, device, kernel_config,
                        reps: int = 5) -> dict[str, float]:
    """Median milliseconds of one pass of the plan's stages with Triton and with the native CUDA op, on
    scratch buffers of the plan's sizes (the network output in the model dtype), timed with CUDA events,
    backends alternated after one warm-up pass each (the Triton JIT)."""
    fns = {"triton": _update_fn("triton", kernel_config), "cuda": native.solver_update_native}
    with torch.inference_mode(False), torch.no_grad():
        state = torch.zeros(n_regs, n, dtype=torch.float32, device=device)
        net_out = torch.zeros(g * n, dtype=dtype, device=device)
        net_in = torch.zeros(g * n, dtype=dtype, device=device)
        seed = torch.zeros(1, dtype=torch.int64, device=device)
        ms: dict[str, list[float]] = {k: [] for k in fns}
        for rep in range(reps + 1):
            for name, fn in fns.items():
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for upd in updates:
                    fn(upd, state, net_out, net_in, seed)
                end.record()
                end.synchronize()
                if rep:  # the first pass compiles
                    ms[name].append(start.elapsed_time(end))
    return {k: sorted(v)[len(v) // 2] for k, v in ms.items()}


def _timings_text(times: dict | None) -> str:
    if not times:
        return ""
    return " (auto: " + ", ".join(f"{k} {v:.3f} ms" for k, v in times.items()) + " a pass)"


def _network(model):
    """The ``nn.Module`` behind ``model``: itself, or the network an adapter exposes (``.model``, ``.module``,
    ... as :func:`fewstep.quant.quantize_model.find_network` looks), through ``__wrapped__`` wrappers; else
    ``model``."""
    from ..quant.quantize_model import find_network

    fn = model
    while fn is not None:
        net = find_network(fn)
        if net is not None:
            return net
        fn = getattr(fn, "__wrapped__", None)
    return model


_COMPILED_PLANS = [0]  # compile_network plans built in this process


def _size_recompile_limit() -> None:
    """Every compile_network plan adds a Dynamo cache entry for the network's code (static shapes): past
    Dynamo's recompile limit (8 by default) the network of every further plan silently runs uncompiled, so
    raise the limit to the number of plans, and say so once it is raised."""
    import torch._dynamo.config as dynamo_config

    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    _COMPILED_PLANS[0] += 1
    n, limit = _COMPILED_PLANS[0], getattr(dynamo_config, name)
    if n > limit:
        setattr(dynamo_config, name, n)
        warnings.warn(f"fewstep: {n} compile_network plans in this process exceed "
                      f"torch._dynamo.config.{name} "
                      f"({limit}); raised it to {n} so this plan's network stays compiled", stacklevel=5)


def _maybe_compile(model, compile_network, device):
    if compile_network is False:
        return model
    mode = "default" if compile_network is True else compile_network
    if device.type != "cuda":
        warnings.warn("compile_network=True is CUDA-only; running the network eagerly on CPU", stacklevel=4)
        return model
    _size_recompile_limit()
    return torch.compile(model, mode=None if mode == "default" else mode, dynamic=False)


def _check_register_reads(program: StepProgram) -> None:
    """Every register a stage reads was written before (the prologue reads only the noise in ``x``)."""
    written = {"x"}
    for i, st in enumerate(program.stages):
        unread = [n for n in st.inputs if n.startswith("h") and n not in written]
        if unread:
            raise ValueError(f"{program.solver}: stage {i} reads registers {unread} before any stage "
                             f"writes them")
        written.update(o for o in st.outputs if o != "net_in")


def _draw_seed(seed, generator) -> int:
    if seed is None:
        if generator is not None and generator.device.type != "cpu":
            raise ValueError(f"generator: expected a CPU torch.Generator (seeds are drawn on the host), "
                             f"got one on {generator.device}")
        seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    return seed


_SYNC_HINT = ("the model synchronizes with the host or copies from it while a CUDA graph records: a graph "
              "cannot record host syncs (.item(), .cpu(), .tolist(), torch.nonzero, a tensor-valued `if`, "
              "printing a tensor) or host-to-device copies (torch.tensor(..., device='cuda'), x.to('cuda') "
              "of a CPU tensor) inside the network; remove them or compile with cuda_graph=False")


def _capture(fn, device, pool):
    """Capture ``fn`` into a CUDA graph; on any error end the capture cleanly and raise CaptureError.

    One capture at a time in the process (a lock): plans of an Engine capture into one shared memory pool,
    and PyTorch documents sharing a pool between graphs, not between captures under way at once.  The
    capture's error mode is thread-local, so other threads keep running (and syncing) meanwhile; a sync by
    the network itself fails the capture and is reported as a CaptureError.
    """
    with _CAPTURE_LOCK:
        graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream(device)
        torch.cuda.synchronize(device)
        side.wait_stream(torch.cuda.current_stream(device))
        err: BaseException | None = None
        with torch.cuda.stream(side):
            graph.capture_begin(pool=pool, capture_error_mode="thread_local")
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 - re-raised below after ending the capture
                err = e
            finally:
                try:
                    graph.capture_end()
                except BaseException as e:  # noqa: BLE001
                    err = err or e
        torch.cuda.current_stream(device).wait_stream(side)
        if err is not None:
            del graph
            try:
                torch.cuda.synchronize(device)
            except RuntimeError:  # a capture invalidated by a sync can leave that error pending
                pass
            msg = str(err)
            if any(s in msg for s in ("capturing", "StreamCapture", "synchroniz", "not permitted")):
                raise CaptureError(f"CUDA graph capture failed: {msg.splitlines()[0] if msg else err!r}; "
                                   f"{_SYNC_HINT}") from err
            raise err
        return graph
