"""kiln's library: everything the stages in `tasks/` call, grouped by the stage that owns it.

    core/      shared by every stage: the params schema, the prepared-data format, the model zoo, inference and
               latency, MLflow conventions, the dvc.yaml contract, Ray connection, files and plots
    prepare/   raw dataset readers, validation, the deterministic split and the manifest
    train/     the training recipe, the one epoch loop and its checkpoint format, Ray Train (DDP)
    tune/      Ray Tune search spaces, trials (which call train's loop), the trial tables and plots
    compress/  pruning, distillation, ONNX export and int8, building, measuring and selecting variants
    evaluate/  metrics, calibration, robustness, explanations, the registry's promotion gate
    platform/  beyond one checkout: flow-run workspaces and DVC experiments, lineage, `kiln reproduce`, and the
               service stack of a team server (`kiln cluster up`); no stage imports it

A stage's package imports only `core/` and packages listed before it that it builds on (tune and compress use
train's loop); nothing here imports Prefect, `tasks/` or `flows/`. dvc.yaml lists each stage's packages as its
code dependencies, and tests/test_contract.py checks that the list covers every module the stage imports.
"""
