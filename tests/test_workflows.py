"""Workflows declared in beanflow.yaml (tests/workloads/flows.yaml), advanced by a worker in
this process on a real database; real worker processes in test_workflow_processes.py."""

from __future__ import annotations

from uuid import uuid4

import pytest
from sqlalchemy import Engine, event, func, select, text

import beanflow as bq
from beanflow import spec
from beanflow.models import RunState, StepOutcome, TaskState, WorkflowRun, WorkflowStep
from beanflow.models.workflow import TALLY_SLOTS
from beanflow.workflows import WorkflowService
from tests.helpers import refuse
from tests.workloads.flows import FlowBase, FlowEffect

FLOWS = "tests/workloads/flows.yaml"


@pytest.fixture
def flows(db_url, monkeypatch):
    monkeypatch.setenv("TEST_DB_URL", db_url)
    deployment = spec.load(FLOWS)
    FlowBase.metadata.create_all(deployment.app.engine)
    yield deployment
    deployment.app.engine.dispose()


@pytest.fixture
def session(flows):
    with flows.app.session_factory() as session:
        yield session


def start(flows, session, name, **input):
    run = flows.workflows.start(session, name, input)
    session.commit()
    return run.id


def drain(flows) -> None:
    assert flows.app.process_tasks(["flows"], burst=True) == 0


def run_of(session, run_id) -> WorkflowRun:
    session.expire_all()
    return session.get(WorkflowRun, run_id)


def effects(session) -> list[str]:
    return sorted(session.scalars(select(FlowEffect.key)))


def test_a_diamond_runs_each_step_once_and_joins(flows, session):
    run_id = start(flows, session, "diamond")
    drain(flows)
    run = run_of(session, run_id)
    assert run.state == RunState.DONE
    assert effects(session) == sorted(f"{run_id}/{s}/0" for s in ("top", "left", "right", "bottom"))
    assert run.result == f"{run_id}/bottom/0"  # the last step's result


def test_onboarding_fans_out_over_a_result_and_joins_in_order(flows, session):
    run_id = start(flows, session, "onboard", user_id=4, emails=3)
    drain(flows)
    run = run_of(session, run_id)
    assert run.state == RunState.DONE, run.error
    assert run.result == {
        "user": 4,
        "avatar": "avatar of 4",
        "sent": [f"welcomed user4+{n}@example.com" for n in range(3)],
    }
    detail = flows.workflows.run(session, run_id)
    assert [v.index for v in detail.of("welcome")] == [0, 1, 2]
    assert detail.of("gift")[0].task.result == "gift for 4"  # 4 is a VIP: the condition held


def test_a_false_condition_skips_and_an_empty_fan_out_passes(flows, session):
    run_id = start(flows, session, "onboard", user_id=3, emails=0)
    drain(flows)
    run = run_of(session, run_id)
    assert run.state == RunState.DONE, run.error
    assert run.result["sent"] == []
    detail = flows.workflows.run(session, run_id)
    assert [(v.index, v.outcome) for v in detail.of("gift")] == [(-1, StepOutcome.SKIPPED)]
    assert [(v.index, v.outcome) for v in detail.of("welcome")] == [(-1, StepOutcome.EMPTY)]


@pytest.mark.parametrize("count", [1, 1000])
def test_a_fan_out_of_n_joins_once(flows, session, count):
    run_id = start(flows, session, "fan", user_id=1, emails=count)
    drain(flows)
    assert run_of(session, run_id).state == RunState.DONE
    keys = effects(session)
    assert len(keys) == count + 1 and f"{run_id}/join/0" in keys


def test_a_batch_of_fan_out_elements_that_ends_no_slot_costs_no_statement_of_its_own(
    flows, session
):
    """The count-down rides in the statement that completes the batch: only a batch that
    brings one of the step's tallies to zero (at most one per tally) locks and reads the run.
    Before, every batch of elements sent the count-down and the read."""
    flows.app.config.BATCH_SIZE = 10
    run_id = start(flows, session, "fan", user_id=1, emails=TALLY_SLOTS * 20)
    sent: list[str] = []

    def note(connection, cursor, statement, *args) -> None:
        sent.append(statement)

    event.listen(Engine, "before_cursor_execute", note)
    try:
        drain(flows)
    finally:
        event.remove(Engine, "before_cursor_execute", note)
    assert run_of(session, run_id).state == RunState.DONE
    batches = sum("EXECUTE beanflow_complete" in statement for statement in sent)
    reads = sum("EXECUTE beanflow_workflow_read" in statement for statement in sent)
    assert batches >= TALLY_SLOTS * 2  # 1,280 elements, ten at a time
    assert reads <= TALLY_SLOTS + 2  # a tally's last element, the fetch, the join


def test_a_failing_step_fails_the_run_cancels_the_rest_and_runs_on_failure_once(flows, session):
    run_id = start(flows, session, "failing", message="card declined")
    drain(flows)
    run = run_of(session, run_id)
    assert run.state == RunState.FAILED and run.failed_step == "breaks"
    assert run.error == "step breaks: RuntimeError: card declined"
    detail = flows.workflows.run(session, run_id)
    assert detail.of("never") == []  # never released
    states = [
        line.split("  ")[-1]
        for line in flows.workflows.draw(detail, flows.workflows.definitions["failing"])
    ]
    assert states[-2:] == ["not run", "done"]  # never, then on_failure
    (handler,) = detail.of("on_failure")
    assert handler.task.state == TaskState.DONE
    assert handler.task.result == (
        f"admin told: run {run_id} failed at breaks: step breaks: RuntimeError: card declined"
    )


def test_retrying_a_failed_run_resumes_without_rerunning_what_succeeded(flows, session, tmp_path):
    flag = tmp_path / "ready"
    run_id = start(flows, session, "resumable", flag=str(flag))
    drain(flows)
    assert run_of(session, run_id).state == RunState.FAILED
    flag.write_text("now")
    assert flows.workflows.retry(session, run_id, by="tester") == 1
    session.commit()
    drain(flows)
    run = run_of(session, run_id)
    assert run.state == RunState.DONE, run.error
    assert effects(session) == sorted(f"{run_id}/{s}/0" for s in ("first", "second", "third"))


def test_a_fan_out_resumed_after_failing_runs_only_its_failed_elements_and_joins_once(
    flows, session, tmp_path
):
    """The odd elements of a fan-out of 1,100 (17 or 18 to each of its 64 tallies) fail: the
    run fails; retried, only those run again, and the join is released once."""
    flag = tmp_path / "ready"
    run_id = start(flows, session, "resumable_fan", user_id=1, emails=1100, flag=str(flag))
    drain(flows)
    assert run_of(session, run_id).state == RunState.FAILED
    done_before = len(effects(session))  # even elements (the fetch writes no effect)
    assert 0 < done_before < 1100
    flag.write_text("now")
    retried = flows.workflows.retry(session, run_id, by="tester")
    session.commit()
    assert retried == 1100 - done_before  # the failed and the cancelled elements
    drain(flows)
    run = run_of(session, run_id)
    assert run.state == RunState.DONE, run.error
    keys = effects(session)
    assert len(keys) == 1101 and f"{run_id}/join/0" in keys  # the elements and the join
    tallies = session.execute(
        text("SELECT count(*), sum(open) FROM beanflow_workflow_tallies WHERE run_id = :r"),
        {"r": run_id},
    ).one()
    assert tuple(tallies) == (64, 0)


def test_cancelling_a_run_cancels_its_pending_steps(flows, session, tmp_path):
    run_id = start(flows, session, "cancellable", flag=str(tmp_path / "x"))
    assert flows.workflows.cancel(session, run_id, by="tester") is True
    session.commit()
    drain(flows)
    run = run_of(session, run_id)
    assert (run.state, run.error) == (RunState.CANCELLED, "cancelled by tester")
    tasks = session.scalars(select(bq.Task).where(bq.Task.workflow_run_id == run_id)).all()
    assert [t.state for t in tasks] == [TaskState.CANCELLED]
    assert flows.workflows.cancel(session, run_id) is False  # not running any more


def test_a_run_started_with_a_key_is_started_once(flows, session):
    first = flows.workflows.start(session, "linear", key="order-42")
    second = flows.workflows.start(session, "linear", key="order-42")
    session.commit()
    assert first.id == second.id
    assert session.scalar(select(func.count()).select_from(WorkflowRun)) == 1
    assert session.scalar(select(func.count()).select_from(WorkflowStep)) == 1


def test_nothing_exists_until_the_start_commits(flows, session):
    flows.workflows.start(session, "linear")
    session.rollback()
    assert session.scalar(select(func.count()).select_from(WorkflowRun)) == 0
    assert session.scalar(select(func.count()).select_from(bq.Task)) == 0


def test_bad_input_is_refused_at_start_naming_the_field(flows, session):
    with pytest.raises(
        bq.KwargsError, match="input of onboard: emails: 'many' is not of type 'integer'"
    ):
        flows.workflows.start(session, "onboard", {"user_id": 1, "emails": "many"})


def test_an_idle_worker_claims_a_released_step_in_the_commit_that_releases_it(flows, session):
    """No wake-up between the steps of a chain: the transaction that completes a step (its
    COMPLETE event) is the one that claims the next (its CLAIMED event)."""
    run_id = start(flows, session, "linear")
    drain(flows)
    assert run_of(session, run_id).state == RunState.DONE
    rows = session.execute(
        text(
            "SELECT s.step, e.type, e.xmin::text FROM beanflow_events e "
            "JOIN beanflow_workflow_steps s ON s.task_id = e.task_id "
            "WHERE s.run_id = :run AND e.type IN ('CLAIMED', 'COMPLETE')"
        ),
        {"run": run_id},
    ).all()
    writer = {(step, kind): xid for step, kind, xid in rows}
    assert writer["one", "COMPLETE"] == writer["two", "CLAIMED"]
    assert writer["two", "COMPLETE"] == writer["three", "CLAIMED"]
    assert writer["one", "CLAIMED"] != writer["one", "COMPLETE"]  # a claim commits first


def test_a_step_ended_outside_a_worker_is_taken_up_by_the_service(flows, session):
    """An operator cancels a step's task: the run fails by the service's round."""
    run_id = start(flows, session, "linear")
    (task,) = session.scalars(select(bq.Task).where(bq.Task.workflow_run_id == run_id))
    flows.workflows.ops.cancel(session, [task.id], by="tester")
    session.commit()
    WorkflowService(flows.workflows).run_once()
    run = run_of(session, run_id)
    assert run.state == RunState.FAILED and run.error == "step one: cancelled by tester"


def test_a_progression_the_server_refuses_for_now_does_not_fail_the_run(flows, session):
    """The service meets a refusal that passes (a lock timeout while a migration holds the
    steps' table, say; here a trigger raises it once): the run stays running, and the next
    round advances it. Before, the run failed for good ("its progression failed")."""
    run_id = start(flows, session, "linear")
    refuse(session, "beanflow_workflow_steps", "INSERT", "lock_not_available")
    session.execute(
        text(
            "UPDATE beanflow_tasks SET state = 'DONE', finished_at = now() "  # ended elsewhere
            "WHERE workflow_run_id = :run"
        ),
        {"run": run_id},
    )
    session.commit()
    service = WorkflowService(flows.workflows)
    service.run_once()
    run = run_of(session, run_id)
    assert (run.state, run.error) == (RunState.RUNNING, None)
    service.run_once()
    steps = session.scalars(select(WorkflowStep.step).where(WorkflowStep.run_id == run_id))
    assert sorted(steps) == ["one", "two"]  # released by the second round
    drain(flows)
    assert run_of(session, run_id).state == RunState.DONE


HEAD = """\
version: 1
database: postgresql://u@db.example/x
processors:
  fetch: {function: 'tests.workloads.flows:fetch', channel: flows}
  avatar: {function: 'tests.workloads.flows:avatar', channel: flows}
  welcome: {function: 'tests.workloads.flows:welcome', channel: flows}
  effect: {function: 'tests.workloads.flows:effect', channel: flows}
workflows:
  w:
"""


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            "    steps:\n      a: {processor: nothing}\n",
            "11:11: workflows.w.steps.a.processor: no processor named 'nothing'; declared: "
            "avatar, effect, fetch, welcome",
        ),
        (
            "    steps:\n      a: {processor: effect, after: [b]}\n",
            "11:30: workflows.w.steps.a.after: no step named 'b'; steps: a",
        ),
        (
            "    steps:\n      a: {processor: effect, after: [c]}\n"
            "      b: {processor: effect, after: [a]}\n      c: {processor: effect, after: [b]}\n",
            "11:30: workflows.w.steps.a.after: steps wait for each other in a cycle: a → c → b → a",
        ),
        (
            "    steps:\n      a: {processor: effect}\n      b: {processor: effect}\n"
            "      c: {processor: welcome, after: [a], for_each: b.emails}\n",
            "13:43: workflows.w.steps.c.for_each: b.emails: 'b' is not upstream of 'c' "
            "(list it in after)",
        ),
        (
            "    steps:\n      a: {processor: effect, kwargs: {item: $item}}\n",
            "11:39: workflows.w.steps.a.kwargs.item: item: 'item' is not the element of a "
            "fan-out (for_each)",
        ),
        (
            "    steps:\n      a: {processor: effect}\n      b: {processor: avatar, after: [a],"
            " if: {a.x: 1}, kwargs: {nope: 1}}\n",
            "12:56: workflows.w.steps.b.kwargs: kwargs do not fit avatar(results): got an "
            "unexpected keyword argument 'nope'",
        ),
        (
            "    input: {user_id: integer}\n    steps:\n      a: {processor: fetch}\n",
            "12:11: workflows.w.steps.a.processor: kwargs do not fit fetch(user_id, emails): "
            "missing a required argument: 'emails' (a first step gets the run's input as "
            "kwargs; declare kwargs: to choose)",
        ),
        (
            "    input: {user_id: int}\n    steps:\n      a: {processor: effect}\n",
            "10:13: workflows.w.input.user_id: 'int' is not one of string, integer, number, "
            "boolean, array, object",
        ),
        (
            "    steps:\n      a: {processor: effect}\n    result: b\n",
            "12:5: workflows.w.result: no step named 'b'; steps: a",
        ),
    ],
)
def test_every_mistake_in_a_workflow_is_located(tmp_path, body, expected):
    path = tmp_path / "beanflow.yaml"
    path.write_text(HEAD + body)
    deployment, problems = spec.check(path)
    assert [str(p).removeprefix(f"{path}:") for p in problems] == [expected]


def test_the_drawing_shows_each_step_its_upstreams_and_state(flows, session):
    run_id = start(flows, session, "onboard", user_id=2, emails=2)
    drain(flows)
    workflow = flows.workflows.definitions["onboard"]
    lines = flows.workflows.draw(flows.workflows.run(session, run_id), workflow)
    assert lines == [
        " 1. fetch                                      done",
        " 2.   avatar ← fetch                           done",
        " 2.   welcome ← fetch (for each fetch.emails)  ×2: 2 done",
        " 2.   gift ← fetch (if fetch.vip)              done",
        " 3.     report ← avatar, welcome, gift         done",
        "  ! on_failure ← any step failing for good     not needed",
    ]


def test_retention_keeps_the_steps_of_a_running_run_and_purges_ended_runs(flows, session):
    from datetime import timedelta

    from beanflow.ops import Retention

    ended = start(flows, session, "linear")
    drain(flows)
    running = start(flows, session, "resumable", flag="/nonexistent")
    assert flows.app.process_tasks(["flows"], burst=True) == 0  # first done, second failed
    flows.workflows.retry(session, running, by="tester")  # running again, its first step done
    session.commit()
    session.execute(bq.Task.__table__.update().values(finished_at=func.now() - timedelta(days=30)))
    session.execute(
        WorkflowRun.__table__.update()
        .where(WorkflowRun.finished_at.is_not(None))
        .values(finished_at=func.now() - timedelta(days=30))
    )
    session.commit()
    deleted = flows.workflows.ops.purge_all(Retention(done=timedelta(days=7)))
    assert deleted["runs done"] == 1 and deleted["tasks done"] == 3
    assert [r.id for r in session.scalars(select(WorkflowRun))] == [running]
    kept = session.scalars(select(bq.Task.state).where(bq.Task.workflow_run_id == running))
    assert sorted(kept) == [TaskState.DONE, TaskState.PENDING]
    assert session.scalar(select(func.count()).select_from(WorkflowStep)) == 2
    assert ended not in session.scalars(select(WorkflowStep.run_id)).all()


def test_the_dashboard_shows_runs_and_their_graphs_and_steers_them(flows, session, tmp_path):
    import re

    from starlette.testclient import TestClient

    from beanflow.dashboard.web import create_app

    client = TestClient(create_app(flows.workflows.ops, workflows=flows.workflows))
    done = start(flows, session, "onboard", user_id=2, emails=2)
    failed = start(flows, session, "resumable", flag=str(tmp_path / "ready"))
    drain(flows)
    listing = client.get("/runs").text
    assert f'href="/runs/{done}"' in listing and f'href="/runs/{failed}"' in listing
    assert client.get("/runs", params={"state": "FAILED"}).text.count('href="/runs/') == 1
    assert client.get("/runs", params={"state": "NOPE"}).status_code == 400
    assert client.get("/runs", params={"workflow": "a\x00b"}).status_code == 400
    page = client.get(f"/runs/{done}").text
    for name in ("fetch", "avatar", "welcome", "gift", "report"):
        assert f'class="step-name">{name}</text>' in page
    assert "×2: 2 done" in page and page.count('class="edge"') == 6
    page = client.get(f"/runs/{failed}").text
    assert 'id="retry-run"' in page and "step second: RuntimeError: not yet" in page
    (tmp_path / "ready").write_text("now")
    token = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
    answer = client.post(f"/runs/{failed}/retry", data={"csrf": token})
    assert "run resumed: 1 step task(s) retried" in answer.text
    drain(flows)
    assert run_of(session, failed).state == RunState.DONE
    assert client.get(f"/runs/{uuid4()}").status_code == 404


def test_workflows_need_a_task_model_that_can_hold_steps(tmp_path, monkeypatch):
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).parent / "reference_pkgs"))
    monkeypatch.setenv("BEANFLOW_TASK_MODEL", "my_pkgs.custom.Task")
    path = tmp_path / "beanflow.yaml"
    path.write_text(HEAD + "    steps:\n      a: {processor: effect}\n")
    _, problems = spec.check(path)
    assert [str(p).removeprefix(f"{path}:") for p in problems] == [
        "8:1: workflows: the task model Task cannot hold workflow steps: add "
        "beanflow.TaskModelRefWorkflowMixin to it"
    ]
