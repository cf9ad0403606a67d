"""The QID² denoiser: a configured (not subclassed) ``UNet2DConditionModel``.

Configuration only, so the network saves and reloads with diffusers' own
``save_pretrained``/``from_pretrained`` and nothing written by hand.
"""

from __future__ import annotations

from diffusers import UNet2DConditionModel

__all__ = ["PRESETS", "PRIOR_CHANNELS", "unet_config", "build_unet"]

#: Channel widths and head sizes. ``paper`` is the paper's §2.3 network
#: ([128, 128, 256], one residual block per level); ``small`` trains on two
#: CPU cores in well under an hour. ``attention_head_dim`` is, by a diffusers
#: naming quirk kept for backward compatibility, the number of heads.
PRESETS = {
    "paper": dict(block_out_channels=(128, 128, 256), norm_num_groups=32, cross_attention_dim=128, attention_head_dim=8),
    "small": dict(block_out_channels=(32, 32, 64), norm_num_groups=8, cross_attention_dim=64, attention_head_dim=4),
    # For unit tests only: a few thousand parameters, milliseconds per pass.
    "tiny": dict(block_out_channels=(8, 8, 16), norm_num_groups=4, cross_attention_dim=16, attention_head_dim=2),
}


#: Condition channels added by the physics prior: the tensor-fit prediction of
#: the target slice and the mean b0 slice.
PRIOR_CHANNELS = 2


def unet_config(preset: str = "small", num_references: int = 3, *, physics_prior: bool = False) -> dict:
    """``UNet2DConditionModel`` keyword arguments for a preset and R.

    Input channels are the noisy target plus the R reference slices,
    concatenated as in the paper; the output is the one target channel. With
    ``physics_prior`` two more channels follow the references: the tensor-fit
    prediction of the target slice from every kept direction and the mean b0
    (:data:`PRIOR_CHANNELS`); the network then models the residual
    target - prior, so with nothing to add it falls back to the fit. The
    paper's configuration is ``physics_prior=False``.
    Every transformer block at every resolution is ``only_cross_attention``:
    its attentions look at the R + 1 direction tokens, then a feed-forward
    layer follows, as in the paper's encoder block. Self-attention over
    pixels at full resolution would cost ~15 s per 145x174 slice on two CPU
    cores; the only self-attention left is the mid block's, at a quarter of
    the resolution, where it is cheap and gives the network global context.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    if num_references < 1:
        raise ValueError(f"num_references must be >= 1, got {num_references}")
    p = PRESETS[preset]
    levels = len(p["block_out_channels"])
    return dict(
        sample_size=None,
        in_channels=1 + num_references + (PRIOR_CHANNELS if physics_prior else 0),
        out_channels=1,
        down_block_types=("CrossAttnDownBlock2D",) * levels,
        up_block_types=("CrossAttnUpBlock2D",) * levels,
        mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=p["block_out_channels"],
        layers_per_block=1,
        norm_num_groups=p["norm_num_groups"],
        cross_attention_dim=p["cross_attention_dim"],
        attention_head_dim=p["attention_head_dim"],
        only_cross_attention=True,
        use_linear_projection=True,
    )


def build_unet(preset: str = "small", num_references: int = 3, *, physics_prior: bool = False) -> UNet2DConditionModel:
    """A freshly initialised denoiser for a preset and R."""
    return UNet2DConditionModel(**unet_config(preset, num_references, physics_prior=physics_prior))

