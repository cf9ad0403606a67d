"""The QID² denoiser: a configured (not subclassed) ``UNet2DConditionModel``.

Configuration only, so the network saves and reloads with diffusers' own
``save_pretrained``/``from_pretrained`` and nothing written by hand.
"""

from __future__ import annotations

from diffusers import UNet2DConditionModel

__all__ = ["PRESETS", "PRIOR_CHANNELS", "ATTENTION", "unet_config", "build_unet", "attention_of", "unet_forward"]

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


#: Where the direction tokens are attended to: ``every`` level (the paper's design; the shipped models), or
#: only the ``coarse`` ones (half resolution and below). Full-resolution cross-attention of every pixel to
#: R + 1 tokens is memory-bound on a CPU (23 % of a pass on the HCP grid); with ``coarse`` the full-resolution
#: blocks are plain ResNet blocks, and the tokens also reach every block through the time embedding (a
#: projection of the flattened tokens added to it, diffusers' ``class_embed_type="projection"``), so no
#: level loses the condition.
ATTENTION = ("every", "coarse")

#: Condition channels added by the physics prior: the tensor-fit prediction of
#: the target slice and the mean b0 slice.
PRIOR_CHANNELS = 2


def unet_config(preset: str = "small", num_references: int = 3, *, physics_prior: bool = False,
                attention: str = "every") -> dict:
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
    ``attention="coarse"``: see :data:`ATTENTION`.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    if num_references < 1:
        raise ValueError(f"num_references must be >= 1, got {num_references}")
    if attention not in ATTENTION:
        raise ValueError(f"unknown attention {attention!r}; choose from {', '.join(ATTENTION)}")
    p = PRESETS[preset]
    levels = len(p["block_out_channels"])
    plain = 1 if attention == "coarse" else 0  # full-resolution levels without transformer blocks
    extra = {}
    if attention == "coarse":
        extra = dict(class_embed_type="projection",
                     projection_class_embeddings_input_dim=(num_references + 1) * p["cross_attention_dim"])
    return dict(
        sample_size=None,
        in_channels=1 + num_references + (PRIOR_CHANNELS if physics_prior else 0),
        out_channels=1,
        down_block_types=("DownBlock2D",) * plain + ("CrossAttnDownBlock2D",) * (levels - plain),
        up_block_types=("CrossAttnUpBlock2D",) * (levels - plain) + ("UpBlock2D",) * plain,
        mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=p["block_out_channels"],
        layers_per_block=1,
        norm_num_groups=p["norm_num_groups"],
        cross_attention_dim=p["cross_attention_dim"],
        attention_head_dim=p["attention_head_dim"],
        only_cross_attention=True,
        use_linear_projection=True,
        **extra,
    )


def build_unet(preset: str = "small", num_references: int = 3, *, physics_prior: bool = False,
               attention: str = "every") -> UNet2DConditionModel:
    """A freshly initialised denoiser for a preset and R."""
    return UNet2DConditionModel(**unet_config(preset, num_references, physics_prior=physics_prior,
                                              attention=attention))


def attention_of(unet) -> str:
    """Which :data:`ATTENTION` design a U-Net was built with (read from its saved config)."""
    config = getattr(unet, "_orig_mod", unet).config
    return "every" if config.down_block_types[0].startswith("CrossAttn") else "coarse"


def unet_forward(unet, sample, timestep, tokens):
    """The U-Net's output for ``sample`` conditioned on the direction ``tokens`` (B, R + 1, D): as
    cross-attention context, and, for a ``coarse`` network, also flattened into its time embedding."""
    config = getattr(unet, "_orig_mod", unet).config  # a compiled module keeps its config on the original
    labels = tokens.flatten(1) if config.class_embed_type == "projection" else None
    return unet(sample, timestep, encoder_hidden_states=tokens, class_labels=labels).sample

