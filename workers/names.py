"""Every queue and task name, once. A task is named "<queue>.<verb>", so the Celery
app routes it by that prefix, and every send uses these constants."""

GENERATION = "generation"
EXECUTION = "execution"
LABELING = "labeling"
TRAINING = "training"
QUEUES = (GENERATION, EXECUTION, LABELING, TRAINING)
MAINTENANCE = "maintenance"  # the scheduled reconcile; every CPU worker consumes it too

GENERATE_BATCH = f"{GENERATION}.generate_batch"
DRAW_SAMPLES = f"{GENERATION}.draw_samples"  # an evaluation's held-out samples
EXECUTE_PROBLEM = f"{EXECUTION}.execute_problem"
EXECUTE_DRAWN = f"{EXECUTION}.execute_drawn"
NOOP = f"{EXECUTION}.noop"
LABEL_PROBLEM = f"{LABELING}.label_problem"
SCORE_DRAWN = f"{LABELING}.score_drawn"
RUN_TRAINING = f"{TRAINING}.run"
VERSION_DATASET = f"{TRAINING}.version_dataset"
RECONCILE = f"{MAINTENANCE}.reconcile"
