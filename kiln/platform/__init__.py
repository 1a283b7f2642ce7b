"""Running kiln beyond one checkout. No stage imports this package.

    workspace   a workspace of its own for each flow run; any run saved (and pushed) as a DVC experiment
    lineage     the experiment recorded on the model versions a run registered
    reproduce   rebuilding a registered version from that lineage, stage by stage against the record
    summary     the first screen after a run (`kiln run`, `kiln summary`) and the flow's run report
    stack       the service stack of a team server (`kiln cluster up`), from its parts: postgres, objectstore
                (SeaweedFS S3), servers (MLflow, Prefect server and worker), raynodes, processes (start, stop, logs),
                supervise (restarts a crashed service as it was started)
"""
