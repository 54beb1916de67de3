"""What a caller hands the sandbox and what it gets back."""

from dataclasses import asdict, dataclass, field

from models.enums import Verdict


@dataclass(frozen=True)
class Limits:
    """Per-run limits; the defaults suit HumanEval/MultiPL-E style unit tests."""

    timeout_s: float = field(
        default=10.0,
        metadata={"help": "Wall-clock limit of one run (per case in stdin/stdout mode)."},
    )
    memory_mb: int = field(
        default=512, metadata={"help": "Memory of the whole sandbox (every process of it)."}
    )
    output_bytes: int = field(
        default=64 * 1024,
        metadata={"help": "Most bytes kept per stream; a run printing more is OUTPUT_LIMIT."},
    )


@dataclass(frozen=True)
class Job:
    """One candidate: the program is `code + "\\n" + tests`."""

    language: str
    code: str
    tests: str
    io_cases: list[dict] | None = field(
        default=None,
        metadata={"help": 'stdin/stdout cases [{"input": str, "output": str}]; None: test mode.'},
    )
    limits: Limits = field(default_factory=Limits)


@dataclass
class ExecutionResult:
    """The verdict of one job.

    `passed`/`total` count stdin/stdout cases; in test mode the whole test
    program is one check, so `total` is 1 and `passed` is 1 only for OK.
    `peak_memory_kb` is the sandbox's peak (None without a memory cgroup).
    `tampered` marks a run in which the harness saw the program patch what the
    tests use or return a result that is not plain data, with the reason.
    """

    verdict: Verdict
    passed: int
    total: int | None
    duration_ms: float
    peak_memory_kb: int | None
    stdout_tail: str
    stderr_tail: str
    # The judge saw a forged or tampered run (the verdict is then WRONG_ANSWER).
    tampered: bool = False
    tamper_reason: str | None = None

    def to_dict(self) -> dict:
        result = asdict(self)
        result["verdict"] = self.verdict.value
        return result
