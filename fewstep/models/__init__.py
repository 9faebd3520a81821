"""fewstep.models: adapters for diffusers denoisers and the bundled small trained model."""

from .diffusers_adapters import SUPPORTED_MODELS, from_diffusers
from .digits import check_class_labels, digits_spec, load_digits_data, load_digits_dit, load_digits_model
from .metrics import class_accuracy, frechet_distance, load_digit_classifier

__all__ = ["from_diffusers", "SUPPORTED_MODELS", "load_digits_model", "load_digits_dit", "digits_spec",
           "load_digits_data", "check_class_labels", "class_accuracy", "frechet_distance",
           "load_digit_classifier"]
