"""Sandboxed execution of candidate programs in eight languages.

    from pipelines.sandbox import Limits, Job, ExecutionResult, run_one, run_batch

Test mode (MultiPL-E conventions): the program is `code + "\\n" + tests`, run by
a judge's harness that prints a per-run secret after the tests return; OK needs
exit status 0 *and* that secret as the last output.  The secret reaches the
harness on a pipe read before any candidate code runs, so a program can neither
read it nor print it by exiting early; results the tests compare are plain data,
and what the tests call is captured first (docs/SANDBOX.md: threat model, design
and limits).  A run the harness sees tampering in is WRONG_ANSWER with
`tampered` set.  stdin/stdout mode (`io_cases`) runs the program once per case
and compares whitespace-separated tokens.

Known limits: memory limits and peak memory need a writable cgroup (run as
root, or a delegated v2 subtree), and `rewardranker sandbox doctor` says
whether this host has one.
"""

from pipelines.sandbox.job import ExecutionResult, Job, Limits
from pipelines.sandbox.runner import SandboxUnavailable, run_batch, run_one

__all__ = ["ExecutionResult", "Job", "Limits", "SandboxUnavailable", "run_batch", "run_one"]
