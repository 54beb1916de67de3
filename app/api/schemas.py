"""Request and response bodies, so the OpenAPI schema says what each endpoint takes and returns."""

from datetime import datetime
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, Field

from models.enums import Language, RunKind


def _no_nul(value: str) -> str:
    # PostgreSQL text cannot hold NUL characters. Checked by a validator, not a
    # schema `pattern`, which would make schema-driven clients and fuzzers
    # generate strings by regex, slowly.
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


Text = Annotated[str, AfterValidator(_no_nul)]


class ProblemOut(BaseModel):
    id: int
    source: str
    task_id: str
    language: str
    split: str
    entry_point: str | None
    created_at: datetime


class ProblemDetail(ProblemOut):
    prompt: str
    tests: str
    reference_solution: str | None
    io_cases: list[Any] | None


class ProblemImportOut(BaseModel):
    imported: int = Field(description="Problems that were new.")
    unchanged: int = Field(description="Problems already stored under (source, language, task_id).")


class CandidateRow(BaseModel):
    id: int
    problem_id: int
    task_id: str
    language: str
    origin: str
    iteration: int | None
    generator_version_id: int | None
    verdict: str | None
    tests_passed: int | None
    tests_total: int | None
    tampered: bool | None  # None: not executed yet
    reward_model_version_id: int | None
    score: float | None
    hard_negative: bool
    created_at: datetime


class CandidatePageOut(BaseModel):
    items: list[CandidateRow]
    next_cursor: str | None = Field(
        description="Pass as `cursor` for the next page; null on the last."
    )
    reward_model_version_id: int | None = Field(
        description="The reward model asked for, whose scores are shown; null by default, "
        "when each row shows the score its iteration's reward model gave it (the row's "
        "`reward_model_version_id` names that model)."
    )


class ModelOut(BaseModel):
    id: int
    kind: str
    name: str
    parent_id: int | None
    base_model: str
    path: str | None
    status: str
    metrics: dict[str, Any]
    created_at: datetime


class IterationOut(BaseModel):
    number: int
    status: str
    generator_version_id: int | None
    reward_model_version_id: int | None
    params: dict[str, Any]
    metrics: dict[str, Any] = Field(description="As stored by the flywheel.")
    headline: dict[str, Any] = Field(
        description="random_pass1, reranked_pass1, oracle_pass_n, pass_at_k, "
        "reward_pairwise_accuracy (README, HTTP API)."
    )
    created_at: datetime
    finished_at: datetime | None
    candidates: int
    hard_negatives: int
    tampered: int  # runs the sandbox caught forging OK or disarming the tests
    verdicts: dict[str, int]


class TrainingRunIn(BaseModel):
    kind: RunKind
    params: dict[str, Any] = Field(
        default_factory=dict, description="Overrides of the training config."
    )
    iteration: int | None = Field(
        None, ge=0, le=2**31 - 1, description="Iteration number it belongs to."
    )


class TrainingRunOut(BaseModel):
    id: int
    kind: str
    status: str
    iteration_id: int | None
    params: dict[str, Any]
    metrics: dict[str, Any]
    progress: float
    error: str | None
    result_model_version_id: int | None
    attempt: int = Field(description="Claims so far: each lost worker's run is claimed again.")
    owner: str | None = Field(description="host/pid of the process training it now.")
    resumed_from_step: int | None = Field(
        description="The checkpoint step this attempt resumed from, if any."
    )
    created_at: datetime
    started_at: datetime | None
    heartbeat_at: datetime | None
    finished_at: datetime | None


class SolveIn(BaseModel):
    prompt: Text = Field(min_length=1, max_length=100_000)
    language: Language = Language.PYTHON
    tests: Text | None = Field(None, max_length=100_000)
    n: int = Field(
        8, ge=1, le=64, description="Programs to sample; the best-scored one is returned."
    )
    max_new_tokens: int = Field(256, ge=1, le=2048, description="Most tokens generated per sample.")


class SolveSample(BaseModel):
    candidate_id: int
    score: float


class SolveOut(BaseModel):
    candidate_id: int
    problem_id: int
    code: str
    score: float
    generator_version_id: int | None
    reward_model_version_id: int
    samples: list[SolveSample]


class HealthOut(BaseModel):
    status: str = Field(description="'ok' when the database and broker answer, else 'degraded'.")
    database: str
    broker: str
    workers: dict[str, list[str]] = Field(description="Live workers consuming each queue.")
