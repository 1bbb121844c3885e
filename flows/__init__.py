"""Orchestration: one Prefect flow per pipeline stage, and `flows.lifecycle` chaining them."""
