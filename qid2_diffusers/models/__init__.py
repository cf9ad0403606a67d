from .direction_encoder import DirectionEncoder, direction_features
from .unet import PRESETS, build_unet, num_references_of, unet_config

__all__ = ["DirectionEncoder", "direction_features", "PRESETS", "build_unet", "num_references_of", "unet_config"]
