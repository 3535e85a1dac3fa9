"""Prefect layer: the ``seed`` flow and its deployments (imports Prefect; ``seed`` and ``pipeline`` do not)."""
