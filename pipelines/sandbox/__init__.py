"""Sandboxed execution of candidate programs in eight languages.

    from pipelines.sandbox import Limits, Job, ExecutionResult, run_one, run_batch

Test mode (MultiPL-E conventions): the program is `code + "\\n" + tests` plus a
small harness that prints a per-run random token after the tests return; OK
needs exit status 0 *and* that token as the last output, so exiting early with
status 0 by any route is WRONG_ANSWER.  stdin/stdout mode (`io_cases`) runs the
program once per case and compares whitespace-separated tokens.

Known limits: a candidate that deliberately reads the token (from its argv) and
prints it before exiting can still forge OK, since the tests run in its own
process; syntax errors in JavaScript and bash surface as RUNTIME_ERROR (no
separate parse step); memory limits and peak memory need a writable cgroup
(run as root, or a delegated v2 subtree), and `rewardranker sandbox doctor`
says whether this host has one.
"""

from pipelines.sandbox.job import ExecutionResult, Job, Limits
from pipelines.sandbox.runner import SandboxUnavailable, run_batch, run_one

__all__ = ["ExecutionResult", "Job", "Limits", "SandboxUnavailable", "run_batch", "run_one"]
