"""A Plan: a StepProgram bound to a network and static buffers, run as one CUDA-graph replay.

Building a plan allocates every buffer once (fp32 register file, network input in the model dtype,
time inputs, conditioning, seed), runs the loop eagerly to warm the network and JIT the kernels, and on
CUDA captures all network calls and all solver updates into one CUDA graph.  A call copies the inputs into
the static buffers and replays: no host sync, no allocation and no Python per step.  On CPU, or with
``cuda_graph=False``, the same loop runs eagerly (through the kernels' PyTorch references on CPU).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ..kernels.solver_update import KernelConfig, StageUpdate, pick_config, solver_update, solver_update_ref
from ..solvers import ModelSpec, StepProgram, build

__all__ = ["Plan", "compile", "load", "CaptureError"]

Model = Callable[..., torch.Tensor]
_FORMAT = "fewstep.plan/1"


class CaptureError(RuntimeError):
    """The network did something a CUDA graph cannot record (a host sync or a host-to-device copy)."""


def compile(model: Model, spec: ModelSpec, *, solver: str, nfe: int, shape: Sequence[int],
            dtype: torch.dtype | None = None, guidance_scale: float | None = None,
            device: torch.device | str | None = None, spacing: Any = None, cuda_graph: bool = True,
            check_finite: bool = False, compile_network: bool | str = False,
            cond: Mapping[str, torch.Tensor] | None = None, kernels: str = "auto", graph_pool: Any = None,
            record_noise: bool = False, quant: str | None = None,
            quant_options: Mapping[str, Any] | None = None, **solver_options: Any) -> "Plan":
    """Build solver ``solver`` with ``nfe`` calls for ``model`` and bind it to static buffers of ``shape``.

    model: ``model(x, t, **cond) -> raw output`` with ``t`` a ``(x.shape[0],)`` float32 tensor on the device;
    with guidance ``x`` has batch ``2 * shape[0]`` and the model builds ``[uncond; cond]`` from ``cond`` (as
    the adapters in ``fs.models`` do).  shape: the noise shape ``(batch, ...)``.  dtype: the network's input
    dtype (default: the model's parameter dtype, else float32); the solver state stays fp32.  cond: example
    conditioning tensors (shapes and dtypes of every call; values used for warm-up).  compile_network: True or
    a torch.compile mode without its own cudagraphs ("default", "max-autotune-no-cudagraphs"); CUDA only, on
    CPU it warns and runs eager.  kernels: "auto" (Triton on CUDA, references on CPU), "triton" or "torch".
    graph_pool: a CUDA graph memory pool shared with other plans (``fs.Engine`` passes one); plans sharing a
    pool must not be replayed concurrently.  record_noise: keep the noise each stage drew (tests).
    quant: None, "fp8" (FP8 tensor cores, sm_89+) or "fp8-emulated" (FP8 numerics with PyTorch ops): the
    model's linear layers are swapped in place (``fs.quantize``) before capture; quant_options: see
    ``fewstep.engine.quantized.quantize_for_plan`` (static calibration on this plan's timesteps, skip rules).
    solver_options: the solver's options (``fs.solvers.get(solver).options``).
    """
    prog = build(solver, spec, nfe, spacing, guidance_scale=guidance_scale, **solver_options)
    kw = dict(shape=shape, dtype=dtype, device=device, cuda_graph=cuda_graph, check_finite=check_finite,
              compile_network=compile_network, cond=cond, kernels=kernels, graph_pool=graph_pool,
              record_noise=record_noise)
    quant_structure = None
    if quant is None and quant_options:
        raise ValueError("quant_options given without quant=; pass quant='fp8' or 'fp8-emulated'")
    if quant is not None:
        from .quantized import quantize_for_plan

        quant_structure = quantize_for_plan(model, quant, prog, kw, quant_options)
    return Plan(model, prog, **kw, quant_structure=quant_structure)


class Plan:
    """A compiled sampler; call it as ``plan(noise, seed=None, generator=None, copy=True, **cond)``."""

    def __init__(self, model: Model, program: StepProgram, *, shape: Sequence[int], dtype=None, device=None,
                 cuda_graph: bool = True, check_finite: bool = False, compile_network: bool | str = False,
                 cond: Mapping[str, torch.Tensor] | None = None, kernels: str = "auto",
                 graph_pool: Any = None, record_noise: bool = False,
                 kernel_config: KernelConfig | None = None, quant_structure: dict | None = None):
        if not callable(model):
            raise TypeError(f"model must be callable as model(x, t, **cond), got {type(model).__name__}")
        if not isinstance(program, StepProgram):
            raise TypeError(f"program must be a StepProgram, got {type(program).__name__}")
        self.program = program
        self.shape = _as_shape(shape)
        self.device = _as_device(device, model)
        self.dtype = _as_dtype(dtype, model)
        self.guided = program.guidance_scale is not None
        self.check_finite = bool(check_finite)
        self._requested = {"cuda_graph": bool(cuda_graph), "kernels": kernels}
        if kernels not in ("auto", "triton", "torch"):
            raise ValueError(f"kernels must be 'auto', 'triton' or 'torch', got {kernels!r}")
        if kernels == "auto":
            kernels = "triton" if self.device.type == "cuda" and _has_triton() else "torch"
        self.kernels = kernels
        if kernels == "torch" and self.device.type == "cuda" and cuda_graph and program.stochastic:
            raise ValueError("kernels='torch' draws noise on the host and cannot be captured in a CUDA "
                             "graph; use kernels='triton' or cuda_graph=False")
        self._update = solver_update if kernels == "triton" else solver_update_ref
        self.compile_network = compile_network
        self._net = _maybe_compile(model, compile_network, self.device)
        self._model, self._quant_structure = model, quant_structure  # FP8 state for save()

        g, b = (2 if self.guided else 1), self.shape[0]
        n = math.prod(self.shape)
        self.kernel_config = kernel_config or pick_config(n)
        _check_register_reads(program)
        self._stage_calls, self._updates, noise_index = [], [], 0
        for st in program.stages:
            self._updates.append(StageUpdate.from_stage(st, program.registers, self.guided, noise_index))
            self._stage_calls.append(st.call is not None)
            noise_index += int(st.noise)
        dev = self.device
        self._state = torch.zeros(len(program.registers), n, dtype=torch.float32, device=dev)
        self._net_in = torch.zeros((g * b,) + self.shape[1:], dtype=self.dtype, device=dev)
        # one tensor per call (not views of one table): each is aligned and a distinct input to torch.compile
        self._t = [torch.full((g * b,), t, dtype=torch.float32, device=dev) for t in program.timesteps]
        self._seed = torch.zeros(1, dtype=torch.int64, device=dev)
        self._z = ([torch.zeros(n, dtype=torch.float32, device=dev) for _ in range(noise_index)]
                   if record_noise else None)
        self._cond = {}
        for k, v in (cond or {}).items():
            if not isinstance(v, torch.Tensor):
                raise TypeError(f"cond[{k!r}] must be a tensor, got {type(v).__name__}")
            self._cond[k] = torch.empty(v.shape, dtype=v.dtype, device=dev).copy_(v)
        self._graph = None
        self.build_seconds = 0.0
        t0 = time.perf_counter()
        self._warm_up_and_capture(cuda_graph, graph_pool)
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
        torch's global generator); the same seed reproduces a sample bit for bit.  copy=False returns the
        plan's static output buffer, overwritten by the next call.
        """
        self._check_inputs(noise, cond)
        self._state[0].copy_(noise.reshape(-1))
        for k, v in cond.items():
            self._cond[k].copy_(v)
        if self.program.stochastic:
            self._seed.fill_(_draw_seed(seed, generator))
        with torch.no_grad():
            if self._graph is not None:
                self._graph.replay()
            else:
                self._run_loop()
        out = self._state[0].view(self.shape)
        if self.check_finite:
            bad = int((~torch.isfinite(out)).sum())
            if bad:
                raise FloatingPointError(f"plan output has {bad} non-finite values (NaN/Inf) of "
                                         f"{out.numel()}; check the network in dtype {self.dtype} and the "
                                         f"solver settings")
        return out.clone() if copy else out

    def recorded_noise(self) -> list[torch.Tensor]:
        """The noise each noisy stage drew in the last call (plans built with ``record_noise=True``)."""
        if self._z is None:
            raise RuntimeError("build the plan with record_noise=True to record its noise")
        return [z.view(self.shape).clone() for z in self._z]

    def describe(self) -> str:
        """The plan (shape, dtype, device, graph, kernels), every stage's time input, sigma, coefficients."""
        cond = {k: (tuple(v.shape), str(v.dtype)) for k, v in self._cond.items()}
        kc = self.kernel_config
        head = (f"Plan: shape={self.shape} dtype={self.dtype} device={self.device} "
                f"cuda_graph={self.cuda_graph} kernels={self.kernels} "
                f"(block={kc.block}, warps={kc.num_warps}) "
                f"cond={cond} build={self.build_seconds:.2f}s")
        return head + "\n" + self.program.describe()

    def __repr__(self) -> str:
        return (f"Plan({self.program.solver}, nfe={self.nfe}, shape={self.shape}, dtype={self.dtype}, "
                f"device={self.device}, cuda_graph={self.cuda_graph})")

    def save(self, path) -> None:
        """Save the program, shapes and kernel config (not the network) for :func:`load`.

        The file is a pickle (``torch.save``): load only files you trust.
        """
        torch.save({
            "format": _FORMAT, "program": self.program, "shape": self.shape, "dtype": str(self.dtype),
            "cuda_graph": self._requested["cuda_graph"], "check_finite": self.check_finite,
            "compile_network": self.compile_network, "kernels": self._requested["kernels"],
            "kernel_config": (self.kernel_config.block, self.kernel_config.num_warps),
            "cond": {k: (tuple(v.shape), str(v.dtype)) for k, v in self._cond.items()},
            "quant": self.quant_state(),
        }, path)

    def quant_state(self) -> dict | None:
        """The FP8 weights, scales and launch configs of a ``quant=`` plan (None without quantization)."""
        if self._quant_structure is None:
            return None
        from ..quant import export_state

        return export_state(self._model, self._quant_structure)

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

    def _warm_up_and_capture(self, cuda_graph: bool, pool: Any) -> None:
        with torch.no_grad():
            if self.device.type != "cuda":
                self._run_loop(validate=True)
                return
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self._run_loop(validate=True)  # compiles the network (torch.compile) and the kernels
                if cuda_graph:
                    _run_without_syncs(self._run_loop, self.device)
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


def load(path, model: Model, *, device: torch.device | str | None = None, graph_pool: Any = None) -> Plan:
    """Rebuild a plan saved with :meth:`Plan.save` around ``model`` (no solver build, recorded kernel config).

    A quantized plan quantizes ``model`` (unquantized, same architecture) in place with the saved FP8 weights,
    scales and launch configs: no calibration and no tuning.

    The file is a pickle: load only files you trust.
    """
    data = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(data, dict) or data.get("format") != _FORMAT:
        raise ValueError(f"{path}: not a fewstep plan file (format {_FORMAT})")
    dtype = getattr(torch, data["dtype"].removeprefix("torch."))
    cond = {k: torch.zeros(s, dtype=getattr(torch, d.removeprefix("torch.")))
            for k, (s, d) in data["cond"].items()}
    quant = data.get("quant")
    if quant is not None:
        from ..quant import restore_state

        restore_state(model, quant)
    return Plan(model, data["program"], shape=data["shape"], dtype=dtype, device=device,
                cuda_graph=data["cuda_graph"], check_finite=data["check_finite"],
                compile_network=data["compile_network"], cond=cond, kernels=data["kernels"],
                graph_pool=graph_pool, kernel_config=KernelConfig(*data["kernel_config"]),
                quant_structure=quant["structure"] if quant is not None else None)


# -- helpers -------------------------------------------------------------------------------------------------
def _as_shape(shape) -> tuple[int, ...]:
    try:
        s = tuple(int(d) for d in shape)
    except TypeError:
        raise TypeError(f"shape must be a sequence of ints like (batch, C, H, W), got {shape!r}") from None
    if not s or any(d < 1 for d in s):
        raise ValueError(f"shape must be non-empty with positive sizes, got {s}")
    return s


def _model_param(model):
    if isinstance(model, torch.nn.Module):
        return next(iter(model.parameters()), None)
    return None


def _as_device(device, model) -> torch.device:
    if device is None:
        p = _model_param(model)
        device = p.device if p is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device='cuda' but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    elif device.type != "cpu":
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device}")
    return device


def _as_dtype(dtype, model) -> torch.dtype:
    if dtype is None:
        p = _model_param(model)
        dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    return dtype


def _has_triton() -> bool:
    from ..kernels import solver_update as su

    return su.triton is not None


def _maybe_compile(model, compile_network, device):
    if compile_network is False or compile_network is None:
        return model
    mode = "default" if compile_network is True else compile_network
    if mode not in ("default", "max-autotune-no-cudagraphs"):
        raise ValueError(f"compile_network must be True, 'default' or 'max-autotune-no-cudagraphs' (a mode "
                         f"without its own CUDA graphs: the plan captures one graph around everything), "
                         f"got {mode!r}")
    if device.type != "cuda":
        warnings.warn("compile_network=True is CUDA-only; running the network eagerly on CPU", stacklevel=3)
        return model
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


_SYNC_HINT = ("a CUDA graph cannot record host syncs (.item(), .cpu(), .tolist(), torch.nonzero, a "
              "tensor-valued `if`, printing a tensor) or host-to-device copies (torch.tensor(..., "
              "device='cuda'), x.to('cuda') of a CPU tensor) inside the network; remove them or compile "
              "with cuda_graph=False")


def _run_without_syncs(fn, device) -> None:
    prev = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
    except RuntimeError as e:
        if "synchroniz" in str(e):
            raise CaptureError(f"the model synchronizes with the host ({e}); {_SYNC_HINT}") from e
        raise
    finally:
        torch.cuda.set_sync_debug_mode(prev)


def _capture(fn, device, pool):
    """Capture ``fn`` into a CUDA graph; on any error end the capture cleanly and raise CaptureError."""
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
        torch.cuda.synchronize(device)
        msg = str(err)
        if any(s in msg for s in ("capturing", "StreamCapture", "synchroniz")):
            raise CaptureError(f"CUDA graph capture failed: {msg.splitlines()[0] if msg else err!r}; "
                               f"{_SYNC_HINT}") from err
        raise err
    return graph
