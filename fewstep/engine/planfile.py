"""Plan files: one safetensors file whose metadata holds the plan as a versioned JSON document.

Why one safetensors file: its header is JSON and its body raw tensor bytes, so the whole file is data; it
keeps the FP8 weights next to the document that describes them (one file to copy, no half-copied directory);
and any safetensors reader can inspect it.  The header's ``__metadata__["fewstep.plan"]`` is the document::

    {"format": "fewstep.plan", "version": 1, "fewstep": "0.1.0",
     "program": fs.solvers.program_to_dict(program),          # the StepProgram, bit-exact
     "shape": [2, 4, 32, 32],                                 # the noise shape
     "cond": {"class_labels": {"shape": [2], "dtype": "int64"}},
     "config": PlanConfig.to_json(),                          # dtype, cuda_graph, kernels, kernel_config, ...
     "quant": null | {"config": QuantConfig.to_json(),        # mode, skip rules, fusions, calibration options
                      "layers": {"<layer>": {"buffers": [...], "configs": {"<M>": Fp8GemmConfig fields}}}}}

and the tensors are the FP8 layers' buffers, named ``"<layer>/<buffer>"``.  Reading parses and validates; it
never unpickles.  Every problem is a :class:`PlanFileError` naming the file and what is wrong.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from typing import Any

import torch

from ..quant.config import QuantConfig
from ..quant.state import check_state
from ..solvers import StepProgram, program_from_dict, program_to_dict
from ._checks import as_shape
from .config import DTYPES, PlanConfig

__all__ = ["PlanFileError", "PlanFile", "FORMAT", "VERSION", "write_plan_file", "read_plan_file"]

FORMAT, VERSION = "fewstep.plan", 1
_KEY = "fewstep.plan"  # the safetensors metadata entry holding the document
_MAX_HEADER = 100 << 20  # safetensors' own limit on its header


class PlanFileError(ValueError):
    """A plan file that cannot be loaded: ``str(e)`` is ``"<path>: <what is wrong>"``."""

    def __init__(self, path, reason: str):
        super().__init__(f"{os.fspath(path)}: {reason}")
        self.path, self.reason = os.fspath(path), reason


@dataclass(frozen=True)
class PlanFile:
    """A plan file's contents, validated."""

    program: StepProgram
    shape: tuple[int, ...]
    cond: dict[str, tuple[tuple[int, ...], torch.dtype]]
    config: PlanConfig
    quant: QuantConfig | None
    quant_layers: dict | None
    tensors: dict[str, torch.Tensor]


def write_plan_file(path, *, program: StepProgram, shape, cond: dict, config: PlanConfig,
                    quant: QuantConfig | None, quant_layers: dict | None,
                    tensors: dict[str, torch.Tensor]) -> None:
    """Write a plan file (through a temporary file and a rename: never a half-written plan at ``path``)."""
    from safetensors.torch import save_file

    from .. import __version__

    doc = {"format": FORMAT, "version": VERSION, "fewstep": __version__, "program": program_to_dict(program),
           "shape": list(shape),
           "cond": {k: {"shape": list(s), "dtype": _dtype_name(d)} for k, (s, d) in cond.items()},
           "config": config.to_json(),
           "quant": None if quant is None else {"config": quant.to_json(), "layers": quant_layers}}
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={_KEY: json.dumps(doc)})
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def read_plan_file(path) -> PlanFile:
    """Parse and validate a plan file; any problem is a :class:`PlanFileError`."""
    try:
        doc, tensors = _read_container(path)
        return _parse(doc, tensors)
    except PlanFileError:
        raise
    except ValueError as e:  # a field's parser: "where: what"
        msg = str(e)
        m = re.fullmatch(r"(\S+): field missing", msg)
        raise PlanFileError(path, f"field {m[1]!r} missing" if m else msg) from None
    except (TypeError, KeyError, IndexError, AttributeError, RecursionError) as e:  # no writer makes these
        raise PlanFileError(path, f"invalid plan document ({type(e).__name__}: {e})") from None


def _read_container(path) -> tuple[dict, dict[str, torch.Tensor]]:
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(9)
            n = int.from_bytes(head[:8], "little") if len(head) >= 8 else None
            header = None
            if n is not None and 0 < n <= min(size - 8, _MAX_HEADER):
                f.seek(8)
                header = f.read(n)
    except OSError as e:
        raise PlanFileError(path, f"cannot read the file ({e.strerror or e})") from e
    is_safetensors = len(head) == 9 and head[8:9] == b"{" and 0 < n <= _MAX_HEADER
    if not is_safetensors:
        if head.startswith(b"PK\x03\x04") or head.startswith(b"\x80"):
            raise PlanFileError(path, "a pickle (torch.save) file, refused: fewstep no longer reads pickled "
                                      "plans (loading one can run arbitrary code); build the plan again and "
                                      "save it with this fewstep (Plan.save writes JSON + safetensors)")
        if not head:
            raise PlanFileError(path, "empty file: not a fewstep plan file")
        if len(head) < 9:
            raise PlanFileError(path, f"truncated, or not a fewstep plan file: only {size} bytes")
        kind = "a JSON document" if head[:1] == b"{" else "not a safetensors file"
        raise PlanFileError(path, f"not a fewstep plan file ({kind}; a plan file is a safetensors file "
                                  f"written by Plan.save)")
    if header is None:
        raise PlanFileError(path, f"truncated: {size} bytes, the header alone needs {8 + n}")
    try:
        header = json.loads(header)
        if not isinstance(header, dict):
            raise ValueError
    except (ValueError, RecursionError):
        raise PlanFileError(path, "not a fewstep plan file (corrupt safetensors header)") from None
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or _KEY not in meta:
        raise PlanFileError(path, "not a fewstep plan file (a safetensors file without a fewstep plan "
                                  "document: model weights?)")
    try:
        doc = json.loads(meta[_KEY])
    except (TypeError, ValueError, RecursionError):
        raise PlanFileError(path, "corrupt plan document (not JSON)") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise PlanFileError(path, f"not a fewstep plan file (document format {_get(doc, 'format')!r}, "
                                  f"expected {FORMAT!r})")
    version = doc.get("version")
    if version != VERSION or isinstance(version, bool):
        raise PlanFileError(path, f"format version {version!r} unsupported (this fewstep reads {VERSION}); "
                                  f"build the plan again with this fewstep")
    try:
        end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        raise PlanFileError(path, "corrupt safetensors header (tensor entries)") from None
    if 8 + n + end > size:
        raise PlanFileError(path, f"truncated: {size} bytes, the tensors end at byte {8 + n + end}")
    return doc, _tensors(path, header)


def _tensors(path, header: dict) -> dict[str, torch.Tensor]:
    if not header:
        return {}
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(os.fspath(path), "pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise PlanFileError(path, f"corrupt tensor data ({e})") from e


def _get(d: Any, key: str) -> Any:
    return d.get(key) if isinstance(d, dict) else None


def _field(d: dict, key: str, kind: type | tuple[type, ...], where: str = "") -> Any:
    name = f"{where}.{key}" if where else key
    if key not in d:
        raise ValueError(f"{name}: field missing")
    if not isinstance(d[key], kind):
        kinds = kind if isinstance(kind, tuple) else (kind,)
        raise ValueError(f"{name}: expected {' or '.join(k.__name__ for k in kinds)}, got "
                         f"{type(d[key]).__name__}")
    return d[key]


def _parse(doc: dict, tensors: dict[str, torch.Tensor]) -> PlanFile:
    program = program_from_dict(_field(doc, "program", dict), where="program")
    try:
        shape = as_shape(_field(doc, "shape", list))
    except TypeError as e:
        raise ValueError(str(e)) from None
    cond = {}
    for k, v in _field(doc, "cond", dict).items():
        w = f"cond.{k}"
        s, d = _field(_dict(v, w), "shape", list, w), _field(v, "dtype", str, w)
        if not all(type(x) is int and x >= 0 for x in s) or d not in DTYPES:
            raise ValueError(f"{w}: expected a shape of ints >= 0 and a dtype in {sorted(DTYPES)}, got {s}, "
                             f"{d!r}")
        cond[k] = (tuple(s), DTYPES[d])
    config = PlanConfig.from_json(_field(doc, "config", dict), "config")
    if config.dtype is None:
        raise ValueError("config.dtype: expected the plan's dtype, got null")
    quant = layers = None
    qd = _field(doc, "quant", (dict, type(None)))
    if qd is not None:
        quant = QuantConfig.from_json(_field(qd, "config", dict, "quant"), "quant.config")
        layers = _field(qd, "layers", dict, "quant")
        check_state(layers, tensors, "quant.layers")
    used = {f"{n}/{b}" for n, e in (layers or {}).items() for b in e["buffers"]}
    if set(tensors) - used:
        raise ValueError(f"tensors {sorted(set(tensors) - used)[:3]} are not described by the plan document")
    return PlanFile(program, shape, cond, config, quant, layers, tensors)


def _dtype_name(d: torch.dtype) -> str:
    name = str(d).removeprefix("torch.")
    if DTYPES.get(name) != d:
        raise ValueError(f"cannot save conditioning of dtype {d} in a plan file (known: {sorted(DTYPES)})")
    return name


def _dict(v: Any, where: str) -> dict:
    if not isinstance(v, dict):
        raise ValueError(f"{where}: expected an object, got {type(v).__name__}")
    return v
