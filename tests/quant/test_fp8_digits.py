"""The bundled digits DiT through an FP8 (emulated) plan vs the unquantized plan: the issue's quality bar.

Frechet distance and class accuracy of the FP8 plan no more than 5% worse than the unquantized plan's (FD at
most 1.05x, accuracy at least 0.95x); median PSNR of FP8 samples against unquantized samples from the same
noise >= 25 dB.  Skipped where the trained weights are missing.
"""

import pytest
import torch

pytest.importorskip("diffusers")

from fewstep.bench.fp8 import digits_quality  # noqa: E402
from fewstep.models.digits import CONFIG_FILE, DATA_DIR  # noqa: E402

pytestmark = pytest.mark.skipif(not (DATA_DIR / CONFIG_FILE).is_file(),
                                reason="the trained digits model is not bundled")


@pytest.mark.slow
@pytest.mark.parametrize("scales", ["dynamic", "static"])
def test_fp8_digits_quality(scales):
    r = digits_quality(n=100, activation_scales=scales, device="cpu")  # paired: same noise and labels
    assert all(torch.isfinite(torch.tensor([r.fd_ref, r.fd_fp8, r.median_psnr_db])))
    assert r.median_psnr_db >= 25.0, r
    assert r.accuracy_fp8 >= 0.95 * r.accuracy_ref, r
    assert r.fd_fp8 <= 1.05 * r.fd_ref, r
