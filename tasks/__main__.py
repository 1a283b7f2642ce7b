"""`python -m tasks STAGE --ROLE PATH ...`: what dvc.yaml runs (tasks.stages)."""

import typer

from tasks import stages

app = typer.Typer(add_completion=False, no_args_is_help=True, help=stages.__doc__.split("\n\n")[0])
stages.register(app)
app()
