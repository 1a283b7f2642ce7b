"""The tune stage's library: search spaces, algorithms and schedulers, trials, and the trial reports."""
