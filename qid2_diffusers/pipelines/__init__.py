from .pipeline_qid2 import QID2Pipeline, QID2PipelineOutput

__all__ = ["QID2Pipeline", "QID2PipelineOutput"]
