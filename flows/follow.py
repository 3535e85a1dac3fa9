"""Follow a flow run in the terminal: its log lines (and its subflows'), readably, until it ends.

    python -m flows.follow --deployment seed/full --param config=configs/demo.yaml   # start a run, follow it
    python -m flows.follow FLOW_RUN_ID                                               # follow a run

Prints the run's name and Prefect UI link, then each log line of the run as the API receives it
(Prefect's routine lines, such as task runs created and completed, left out), and at the end the
final state. Exits 0 when the run completes, 1 when it fails, crashes or is cancelled; Ctrl-C stops
following and leaves the run going. ``make demo`` uses it instead of ``prefect deployment run
--watch``, whose event stream shows neither stages nor losses.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import re
import sys
import time
from collections.abc import Callable
from typing import Any
from uuid import UUID

import httpx
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import (FlowRunFilter, FlowRunFilterParentFlowRunId, LogFilter, LogFilterFlowRunId,
                                            LogFilterTimestamp)
from prefect.client.schemas.objects import FlowRun, Log
from prefect.client.schemas.sorting import LogSort
from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError
from prefect.settings import PREFECT_API_URL
from prefect.types import DateTime
from prefect.utilities.urls import url_for

# Prefect's own INFO lines that say nothing a reader of the transcript needs
ROUTINE = re.compile(r"(Created (task|subflow) run |Executing '|Finished in state Completed\(|Beginning (sub)?flow run |"
                     r"View at |Downloading flow code |Running on worker |Opening process|Process .* exited|"
                     r"Completed submission of flow run|Runner '.*' submitting flow run)")
# and the lines that repeat a failure already shown ("Task run failed with exception: ...") or told at the end
REPEATS = re.compile(r"(Finished in state |Encountered exception during execution: )")
TRACEBACK = "Traceback (most recent call last):"
PAGE = 200  # logs per request
OVERLAP = datetime.timedelta(seconds=10)  # re-read this much before the newest line seen: log batches arrive late


def ui_link(flow_run_id: UUID) -> str:
    """The flow run's page in the Prefect UI (``http://127.0.0.1:4200/runs/flow-run/<id>`` for the demo)."""
    link = url_for("flow-run", obj_id=flow_run_id)
    if link:
        return link
    base = (PREFECT_API_URL.value() or "").removesuffix("/").removesuffix("/api")
    return f"{base}/runs/flow-run/{flow_run_id}"


def format_log(log: Log) -> str | None:
    """One log record as terminal text (``12:03:41  student epoch 1/3: ...``), or None for a routine or repeated line.

    Warnings and errors say so; an error's traceback is left out (the message before it says what
    failed; the whole of it is in the UI). Further lines of a message are indented under the first.
    """
    if (log.level < logging.WARNING and ROUTINE.match(log.message)) or REPEATS.match(log.message):
        return None
    lines = log.message.rstrip().splitlines() or [""]
    if log.level >= logging.ERROR and TRACEBACK in lines:
        head = lines[:lines.index(TRACEBACK)]
        lines = head or [lines[-1]]
    if log.level >= logging.WARNING:
        lines[0] = f"{logging.getLevelName(log.level)}: {lines[0]}"
    stamp = log.timestamp.astimezone().strftime("%H:%M:%S")
    text = f"{stamp}  " + "\n          ".join(lines)
    return ("\n" + text) if lines[0].startswith("== ") else text


def run_ids(client: SyncPrefectClient, root: UUID) -> list[UUID]:
    """``root`` and every flow run below it (subflows, their subflows)."""
    ids, todo = [root], [root]
    while todo:
        children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=todo)))
        todo = [c.id for c in children if c.id not in ids]
        ids += todo
    return ids


def new_logs(client: SyncPrefectClient, ids: list[UUID], after: DateTime | None, seen: set[UUID]) -> list[Log]:
    """The logs of ``ids`` from ``after`` on (oldest first) not in ``seen``; adds them to ``seen``."""
    out: list[Log] = []
    offset = 0
    while True:
        page = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids),
                                          timestamp=LogFilterTimestamp(after_=after) if after else None),
                                limit=PAGE, offset=offset, sort=LogSort.TIMESTAMP_ASC)
        for log in page:
            if log.id not in seen:
                seen.add(log.id)
                out.append(log)
        if len(page) < PAGE:
            return out
        offset += PAGE


def _duration(run: FlowRun) -> str:
    seconds = int(run.total_run_time.total_seconds())
    return f"{seconds // 60} min {seconds % 60} s" if seconds >= 60 else f"{seconds} s"


def follow(client: SyncPrefectClient, flow_run_id: UUID, out: Callable[[str], None] = print, *, poll: float = 2.0,
           quiet: float = 5.0, waiting: float = 30.0, give_up: float | None = None) -> int:
    """Print the run's header, then its log lines until it is final and ``quiet`` seconds pass without one
    (counted from when it was first seen final at the earliest: its last lines are sent in batches).

    Returns 0 for a completed run, 1 otherwise. ``waiting``: say once when the run is still
    scheduled after this many seconds (no deployment server picked it up); ``give_up``: stop following and
    return 1 when it is still scheduled after this many (None: follow on; a busy server may start it later).
    """
    run = client.read_flow_run(flow_run_id)
    out(f"flow run {run.name} ({run.id})")
    out(f"Prefect UI: {ui_link(run.id)}")
    seen: set[UUID] = set()
    newest: DateTime | None = None
    started = time.monotonic()
    last_line = started
    final_at: float | None = None  # when the run was first seen final: its last log lines may still be on the way
    warned = False
    while True:
        run = client.read_flow_run(flow_run_id)
        logs = new_logs(client, run_ids(client, flow_run_id), newest - OVERLAP if newest else None, seen)
        for log in logs:
            newest = max(newest, log.timestamp) if newest else log.timestamp
            text = format_log(log)
            if text is not None:
                out(text)
        now = time.monotonic()
        if logs:
            last_line = now
        state = run.state
        if state is not None and state.is_final():
            final_at = final_at if final_at is not None else now
            if now - max(last_line, final_at) >= quiet:
                break
        elif state is not None and state.is_scheduled():
            if give_up is not None and now - started >= give_up:
                out(f"\nflow run {run.name}: still {state.name} after {give_up:.0f} s; no deployment server took it "
                    f"(none is running, or it is busy with another run; this one stays scheduled: cancel it with "
                    f"prefect flow-run cancel {run.id})")
                return 1
            if not warned and now - started >= waiting:
                warned = True
                out(f"(still {state.name} after {waiting:.0f} s: is the deployment server running? `python -m flows.serve`)")
        time.sleep(poll)
    assert state is not None
    if state.is_completed():
        out(f"\nflow run {run.name}: {state.name} in {_duration(run)}")
        return 0
    out(f"\nflow run {run.name}: {state.name} after {_duration(run)}: {state.message or 'no message'}")
    out(f"details: {ui_link(run.id)}")
    return 1


def parse_param(item: str) -> tuple[str, Any]:
    """``key=value``; the value as JSON when it parses (numbers, lists, true), else as text, like ``prefect deployment run --param``."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise SystemExit(f"follow: --param {item!r} must look like key=value")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.follow", description=__doc__.split("\n\n")[0])
    parser.add_argument("flow_run", nargs="?", help="id of the flow run to follow")
    parser.add_argument("--deployment", help="start a run of this deployment (flow/deployment, e.g. seed/full) and follow it")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="a parameter of the new run")
    parser.add_argument("--poll", type=float, default=2.0, help="seconds between two reads of the API (default 2)")
    parser.add_argument("--give-up", type=float, default=None, metavar="SECONDS",
                        help="exit 1 when the run is still scheduled after this long (default: wait)")
    args = parser.parse_args(argv)
    if bool(args.flow_run) == bool(args.deployment):
        parser.error("give a flow run id or --deployment (one of the two)")
    try:
        run_id = UUID(args.flow_run) if args.flow_run else None
    except ValueError:
        print(f"follow: {args.flow_run!r} is not a flow run id (a UUID)", file=sys.stderr)
        return 2
    if args.deployment and "/" not in args.deployment:
        print(f"follow: --deployment {args.deployment!r} must look like flow/deployment (seed/full, seed/student)",
              file=sys.stderr)
        return 2
    if not PREFECT_API_URL.value():
        # without it the client would start a throw-away server of its own, which knows no deployment or run
        print("follow: PREFECT_API_URL is not set; point it at the Prefect server (make demo uses "
              "http://127.0.0.1:4200/api)", file=sys.stderr)
        return 2
    with get_client(sync_client=True) as client:
        try:
            if args.deployment:
                deployment = client.read_deployment_by_name(args.deployment)
                run = client.create_flow_run_from_deployment(deployment.id,
                                                             parameters=dict(map(parse_param, args.param)))
            else:
                assert run_id is not None
                run = client.read_flow_run(run_id)
        except ObjectNotFound:
            what = (f"deployment {args.deployment} (make demo registers seed/full and seed/student)" if args.deployment
                    else f"flow run {args.flow_run}")
            print(f"follow: the Prefect server at {client.api_url} has no {what}", file=sys.stderr)
            return 2
        except PrefectHTTPStatusError as exc:  # the server answered: it refused the request (parameters, say)
            try:
                detail = exc.response.json().get("detail", exc.response.text)
            except ValueError:
                detail = exc.response.text
            print(f"follow: the Prefect server at {client.api_url} refused it (HTTP {exc.response.status_code}): {detail}",
                  file=sys.stderr)
            return 2
        except httpx.HTTPError as exc:
            print(f"follow: cannot reach the Prefect server at {client.api_url} ({type(exc).__name__}); is it "
                  "running (make demo starts it), and PREFECT_API_URL set?", file=sys.stderr)
            return 2
        try:
            return follow(client, run.id, poll=args.poll, give_up=args.give_up)
        except KeyboardInterrupt:
            print(f"\nstopped following; the run goes on: {ui_link(run.id)}\n"
                  f"cancel it with: prefect flow-run cancel {run.id}", file=sys.stderr)
            return 130


if __name__ == "__main__":
    sys.exit(main())
