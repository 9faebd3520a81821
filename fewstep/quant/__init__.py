"""fewstep.quant: FP8 (E4M3) linear layers built on ``fewstep.kernels``, calibration and per-layer skip rules.

report = fs.quantize(model, "fp8")            # in place; "fp8-emulated" on CPU / GPUs without FP8
report = fs.quantize(model, "int4")           # INT4 weights (W4A16); "w4a8", "int4-emulated", "w4a8-emulated"
plan = fs.compile(model, spec, ..., quant="fp8", quant_options={"activation_scales": "static"})
plan = fs.compile(model, spec, ..., quant=fs.QuantConfig("fp8", activation_scales="static"))  # the same
"""

from .calibrate import CALIBRATION_METHODS, COMBINE, Calibrator
from .config import QUANT_OPTIONS, QuantConfig, quant_config
from .dit_block import FP8DiTBlock
from .fp8_linear import FP8Conv1x1, FP8Linear, quantize_weight
from .int4_calibrate import INT4_METHODS, InputStats, awq_search
from .int4_linear import INT4Conv1x1, INT4Linear
from .quantize_model import (
    DEFAULT_SKIP,
    INT4_MODES,
    QUANT_MODES,
    QuantReport,
    SkipRule,
    check_mode,
    quantize,
    quantized_layers,
)
from .state import check_state, export_state, restore_state

__all__ = [
    "quantize",
    "QuantConfig",
    "QUANT_OPTIONS",
    "quant_config",
    "QuantReport",
    "SkipRule",
    "DEFAULT_SKIP",
    "QUANT_MODES",
    "INT4_MODES",
    "INT4Linear",
    "INT4Conv1x1",
    "InputStats",
    "awq_search",
    "INT4_METHODS",
    "check_mode",
    "FP8Linear",
    "FP8Conv1x1",
    "FP8DiTBlock",
    "quantize_weight",
    "Calibrator",
    "CALIBRATION_METHODS",
    "COMBINE",
    "quantized_layers",
    "export_state",
    "check_state",
    "restore_state",
]
