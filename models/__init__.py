"""The candidate store: SQLAlchemy 2.0 typed models."""

from models.base import Base
from models.candidate import Candidate, Execution, HardNegativeLabel, Score
from models.evaluation import Evaluation, EvaluationSample
from models.problem import Problem
from models.training import DatasetVersion, Iteration, ModelVersion, TrainingRun

__all__ = [
    "Base",
    "Candidate",
    "DatasetVersion",
    "Evaluation",
    "EvaluationSample",
    "Execution",
    "HardNegativeLabel",
    "Iteration",
    "ModelVersion",
    "Problem",
    "Score",
    "TrainingRun",
]
