"""Direction tokens for the U-Net's cross-attention."""

from __future__ import annotations

import math

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

__all__ = ["DirectionEncoder", "direction_features", "BVAL_UNIT"]

_SQRT2 = math.sqrt(2.0)


#: b-values enter the tokens in ms/µm² (s/mm² / 1000): shells of 500-3000
#: become 0.5-3, the range of the other features.
BVAL_UNIT = 1000.0


def direction_features(
    target_bvecs: torch.Tensor,
    reference_bvecs: torch.Tensor,
    target_bvals: torch.Tensor | None = None,
    reference_bvals: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sign-invariant per-token features, shape ``(B, R + 1, 7)`` (``8`` with b-values).

    Each direction ``b`` is described by the six distinct entries of ``b b^T``
    (identical for ``b`` and ``-b``, as the signal is) plus ``|b . b_target|``,
    its closeness to the target, which tells each reference how much it should
    count. Token 0 is the target, tokens 1..R the references in rank order.
    With ``target_bvals`` ``(B,)`` and ``reference_bvals`` ``(B, R)`` each token
    also carries its b-value (in units of :data:`BVAL_UNIT`), so one model
    serves every shell: the contrast between directions grows with b.
    """
    if target_bvecs.ndim != 2 or target_bvecs.shape[-1] != 3:
        raise ValueError(f"target b-vectors must be (B, 3), got {tuple(target_bvecs.shape)}")
    if reference_bvecs.ndim != 3 or reference_bvecs.shape[-1] != 3:
        raise ValueError(f"reference b-vectors must be (B, R, 3), got {tuple(reference_bvecs.shape)}")
    b = torch.cat([target_bvecs[:, None, :], reference_bvecs], dim=1)
    b = b / b.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    x, y, z = b.unbind(-1)
    outer = torch.stack([x * x, y * y, z * z, _SQRT2 * x * y, _SQRT2 * x * z, _SQRT2 * y * z], dim=-1)
    closeness = (b * b[:, :1, :]).sum(-1).abs().unsqueeze(-1)
    if target_bvals is None and reference_bvals is None:
        return torch.cat([outer, closeness], dim=-1)
    if target_bvals is None or reference_bvals is None:
        raise ValueError("give both target and reference b-values, or neither")
    bvals = torch.cat([target_bvals.reshape(-1, 1), reference_bvals.reshape(b.shape[0], -1)], dim=1)
    if bvals.shape != b.shape[:2]:
        raise ValueError(f"b-values of shape {tuple(bvals.shape)} do not match {b.shape[1]} directions per sample")
    return torch.cat([outer, closeness, (bvals.to(b) / BVAL_UNIT).unsqueeze(-1)], dim=-1)


class DirectionEncoder(ModelMixin, ConfigMixin):
    """Embeds the target and the R reference directions as ``R + 1`` tokens.

    One token per direction (never all directions flattened into one token:
    softmax over a single key is constantly 1, and the attention would become
    a bias). A learned rank embedding marks token 0 as the target and keeps
    the references in nearest-first order.

    Args:
        num_references (`int`, *optional*, defaults to 3): R.
        embed_dim (`int`, *optional*, defaults to 64):
            token width, the U-Net's ``cross_attention_dim``.
        hidden_dim (`int`, *optional*, defaults to 128): MLP width.
        bval_conditioning (`bool`, *optional*, defaults to `False`): tokens
            carry each direction's b-value, and calls must give them.
    """

    @register_to_config
    def __init__(self, num_references: int = 3, embed_dim: int = 64, hidden_dim: int = 128,
                 bval_conditioning: bool = False):
        super().__init__()
        self.proj_in = nn.Linear(8 if bval_conditioning else 7, hidden_dim)
        self.rank_embedding = nn.Embedding(num_references + 1, hidden_dim)
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(hidden_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, embed_dim))
        self.norm = nn.LayerNorm(embed_dim)

    def forward(
        self,
        target_bvecs: torch.Tensor,
        reference_bvecs: torch.Tensor,
        target_bvals: torch.Tensor | None = None,
        reference_bvals: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Tokens of shape ``(B, R + 1, embed_dim)`` from ``(B, 3)`` and ``(B, R, 3)`` directions
        (and ``(B,)``, ``(B, R)`` b-values when the encoder is b-conditioned)."""
        r = reference_bvecs.shape[1]
        if r != self.config.num_references:
            raise ValueError(f"encoder was built for R = {self.config.num_references}, got {r} reference directions")
        if self.config.bval_conditioning:
            if target_bvals is None or reference_bvals is None:
                raise ValueError("this direction encoder is b-conditioned: give target and reference b-values")
        else:
            # A model trained on one shell ignores b: it never learned what b means.
            target_bvals = reference_bvals = None
        feats = direction_features(target_bvecs, reference_bvecs, target_bvals, reference_bvals)
        feats = feats.to(self.proj_in.weight.dtype)
        ranks = torch.arange(r + 1, device=feats.device)
        h = self.proj_in(feats) + self.rank_embedding(ranks)[None]
        return self.norm(self.mlp(h))
