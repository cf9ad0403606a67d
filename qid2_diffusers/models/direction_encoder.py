"""Direction tokens for the U-Net's cross-attention."""

from __future__ import annotations

import math

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

__all__ = ["DirectionEncoder", "direction_features"]

_SQRT2 = math.sqrt(2.0)


def direction_features(target_bvecs: torch.Tensor, reference_bvecs: torch.Tensor) -> torch.Tensor:
    """Sign-invariant per-token features, shape ``(B, R + 1, 7)``.

    Each direction ``b`` is described by the six distinct entries of ``b b^T``
    (identical for ``b`` and ``-b``, as the signal is) plus ``|b . b_target|``,
    its closeness to the target, which tells each reference how much it should
    count. Token 0 is the target, tokens 1..R the references in rank order.
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
    return torch.cat([outer, closeness], dim=-1)


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
    """

    @register_to_config
    def __init__(self, num_references: int = 3, embed_dim: int = 64, hidden_dim: int = 128):
        super().__init__()
        self.proj_in = nn.Linear(7, hidden_dim)
        self.rank_embedding = nn.Embedding(num_references + 1, hidden_dim)
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(hidden_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, embed_dim))
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, target_bvecs: torch.Tensor, reference_bvecs: torch.Tensor) -> torch.Tensor:
        """Tokens of shape ``(B, R + 1, embed_dim)`` from ``(B, 3)`` and ``(B, R, 3)`` directions."""
        r = reference_bvecs.shape[1]
        if r != self.config.num_references:
            raise ValueError(f"encoder was built for R = {self.config.num_references}, got {r} reference directions")
        feats = direction_features(target_bvecs, reference_bvecs).to(self.proj_in.weight.dtype)
        ranks = torch.arange(r + 1, device=feats.device)
        h = self.proj_in(feats) + self.rank_embedding(ranks)[None]
        return self.norm(self.mlp(h))
