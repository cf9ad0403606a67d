"""The networks of the paper's two GAN baselines: generators and discriminators.

* cGAN (pix2pix): the QID² U-Net itself as generator, fed the R reference
  slices plus a zero channel where the diffusion model gets its noisy target,
  at timestep 0; a PatchGAN discriminator that attends to the direction tokens.
* qGAN: a convolutional U-Net whose blocks are modulated (FiLM) by the
  directions; a patch discriminator that scores its features against a
  direction embedding by an inner product (a projection discriminator).

Every network takes and returns padded slices in the normalised space of
:class:`~qid2_diffusers.image_processor.QID2ImageProcessor` and reads
directions through :class:`DirectionEncoder`, like QID²; built with
``bval_conditioning=True``, the direction tokens also carry each direction's
b-value, so one network learns and serves several shells. Generators and
discriminators are ``ModelMixin``s: ``save_pretrained`` writes ``config.json``
+ safetensors and ``from_pretrained`` (or :func:`load_generator`) reads them
back. Their volume up-sampler is :class:`~qid2_diffusers.baselines.gan.GANUpsampler`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention_processor import Attention
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .direction_encoder import DirectionEncoder
from .unet import PRESETS, build_unet

__all__ = [
    "CGANGenerator",
    "QGANGenerator",
    "PatchDiscriminator",
    "GENERATORS",
    "load_generator",
]


class CGANGenerator(ModelMixin, ConfigMixin):
    """pix2pix generator built on the QID² U-Net (:func:`~qid2_diffusers.build_unet`).

    The U-Net keeps the diffusion model's configuration, ``in_channels = 1 + R``:
    channel 0, the noisy target for QID², is zero here and the timestep is 0,
    so the two models differ only in how they are trained.

    Args:
        num_references (`int`, *optional*, defaults to 3): R.
        preset (`str`, *optional*, defaults to `"small"`): U-Net preset, a key of
            :data:`~qid2_diffusers.models.PRESETS`.
        bval_conditioning (`bool`, *optional*, defaults to `False`): the direction
            tokens carry b (:class:`DirectionEncoder`); calls must give the b-values.
    """

    kind = "cgan"

    @register_to_config
    def __init__(self, num_references: int = 3, preset: str = "small", bval_conditioning: bool = False):
        super().__init__()
        self.unet = build_unet(preset, num_references)
        self.direction_encoder = DirectionEncoder(num_references, PRESETS[preset]["cross_attention_dim"],
                                                  bval_conditioning=bval_conditioning)

    @property
    def size_multiple(self) -> int:
        """Inputs are padded to a multiple of this (:class:`~qid2_diffusers.image_processor.QID2ImageProcessor`)."""
        return 2 ** (len(self.unet.config.block_out_channels) - 1)

    def forward(self, reference_images, target_bvecs, reference_bvecs, target_bvals=None, reference_bvals=None):
        """Normalised target slices ``(B, 1, H, W)`` from normalised references ``(B, R, H, W)``,
        directions ``(B, 3)`` and ``(B, R, 3)``, and b-values ``(B,)`` and ``(B, R)`` (s/mm²)
        when the generator is b-conditioned (ignored otherwise)."""
        tokens = self.direction_encoder(target_bvecs, reference_bvecs, target_bvals, reference_bvals)
        tokens = tokens.to(reference_images.dtype)
        x = torch.cat([torch.zeros_like(reference_images[:, :1]), reference_images], dim=1)
        t = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        return self.unet(x, t, encoder_hidden_states=tokens).sample


class _FiLMBlock(nn.Module):
    """Residual conv block whose normalised features are scaled and shifted by the directions."""

    def __init__(self, in_channels: int, out_channels: int, embed_dim: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels)
        self.film = nn.Linear(embed_dim, 2 * out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()
        # Start as the identity modulation so early training is a plain U-Net.
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        gamma, beta = self.film(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + gamma) + beta
        return self.conv2(F.silu(h)) + self.skip(x)


class QGANGenerator(ModelMixin, ConfigMixin):
    """qGAN generator: a convolutional U-Net modulated by the directions (FiLM).

    The R + 1 direction tokens are flattened into one embedding from which
    every block draws its own per-channel scale and shift.

    Args:
        num_references (`int`, *optional*, defaults to 3): R.
        block_out_channels (`tuple` of `int`, *optional*, defaults to `(32, 64, 128)`): width per level.
        embed_dim (`int`, *optional*, defaults to 64): direction token width.
        norm_num_groups (`int`, *optional*, defaults to 8): GroupNorm groups.
        bval_conditioning (`bool`, *optional*, defaults to `False`): the direction
            tokens carry b (:class:`DirectionEncoder`); calls must give the b-values.
    """

    kind = "qgan"

    @register_to_config
    def __init__(
        self,
        num_references: int = 3,
        block_out_channels: tuple = (32, 64, 128),
        embed_dim: int = 64,
        norm_num_groups: int = 8,
        bval_conditioning: bool = False,
    ):
        super().__init__()
        chans = list(block_out_channels)
        cond_dim = embed_dim * 2
        self.direction_encoder = DirectionEncoder(num_references, embed_dim, bval_conditioning=bval_conditioning)
        self.cond = nn.Sequential(nn.Linear((num_references + 1) * embed_dim, cond_dim), nn.SiLU())
        self.conv_in = nn.Conv2d(num_references, chans[0], 3, padding=1)
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        prev = chans[0]
        for i, c in enumerate(chans):
            self.down.append(_FiLMBlock(prev, c, cond_dim, norm_num_groups))
            prev = c
            if i < len(chans) - 1:
                self.downsample.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
        self.mid = _FiLMBlock(prev, prev, cond_dim, norm_num_groups)
        self.up = nn.ModuleList()
        for c in reversed(chans[:-1]):
            self.up.append(_FiLMBlock(prev + c, c, cond_dim, norm_num_groups))
            prev = c
        self.norm_out = nn.GroupNorm(norm_num_groups, prev)
        self.conv_out = nn.Conv2d(prev, 1, 3, padding=1)

    @property
    def size_multiple(self) -> int:
        return 2 ** (len(self.config.block_out_channels) - 1)

    def forward(self, reference_images, target_bvecs, reference_bvecs, target_bvals=None, reference_bvals=None):
        """Normalised target slices ``(B, 1, H, W)``; arguments as for :meth:`CGANGenerator.forward`."""
        tokens = self.direction_encoder(target_bvecs, reference_bvecs, target_bvals, reference_bvals)
        emb = self.cond(tokens.flatten(1)).to(reference_images.dtype)
        h = self.conv_in(reference_images)
        skips = []
        for i, block in enumerate(self.down):
            h = block(h, emb)
            if i < len(self.downsample):
                skips.append(h)
                h = self.downsample[i](h)
        h = self.mid(h, emb)
        for block in self.up:
            skip = skips.pop()
            h = F.interpolate(h, size=skip.shape[-2:], mode="nearest")
            h = block(torch.cat([h, skip], dim=1), emb)
        return self.conv_out(F.silu(self.norm_out(h)))


class PatchDiscriminator(ModelMixin, ConfigMixin):
    """PatchGAN discriminator (pix2pix) that also sees the directions.

    Input: the R reference slices and a real or generated target, as
    channels; output: one logit per patch ``(B, 1, h, w)``. GroupNorm rather
    than pix2pix's BatchNorm, so statistics do not depend on the batch split
    across processes.

    Args:
        num_references (`int`, *optional*, defaults to 3): R.
        base_channels (`int`, *optional*, defaults to 64): width of the first layer, doubled per layer.
        num_layers (`int`, *optional*, defaults to 3): stride-2 layers (3 gives pix2pix's 70-pixel patches).
        direction_conditioning (`str`, *optional*, defaults to `"cross_attention"`):
            `"cross_attention"` (cGAN): after each stride-2 layer every patch
            attends to the R + 1 direction tokens; `"projection"` (qGAN): the
            logit gains the inner product of the patch features with an
            embedding of the directions.
        embed_dim (`int`, *optional*, defaults to 64): direction token width.
        num_heads (`int`, *optional*, defaults to 4): attention heads.
        bval_conditioning (`bool`, *optional*, defaults to `False`): the direction
            tokens carry b, as the generator's do; calls must give the b-values.
    """

    @register_to_config
    def __init__(
        self,
        num_references: int = 3,
        base_channels: int = 64,
        num_layers: int = 3,
        direction_conditioning: str = "cross_attention",
        embed_dim: int = 64,
        num_heads: int = 4,
        bval_conditioning: bool = False,
    ):
        super().__init__()
        if direction_conditioning not in ("cross_attention", "projection"):
            raise ValueError(f"direction_conditioning must be cross_attention or projection, got {direction_conditioning!r}")
        self.direction_encoder = DirectionEncoder(num_references, embed_dim, bval_conditioning=bval_conditioning)
        self.layers = nn.ModuleList()
        self.attentions = nn.ModuleList()
        prev = num_references + 1
        for i in range(num_layers):
            c = base_channels * 2**i
            norm = nn.Identity() if i == 0 else nn.GroupNorm(min(32, c // 4), c)
            self.layers.append(nn.Sequential(nn.Conv2d(prev, c, 4, stride=2, padding=1), norm, nn.LeakyReLU(0.2)))
            if direction_conditioning == "cross_attention":
                self.attentions.append(
                    Attention(c, cross_attention_dim=embed_dim, heads=num_heads, dim_head=max(1, c // num_heads))
                )
            prev = c
        c = prev * 2
        self.trunk_out = nn.Sequential(nn.Conv2d(prev, c, 3, padding=1), nn.GroupNorm(min(32, c // 4), c), nn.LeakyReLU(0.2))
        self.conv_out = nn.Conv2d(c, 1, 3, padding=1)
        if direction_conditioning == "projection":
            self.projection = nn.Linear((num_references + 1) * embed_dim, c)

    def forward(self, reference_images, target_images, target_bvecs, reference_bvecs, target_bvals=None,
                reference_bvals=None):
        """Patch logits for ``(B, R, H, W)`` references and ``(B, 1, H, W)`` targets; directions
        and b-values as for :meth:`CGANGenerator.forward`."""
        tokens = self.direction_encoder(target_bvecs, reference_bvecs, target_bvals, reference_bvals)
        tokens = tokens.to(reference_images.dtype)
        h = torch.cat([reference_images, target_images], dim=1)
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if self.config.direction_conditioning == "cross_attention":
                b, c, hh, ww = h.shape
                seq = h.flatten(2).transpose(1, 2)
                seq = seq + self.attentions[i](seq, encoder_hidden_states=tokens)
                h = seq.transpose(1, 2).reshape(b, c, hh, ww)
        h = self.trunk_out(h)
        logits = self.conv_out(h)
        if self.config.direction_conditioning == "projection":
            e = self.projection(tokens.flatten(1))[:, :, None, None]
            logits = logits + (h * e).sum(dim=1, keepdim=True) / h.shape[1] ** 0.5
        return logits


#: Generator class by ``--model`` name.
GENERATORS = {"cgan": CGANGenerator, "qgan": QGANGenerator}


def load_generator(path, **kwargs) -> CGANGenerator | QGANGenerator:
    """Load a saved cGAN or qGAN generator, whichever ``path/config.json`` names.

    Args:
        path (`str` or `os.PathLike`): folder written by ``save_pretrained``.
        kwargs: passed to ``from_pretrained`` (e.g. ``torch_dtype``).
    """
    config = Path(path) / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{config}: no saved generator here")
    name = json.loads(config.read_text()).get("_class_name")
    classes = {cls.__name__: cls for cls in GENERATORS.values()}
    if name not in classes:
        raise ValueError(f"{config}: {name!r} is not a GAN generator (expected one of {', '.join(classes)})")
    return classes[name].from_pretrained(path, **kwargs)
