"""Sandboxed execution of candidate programs in eight languages.

from pipelines.sandbox import Limits, Job, ExecutionResult, run_one, run_batch
"""

from pipelines.sandbox.job import ExecutionResult, Job, Limits
from pipelines.sandbox.runner import SandboxUnavailable, run_batch, run_one

__all__ = ["ExecutionResult", "Job", "Limits", "SandboxUnavailable", "run_batch", "run_one"]
