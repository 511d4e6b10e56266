"""Passes: composable rewrites of ONNX graphs, one file per pass, and the machinery that runs them."""

from hwnas.passes.base import Exactness, Pass, PassContext, PassResult, Site, option
from hwnas.passes.manager import PassManager, PassRecord, PipelineRun
from hwnas.passes.pipeline import PassSpec, Pipeline, parse_pipeline
from hwnas.passes.registry import all_passes, get_pass, register_pass

__all__ = [
    "Exactness", "Pass", "PassContext", "PassManager", "PassRecord", "PassResult", "PassSpec", "Pipeline",
    "PipelineRun", "Site", "all_passes", "get_pass", "option", "parse_pipeline", "register_pass",
]
