"""kiln: the library behind the pipeline stages (no Prefect imports here)."""
