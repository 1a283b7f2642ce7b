"""The evaluate stage's library: metrics, calibration, robustness, explanations, and the registry's promotion gate."""
