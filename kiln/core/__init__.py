"""Shared by every stage: params schema, prepared-data format, model zoo, inference, latency, tracking, contract."""
