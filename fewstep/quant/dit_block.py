"""A DiT (adaLN-Zero) transformer block whose GEMM inputs come straight out of a fused producer kernel.

diffusers' ``BasicTransformerBlock`` with ``norm_type="ada_norm_zero"`` computes
``LayerNorm(h) * (1 + scale) + shift`` in bf16 and hands it to the q/k/v and feed-forward projections, which
would quantize it again.  Here :func:`~fewstep.kernels.adaln_quant.adaln_quant` produces the E4M3 input and
its scales in one pass; the fused q/k/v projection and the GELU feed-forward projection consume it directly.
Same submodule names as the original block (``norm1``, ``attn1``, ``norm3``, ``ff``), so state dicts and
``transformer_blocks[0].norm1.emb`` keep working.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.adaln_quant import adaln_modulate_ref, adaln_quant, adaln_quant_ref
from .fp8_linear import FP8Linear

__all__ = ["FP8DiTBlock", "dit_block_fusable"]


def dit_block_fusable(block: nn.Module) -> str | None:
    """None if ``block`` is a diffusers adaLN-Zero self-attention block this module can run, else why not."""
    if type(block).__name__ != "BasicTransformerBlock":
        return "not a BasicTransformerBlock"
    if getattr(block, "norm_type", None) != "ada_norm_zero":
        return f"norm_type {getattr(block, 'norm_type', None)!r} is not 'ada_norm_zero'"
    if block.attn2 is not None or block.pos_embed is not None or block._chunk_size is not None:
        return "cross-attention, positional embedding or chunked feed-forward"
    for norm in (block.norm1.norm, block.norm3):
        if not isinstance(norm, nn.LayerNorm) or norm.elementwise_affine:
            return "its LayerNorms have an affine transform"
    attn = block.attn1
    if (
        attn.is_cross_attention
        or attn.norm_q is not None
        or attn.norm_k is not None
        or attn.residual_connection
        or attn.rescale_output_factor != 1.0
        or attn.spatial_norm is not None
        or attn.group_norm is not None
    ):
        return "its attention is not plain self-attention"
    if abs(attn.scale - (attn.inner_dim // attn.heads) ** -0.5) > 1e-12:
        return "its attention uses a non-default scale"
    if type(attn.processor).__name__ not in ("AttnProcessor2_0", "FusedAttnProcessor2_0"):
        return f"attention processor {type(attn.processor).__name__} is not the default SDPA one"
    net = block.ff.net
    if len(net) != 3 or type(net[0]).__name__ != "GELU" or not isinstance(net[2], nn.Linear):
        return "its feed-forward is not Linear + GELU, Linear"
    return None


class FP8DiTBlock(nn.Module):
    """An adaLN-Zero DiT block with FP8 projections; forward has ``BasicTransformerBlock``'s signature."""

    def __init__(
        self, block: nn.Module, to_qkv: FP8Linear, to_out: FP8Linear, ff_in: FP8Linear, ff_out: FP8Linear
    ):
        super().__init__()
        self.norm1 = block.norm1  # keeps .emb (timestep + class embedder) and .linear (modulation)
        self.norm3 = block.norm3
        self.attn1 = block.attn1
        self.attn1.to_qkv = to_qkv
        self.attn1.to_out[0] = to_out
        for name in ("to_q", "to_k", "to_v"):  # the fused projection replaces them
            setattr(self.attn1, name, None)
        self.ff = block.ff
        self.ff.net[0], self.ff.net[2] = ff_in, ff_out
        self.heads = block.attn1.heads
        self.calibrating = False  # observers see the bf16 producer output: run the unfused path

    def _project(self, lin: FP8Linear, h, shift, scale, eps):
        if self.calibrating:
            y = adaln_modulate_ref(h, shift, scale, eps).to(h.dtype)
            return lin(y)
        producer = adaln_quant if lin.backend == "triton" else adaln_quant_ref
        q, s = producer(h.contiguous(), shift, scale, eps, lin.act_scale)
        return lin.forward_quantized(q, s)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask=None,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        timestep=None,
        cross_attention_kwargs=None,
        class_labels=None,
        added_cond_kwargs=None,
    ) -> torch.Tensor:
        if attention_mask is not None or encoder_hidden_states is not None:
            raise ValueError(
                "FP8DiTBlock is a self-attention block: attention_mask and encoder_hidden_states "
                "are not supported"
            )
        h = hidden_states
        b, t, _ = h.shape
        emb = self.norm1.emb(timestep, class_labels, hidden_dtype=h.dtype)
        emb = self.norm1.linear(self.norm1.silu(emb))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = emb.chunk(6, dim=1)

        qkv = self._project(self.attn1.to_qkv, h, shift_msa, scale_msa, self.norm1.norm.eps)
        qkv = qkv.view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], dropout_p=0.0, is_causal=False)
        # out projections: the adaLN-Zero residual h + gate * y runs in the GEMM epilogue
        h = self.attn1.to_out[0](a.transpose(1, 2).reshape(b, t, -1).to(h.dtype), residual=h, gate=gate_msa)

        f = self._project(self.ff.net[0], h, shift_mlp, scale_mlp, self.norm3.eps)
        return self.ff.net[2](f.view(b, t, -1), residual=h, gate=gate_mlp)
