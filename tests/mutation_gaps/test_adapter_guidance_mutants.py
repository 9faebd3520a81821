"""The adapters' guidance layout helpers on their own (gaps found by `make mutate`): conditioning moved to the
network's device and dtype, [negative; positive] halves, per-sample vectors given without a batch dim, and
errors that name the offending input."""

import pytest
import torch

from fewstep.models.diffusers_adapters import _batched, _pair

CPU = torch.device("cpu")


def test_pair_casts_both_halves_to_the_network_dtype():
    cond = {"text_embeds": torch.ones(2, 4), "negative_text_embeds": torch.zeros(2, 4)}
    out = _pair(cond, "text_embeds", 2, True, CPU, torch.float64)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, torch.cat([torch.zeros(2, 4), torch.ones(2, 4)]).double(), rtol=0, atol=0)
    assert _pair(cond, "text_embeds", 2, False, CPU, torch.float16).dtype == torch.float16


def test_pair_casts_the_negative_half_to_a_narrower_dtype():
    # torch.cat promotes mixed dtypes: a float32 negative beside a float16 positive would make the whole batch
    # float32, so only a cast of each half gives the network its own dtype (and float16-rounded values)
    g = torch.Generator().manual_seed(0)
    pos, neg = torch.randn(2, 4, generator=g), torch.randn(2, 4, generator=g)
    out = _pair({"text_embeds": pos, "negative_text_embeds": neg}, "text_embeds", 2, True, CPU, torch.float16)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, torch.cat([neg.half(), pos.half()]), rtol=0, atol=0)


def test_pair_moves_both_halves_to_the_network_device():
    # the meta device stands in for a GPU: conditioning given on the CPU must land where the network runs
    meta = torch.device("meta")
    cond = {"text_embeds": torch.ones(2, 4), "negative_text_embeds": torch.zeros(2, 4)}
    assert _pair(cond, "text_embeds", 2, True, meta, torch.float32).device == meta
    assert _pair(cond, "text_embeds", 2, False, meta, torch.float32).device == meta


def test_pair_vectors_without_a_batch_dim():
    # SDXL time ids are (6,) per sample: given as (6,) for both halves, each half is expanded to the batch
    pos, neg = torch.arange(6.0), -torch.arange(6.0)
    out = _pair({"time_ids": pos, "negative_time_ids": neg}, "time_ids", 3, True, CPU, torch.float32,
                negative_default="same", trailing=1)
    torch.testing.assert_close(out, torch.stack([neg] * 3 + [pos] * 3), rtol=0, atol=0)


def test_batched_keeps_a_batched_vector():
    v = torch.arange(12.0).reshape(2, 6)
    assert _batched(v, 2, "time_ids", trailing=1) is v
    torch.testing.assert_close(_batched(v[:1], 2, "time_ids", trailing=1), torch.stack([v[0], v[0]]))


def test_errors_name_the_input():
    good = torch.ones(2, 4)
    with pytest.raises(ValueError, match="^encoder_hidden_states has batch 3"):
        _pair({"encoder_hidden_states": torch.ones(3, 4)}, "encoder_hidden_states", 2, False, CPU, None)
    with pytest.raises(ValueError, match="^negative_encoder_hidden_states has batch 3"):
        _pair({"encoder_hidden_states": good, "negative_encoder_hidden_states": torch.ones(3, 4)},
              "encoder_hidden_states", 2, True, CPU, None)
    with pytest.raises(TypeError, match="^pooled_projections must be a tensor"):
        _pair({"pooled_projections": object()}, "pooled_projections", 2, False, CPU, None)
    with pytest.raises(TypeError, match="^negative_pooled_projections must be a tensor"):
        _pair({"pooled_projections": good, "negative_pooled_projections": object()}, "pooled_projections", 2,
              True, CPU, None)
