"""The evaluate stage's library: metrics, calibration, robustness, explanations, each task's assessment and the
multi-task roll-up, the MLflow record, and the registry's promotion gate."""
