"""String enums shared by the store, the sandbox and the pipelines.

They live apart from the ORM so that code with no database (the sandbox, a
training job on a GPU box) can import them without SQLAlchemy.
"""

from enum import StrEnum


class Language(StrEnum):
    PYTHON = "python"
    CPP = "cpp"
    JAVA = "java"
    JAVASCRIPT = "javascript"
    TYPESCRIPT = "typescript"
    PHP = "php"
    CSHARP = "csharp"
    BASH = "bash"


class Verdict(StrEnum):
    OK = "OK"
    WRONG_ANSWER = "WRONG_ANSWER"
    RUNTIME_ERROR = "RUNTIME_ERROR"
    TIME_LIMIT = "TIME_LIMIT"
    MEMORY_LIMIT = "MEMORY_LIMIT"
    OUTPUT_LIMIT = "OUTPUT_LIMIT"
    COMPILE_ERROR = "COMPILE_ERROR"
    SANDBOX_ERROR = "SANDBOX_ERROR"


class Origin(StrEnum):
    GENERATOR = "generator"
    MUTATION = "mutation"
    REFERENCE = "reference"
    REQUEST = "request"  # sampled to answer a /solve request
    EVALUATION = "evaluation"  # sampled to evaluate an iteration; never trained on


class Split(StrEnum):
    """Which side of the held-out line a problem is on: training never sees `eval`."""

    TRAIN = "train"
    EVAL = "eval"


class ModelKind(StrEnum):
    GENERATOR = "generator"
    REWARD = "reward"


class ModelStatus(StrEnum):
    READY = "ready"
    RETIRED = "retired"


class RunKind(StrEnum):
    REWARD = "reward"
    POLICY = "policy"


class RunStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class IterationStatus(StrEnum):
    OPEN = "open"
    GENERATING = "generating"
    TRAINING = "training"
    EVALUATING = "evaluating"  # measuring its models on the held-out problems
    DONE = "done"


class EvaluationStatus(StrEnum):
    RUNNING = "running"  # sampling, executing and scoring the held-out problems
    DONE = "done"  # metrics computed
