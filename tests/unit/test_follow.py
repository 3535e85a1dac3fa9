"""flows.follow against a stand-in for the Prefect client: the run's last log lines, sent in a batch after
it turned final, are still printed."""

from __future__ import annotations

import datetime as dt
import logging
import uuid

from prefect.client.schemas.objects import FlowRun, Log
from prefect.states import Completed, Running

from flows.follow import follow


class _Client:
    """Answers the three calls ``follow`` makes. The run runs for ``running`` reads, silent after its first
    line; it is then final, and its last line arrives only ``late`` reads after that."""

    def __init__(self, running: int, late: int):
        self.run_id, self.reads, self.running, self.late = uuid.uuid4(), 0, running, late
        t0 = dt.datetime.now(dt.timezone.utc)
        self.first = self._log("== [5/5] evaluate: ...", t0)
        self.last = self._log("evaluate: 4 encoders scored in 78 s", t0 + dt.timedelta(seconds=60))

    def _log(self, message: str, at: dt.datetime) -> Log:
        return Log(id=uuid.uuid4(), name="prefect.flow_runs", level=logging.INFO, message=message, timestamp=at,
                   flow_run_id=self.run_id)

    def read_flow_run(self, flow_run_id: uuid.UUID) -> FlowRun:
        self.reads += 1
        state = Running() if self.reads <= self.running else Completed()
        return FlowRun(id=self.run_id, name="test-run", flow_id=uuid.uuid4(), state=state,
                       total_run_time=dt.timedelta(seconds=70))

    def read_flow_runs(self, **_: object) -> list[FlowRun]:
        return []

    def read_logs(self, *_: object, **__: object) -> list[Log]:
        logs = [self.first]
        if self.reads > self.running + self.late:
            logs.append(self.last)
        return logs


def test_the_last_lines_sent_after_the_run_turned_final_are_printed() -> None:
    # silent for 20 polls (far longer than quiet) while running, then final, the last line 2 reads later
    client = _Client(running=20, late=2)
    lines: list[str] = []
    code = follow(client, client.run_id, lines.append, poll=0.005, quiet=0.05)  # type: ignore[arg-type]
    text = "\n".join(lines)
    assert code == 0 and "evaluate: 4 encoders scored in 78 s" in text, text
    assert text.index("== [5/5] evaluate") < text.index("scored in 78 s") < text.index("flow run test-run: Completed")


def test_a_flow_run_id_that_is_no_uuid_is_one_line_and_exit_2(capsys) -> None:  # type: ignore[no-untyped-def]
    from flows.follow import main

    assert main(["not-a-uuid"]) == 2
    assert capsys.readouterr().err == "follow: 'not-a-uuid' is not a flow run id (a UUID)\n"


class _NeverStarted(_Client):
    """A run no deployment server takes: scheduled for ever."""

    def read_flow_run(self, flow_run_id: uuid.UUID) -> FlowRun:
        from prefect.states import Scheduled

        return FlowRun(id=self.run_id, name="lonely-run", flow_id=uuid.uuid4(), state=Scheduled(),
                       total_run_time=dt.timedelta(0))

    def read_logs(self, *_: object, **__: object) -> list[Log]:
        return []


def test_a_run_no_server_takes_is_given_up_when_asked_and_the_exit_says_so() -> None:
    client = _NeverStarted(running=0, late=0)
    lines: list[str] = []
    code = follow(client, client.run_id, lines.append, poll=0.005, waiting=0.02, give_up=0.1)  # type: ignore[arg-type]
    text = "\n".join(lines)
    assert code == 1 and "is the deployment server running?" in text
    assert "flow run lonely-run: still Scheduled after 0 s; no deployment server took it" in text
    assert f"prefect flow-run cancel {client.run_id}" in text


def test_no_server_address_and_a_malformed_deployment_name_are_one_line_and_exit_2(capsys) -> None:  # type: ignore[no-untyped-def]
    """Without PREFECT_API_URL the client would start a throw-away server of its own (which has no deployment
    and no run): refused before any client is made."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.follow import main

    assert main(["--deployment", "seed-full"]) == 2
    assert capsys.readouterr().err == ("follow: --deployment 'seed-full' must look like flow/deployment "
                                       "(seed/full, seed/student)\n")
    with temporary_settings(updates={PREFECT_API_URL: None}):
        assert main(["--deployment", "seed/full"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("follow: PREFECT_API_URL is not set") and err.count("\n") == 1
