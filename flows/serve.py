"""Serve the deployments ``seed/full`` and ``seed/student`` from one process.

    python -m flows.serve        # then: python -m flows.follow --deployment seed/full (starts a run, prints its log)

``seed/full`` runs every stage, skipping complete ones; ``seed/student`` runs the student and
evaluation stages only (it refuses a missing, incomplete or mismatched cache, and never loads the
teacher). Runs start in this process's working directory, so relative paths resolve there. One run at a
time: a run started while another is going waits, scheduled, until it ends (two runs would share the
machine's GPUs and could write the same cache or run directory at once).
"""

from typing import cast

from prefect import serve
from prefect.deployments.runner import EntrypointType, RunnerDeployment

from flows.seed_flow import seed


def deployments() -> list[RunnerDeployment]:
    """``seed/full`` and ``seed/student`` (``to_deployment`` is sync here; Prefect types it sync-or-async)."""
    return [
        cast(RunnerDeployment, seed.to_deployment(
            "full", entrypoint_type=EntrypointType.MODULE_PATH,
            description="all stages: pretrain (if needed), teacher, bank, students, evaluation")),
        cast(RunnerDeployment, seed.to_deployment(
            "student", entrypoint_type=EntrypointType.MODULE_PATH, parameters={"stages": ["student", "evaluate"]},
            description="re-train students on the existing cache; never loads the teacher")),
    ]


if __name__ == "__main__":
    serve(*deployments(), limit=1)
