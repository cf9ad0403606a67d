"""qid2-diffusers: q-space up-sampling of diffusion MRI with QID², on Hugging Face diffusers."""

from .models import DirectionEncoder, build_unet, unet_config
from .pipelines import QID2Pipeline, QID2PipelineOutput, QID2Upsampler
from .builder import build_pipeline

__version__ = "0.1.0"

__all__ = [
    "QID2Pipeline",
    "QID2PipelineOutput",
    "QID2Upsampler",
    "DirectionEncoder",
    "build_unet",
    "unet_config",
    "build_pipeline",
    "__version__",
]
