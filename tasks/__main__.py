"""`python -m tasks STAGE --ROLE PATH ...`: what dvc.yaml runs (tasks.stages)."""

from tasks.stages import app

app()
