from .direction_encoder import DirectionEncoder, direction_features
from .unet import PRESETS, PRIOR_CHANNELS, build_unet, unet_config

__all__ = ["DirectionEncoder", "direction_features", "PRESETS", "build_unet", "PRIOR_CHANNELS", "unet_config"]
