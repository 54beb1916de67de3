"""Every queue and task name, once. A task is named "<queue>.<verb>", so the Celery
app routes it by that prefix, and every send uses these constants."""

GENERATION = "generation"
EXECUTION = "execution"
LABELING = "labeling"
TRAINING = "training"
QUEUES = (GENERATION, EXECUTION, LABELING, TRAINING)

GENERATE_BATCH = f"{GENERATION}.generate_batch"
EXECUTE_PROBLEM = f"{EXECUTION}.execute_problem"
NOOP = f"{EXECUTION}.noop"
LABEL_PROBLEM = f"{LABELING}.label_problem"
RUN_TRAINING = f"{TRAINING}.run"
VERSION_DATASET = f"{TRAINING}.version_dataset"
