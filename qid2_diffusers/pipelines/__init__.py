from .pipeline_qid2 import QID2Pipeline, QID2PipelineOutput
from .upsampler_qid2 import QID2Upsampler

__all__ = ["QID2Pipeline", "QID2PipelineOutput", "QID2Upsampler"]
