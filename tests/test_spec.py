"""beanflow.yaml: loading, schema and semantic validation, interpolation, compilation."""

from __future__ import annotations

import textwrap
from datetime import timedelta

import pytest

import beanflow as bq
from beanflow import spec
from beanflow.config import parse_duration

from .helpers import ROOT, beanflow

VALID = """\
version: 1
database: ${TEST_DB_URL:-}
retry_policies:
  quick: {kind: delay, delay: 250ms}
  backoff:
    kind: exponential
    base: 3
    max_delay: 1m
    jitter: 0.5
    exceptions: [builtins.ConnectionError]
  capped: {kind: limit, maximum_attempt: 4, retry_policy: backoff}
processors:
  echo:
    function: tests.workloads.app:echo
    channel: work
    retry_policy: capped
    timeout: 2s
  effect:
    function: tests.workloads.app:write_effect
    channel: work
    retry_policy: {kind: delay, delay: 1s}
    auto_complete: true
channels:
  work:
    workers: ${WORKERS:-2}
    batch_size: 5
    poll_timeout: 30s
schedules:
  every_second:
    processor: echo
    cron: "* * * * * *"
    timezone: Europe/Paris
    kwargs: {value: 1}
    catch_up: 2
worker:
  heartbeat_period: 5s
  heartbeat_timeout: 1m
  shutdown_grace_period: 10s
  batch_window: 500ms
  max_worker_crashes: 2
  events: false
"""


CJK = "通道" * 13  # 26 characters, 78 bytes: under the schema's 63 characters, over 63 bytes


def write(tmp_path, text: str, name: str = "beanflow.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def problems_of(tmp_path, text: str) -> list[str]:
    """The problems of a file, without the file name: ``LINE:COL: key.path: message``."""
    path = write(tmp_path, text)
    deployment, problems = spec.check(path)
    assert (deployment is None) == bool(problems)
    return [str(p).removeprefix(f"{path}:") for p in problems]


def test_a_bad_variable_is_not_charged_to_a_key_of_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("BEANFLOW_BATCH_SIZE", "[1")
    text = "worker:\n  heartbeat_period: 10s\n  heartbeat_timeout: 1m\n"
    assert problems_of(tmp_path, text) == ["1:1: BEANFLOW_BATCH_SIZE: not valid JSON: '[1'"]


def test_valid_file_compiles_to_the_engines_objects(tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_DB_URL", "postgresql://u:secret@db.example:5432/shop")
    deployment, problems = spec.check(write(tmp_path, VALID))
    assert problems == []
    app = deployment.app
    assert app.config.DATABASE_URL == "postgresql://u:secret@db.example:5432/shop"
    assert (app.config.WORKER_HEARTBEAT_PERIOD, app.config.WORKER_HEARTBEAT_TIMEOUT) == (5, 60)
    assert (app.config.SHUTDOWN_GRACE_PERIOD, app.config.BATCH_WINDOW) == (10, 0.5)
    assert (app.config.MAX_WORKER_CRASHES, app.config.EVENTS) == (2, False)

    echo = deployment.processors["echo"]
    assert (echo.channel, echo.module, echo.name, echo.timeout) == (
        "work",
        "tests.workloads.app",
        "echo",
        2.0,
    )
    assert isinstance(echo.retry_policy, bq.LimitAttempt)
    assert echo.retry_policy.maximum_attempt == 4
    backoff = echo.retry_policy.retry_policy
    assert isinstance(backoff, bq.ExponentialBackoffRetry)
    assert (backoff.base, backoff.max_delay, backoff.jitter) == (3, timedelta(minutes=1), 0.5)
    assert echo.retry_exceptions == (ConnectionError,)
    assert app.registry.get("work", "tests.workloads.app", "echo") is echo
    assert deployment.processors["effect"].retry_policy.delay == timedelta(seconds=1)

    [plan] = deployment.channels
    assert (plan.channel, plan.workers, plan.batch_size, plan.poll_timeout) == ("work", 2, 5, 30.0)
    [schedule] = deployment.schedules
    assert (schedule.name, schedule.processor, schedule.cron, schedule.timezone) == (
        "every_second",
        echo,
        "* * * * * *",
        "Europe/Paris",
    )
    assert (schedule.kwargs, schedule.catch_up) == ({"value": 1}, 2)


def test_interpolation_types_plain_scalars_and_keeps_quoted_ones(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKERS", "7")
    deployment, _ = spec.check(write(tmp_path, VALID))
    assert deployment.channels[0].workers == 7
    document, problems = spec.load_document(write(tmp_path, 'a: "${WORKERS}"\nb: x-${WORKERS}\n'))
    assert problems == [] and document.data == {"a": "7", "b": "x-7"}


def test_validate_prints_a_summary_without_the_password(tmp_path):
    path = write(tmp_path, VALID)
    result = beanflow("validate", str(path), TEST_DB_URL="postgresql://u:secret@db.example/shop")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(
        f"{path} is valid. It declares 2 processor(s) (echo, "
        "effect) on 1 channel(s): work (2 workers, batch 5)"
    )
    assert "secret" not in result.stdout and "***" in result.stdout


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("procesors: {}\n", ["1:1: procesors: unknown key (did you mean 'processors'?)"]),
        ("version: 2\n", ["1:1: version: 2 must be 1"]),
        (
            "processors:\n  p: {function: tests.workloads.app:echo}\n",
            ["2:3: processors.p: 'channel' is required"],
        ),
        (
            "processors:\n  p:\n    function: tests.workloads.app.echo\n    channel: c\n",
            [
                '3:5: processors.p.function: "tests.workloads.app.echo" is not valid: expected '
                "package.module:attribute"
            ],
        ),
        (
            "processors:\n  p:\n    function: tests.workloads.app:nope\n    channel: c\n",
            ["3:5: processors.p.function: 'tests.workloads.app' has no attribute 'nope'"],
        ),
        (
            "processors:\n  p:\n    function: nowhere.at_all:f\n    channel: c\n",
            [
                "3:5: processors.p.function: cannot import 'nowhere.at_all': No module named "
                "'nowhere'"
            ],
        ),
        (
            "processors:\n  p:\n    function: beanflow.config:ENV_PREFIX\n    channel: c\n",
            ["3:5: processors.p.function: 'beanflow.config:ENV_PREFIX' is not callable"],
        ),
        (
            "processors:\n  p:\n    function: tests.workloads.app:awaits\n    channel: c\n"
            "  q:\n    function: tests.workloads.app:yields\n    channel: c\n",
            [
                "3:5: processors.p.function: awaits is an async function: a worker calls "
                "processors synchronously, so its body would never run; define it with def (and "
                "call asyncio.run() inside it)",
                "6:5: processors.q.function: yields is a generator function (it yields): a worker "
                "calls processors and stores what they return, so its body would never run; "
                "return a value instead",
            ],
        ),
        (
            "processors:\n  p:\n    function: tests.workloads.app:echo\n    channel: work\n"
            "    retry_policy: nope\n",
            ["5:5: processors.p.retry_policy: no retry policy named 'nope'; declared: none"],
        ),
        (
            "retry_policies:\n  a: {kind: limit, maximum_attempt: 2, retry_policy: b}\n"
            "  b: {kind: limit, maximum_attempt: 2, retry_policy: a}\n",
            ["3:3: retry_policies.b: retry policies refer to each other in a cycle: a → b → a"],
        ),
        (
            "retry_policies:\n  a:\n    kind: delay\n    delay: 1s\n"
            "    exceptions: [builtins.dict, x.y.Z]\n",
            [
                "5:18: retry_policies.a.exceptions[0]: 'builtins.dict' is not an exception class",
                "5:33: retry_policies.a.exceptions[1]: cannot import 'x.y': No module named 'x'",
            ],
        ),
        (
            "retry_policies:\n  a: {kind: delay, delay: 5 minutes}\n",
            [
                '2:20: retry_policies.a.delay: "5 minutes" is not a duration such as 250ms, 30s, '
                "5m, 1h or 1d (a bare number is seconds)"
            ],
        ),
        (
            "retry_policies:\n  a: {kind: delay, delay: 40000d}\n"
            "  b: {kind: exponential, max_delay: 36501d}\n",
            [
                '2:20: retry_policies.a.delay: "40000d" is longer than 100 years',
                '3:26: retry_policies.b.max_delay: "36501d" is longer than 100 years',
            ],
        ),
        (
            "retry_policies:\n  a: {kind: delay}\n",
            ["2:3: retry_policies.a: 'delay' is required"],
        ),
        (
            "retry_policies:\n  a: {kind: sometimes}\n",
            ['2:7: retry_policies.a.kind: "sometimes" is not one of delay, exponential, limit'],
        ),
        (
            "retry_policies:\n  a: {kind: exponential, jitter: 2, delay: 1s}\n",
            [
                "2:26: retry_policies.a.jitter: 2 is greater than the maximum of 1",
                "2:37: retry_policies.a.delay: unknown key (did you mean 'max_delay'?)",
            ],
        ),
        (
            "channels:\n  work: {workers: -1}\n",
            [
                "2:3: channels.work: no processor runs on channel 'work'; processors' channels: "
                "none",
                "2:10: channels.work.workers: -1 is less than the minimum of 0",
            ],
        ),
        (
            "processors:\n  p: {function: 'tests.workloads.app:echo', channel: work}\n"
            "schedules:\n  s:\n    processor: q\n    cron: '61 * * * *'\n"
            "    timezone: Mars/Olympus\n",
            [
                "5:5: schedules.s.processor: no processor named 'q'; declared: p",
                "6:5: schedules.s.cron: '61 * * * *' is not a valid cron expression",
                "7:5: schedules.s.timezone: unknown timezone 'Mars/Olympus'",
            ],
        ),
        (
            "processors:\n  p: {function: 'tests.workloads.app:echo', channel: work}\n"
            "schedules:\n  s:\n    processor: p\n    cron: '* * * * *'\n"
            "    kwargs: {wrong: 1}\n",
            [
                "7:5: schedules.s.kwargs: kwargs do not fit echo(value): missing a required "
                "argument: 'value'"
            ],
        ),
        (
            "processors:\n  p: {function: 'tests.workloads.app:echo', channel: work}\n"
            "  q: {function: 'tests.workloads.app:echo', channel: work}\n",
            [
                "3:3: processors.q: tests.workloads.app:echo on channel 'work' is already "
                "declared as 'p'"
            ],
        ),
        (
            "packages: [tests.workloads.app]\n"
            "processors:\n  echo: {function: 'tests.workloads.app:spin', channel: work}\n",
            [
                "3:3: processors.echo: the name 'echo' is also the processor "
                "tests.workloads.app:echo found in packages"
            ],
        ),
        (
            "packages: [nowhere_pkg]\n",
            [
                "1:12: packages[0]: cannot import 'nowhere_pkg': "
                "ModuleNotFoundError: No module named 'nowhere_pkg'"
            ],
        ),
        (
            "database: ${SURELY_UNSET_VARIABLE}\n",
            [
                "1:11: database: environment variable SURELY_UNSET_VARIABLE is not set (write "
                "${SURELY_UNSET_VARIABLE:-default} to give a default)"
            ],
        ),
        (
            "worker: {heartbeat_period: soon}\n",
            [
                '1:10: worker.heartbeat_period: "soon" is not a duration such as 250ms, 30s, '
                "5m, 1h or 1d (a bare number is seconds)"
            ],
        ),
        (
            "worker:\n  heartbeat_period: 1s\n  heartbeat_timeout: 0\n",
            ["3:3: worker.heartbeat_timeout: must be > 0, got 0"],
        ),
        (
            "worker:\n  heartbeat_period: 10s\n  heartbeat_timeout: 5s\n",
            [
                "3:3: worker.heartbeat_timeout: WORKER_HEARTBEAT_TIMEOUT (5s) must be longer "
                "than WORKER_HEARTBEAT_PERIOD (10s), or live workers would find each other dead"
            ],
        ),
        (
            "processors:\n  p: {function: 'tests.workloads.app:echo', channel: work}\n"
            "channels:\n  work: {poll_timeout: 0}\n",
            ["4:10: channels.work.poll_timeout: must be > 0, got 0"],
        ),
        (
            "processors:\n  p: {function: 'tests.workloads.app:Effect', channel: work}\n"
            "  e: {function: 'builtins:ValueError', channel: work}\n",
            [
                "2:7: processors.p.function: 'tests.workloads.app:Effect' is a class; a "
                "processor is a function",
                "3:7: processors.e.function: 'builtins:ValueError' is a class; a processor is "
                "a function",
            ],
        ),
        (
            "database: notaurl\n",
            [
                "1:1: database: 'notaurl' is not a database URL such as "
                "postgresql://user@host:5432/name"
            ],
        ),
        (
            "database: mysql://root:pw@localhost/shop\n",
            [
                "1:1: database: beanflow needs PostgreSQL; 'mysql' URLs are not supported "
                "(mysql://root:***@localhost/shop)"
            ],
        ),
        (
            "retry_policies:\n  a: {kind: exponential, jitter: .nan}\n",
            [
                "2:26: retry_policies.a.jitter: nan is not a number (NaN and infinity are not "
                "allowed)"
            ],
        ),
        (
            "processors:\n  p: {function: 'tests.workloads.app:echo', channel: work, timeout: 0}\n",
            ["2:60: processors.p.timeout: must be > 0, got 0"],
        ),
        (
            f"processors:\n  p: {{function: 'tests.workloads.app:echo', channel: {CJK}}}\n",
            [
                f"2:45: processors.p.channel: channel name {CJK[:20]!r}… is 78 bytes long; "
                "PostgreSQL allows at most 63 bytes (NOTIFY channels are identifiers)"
            ],
        ),
        (
            "processors:\n  'bad name!': {function: 'tests.workloads.app:echo', channel: w}\n",
            [
                (
                    '2:3: processors.bad name!: "bad name!" is not valid: expected a name that '
                    "starts with a letter or '_', then letters, digits, '_', '.' or '-'"
                )
            ],
        ),
        (
            "processors:\n  p: {function: 'tests.workloads.app:echo'}\nchannels:\n  mail: {}\n",
            [
                "2:3: processors.p: 'channel' is required",
                "4:3: channels.mail: no processor runs on channel 'mail'; processors' channels: "
                "none",
            ],
        ),
        (
            "a: " + "[" * 5000 + "]" * 5000 + "\n",
            ["1:1: nested more than 64 levels deep"],
        ),
        (
            "version: 1\nretry_policies: &x {a: *x}\n",
            ["2:17: retry_policies.a: an alias that contains itself"],
        ),
        (
            "a: 1\na: 2\nversion: 1\n",
            [
                "2:1: a: duplicate key (it is already set above)",
                "1:1: a: unknown key; expected one of: version, database,"
                " embedded_dir, packages, processors, retry_policies, "
                "channels, schedules, workflows, retention, metrics, dashboard, worker",
            ],
        ),
        ("processors: [1\n", ["2:1: invalid YAML: expected ',' or ']', but got '<stream end>'"]),
        ("", ["1:1: the file is empty"]),
        (
            "- a\n- b\n",
            ["1:1: the top level must be a mapping of keys (database, processors, channels, …)"],
        ),
    ],
)
def test_every_mistake_is_reported_with_its_place(tmp_path, text, expected):
    assert sorted(problems_of(tmp_path, text)) == sorted(expected)


def test_missing_file(tmp_path):
    _, problems = spec.check(tmp_path / "absent.yaml")
    assert [str(p) for p in problems] == [f"{tmp_path / 'absent.yaml'}:1:1: no such file"]


def test_validate_reports_every_problem_at_once_and_exits_1(tmp_path):
    path = write(
        tmp_path,
        """\
        version: 1
        procesors: {}
        retry_policies:
          quick: {kind: delay, delay: soon}
        processors:
          p: {function: 'tests.workloads.app:nope', channel: work, retry_policy: slow}
        channels:
          work: {workers: many}
        schedules:
          s: {processor: p, cron: 'every day', timezone: Nowhere/City}
        """,
    )
    result = beanflow("validate", str(path))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1] == f"{path}: {len(lines) - 1} problem(s)"
    assert all(line.startswith(f"{path}:") for line in lines)
    keys = [line.removeprefix(f"{path}:").split(": ")[1] for line in lines[:-1]]
    assert keys == [
        "procesors",
        "retry_policies.quick.delay",
        "processors.p.function",
        "processors.p.retry_policy",
        "channels.work.workers",
        "schedules.s.cron",
        "schedules.s.timezone",
    ]
    assert "Traceback" not in result.stderr


def test_load_makes_names_resolvable_by_enqueue(tmp_path, session):
    deployment = bq.load(write(tmp_path, VALID))
    task = bq.enqueue(session, "echo", value=3)
    assert (task.channel, task.name, task.kwargs) == ("work", "echo", {"value": 3})
    with pytest.raises(ValueError, match="kwargs do not fit echo"):
        bq.enqueue(session, "echo", nonsense=1)
    with pytest.raises(LookupError, match="no processor named 'nope'"):
        bq.enqueue(session, "nope")
    with pytest.raises(bq.ProcessorNotFound, match="belongs to channel 'work'"):
        deployment.resolve("mail", "echo")
    many = bq.enqueue_many(session, "echo", [{"value": 1}, {"value": 2}])
    assert many == 2
    assert deployment.enqueue(session, "echo", value=4).kwargs == {"value": 4}


def test_load_without_default_leaves_the_default_alone(tmp_path):
    first = bq.load(write(tmp_path, VALID))
    second = bq.load(write(tmp_path, VALID, "other.yaml"), default=False)
    assert second is not first
    assert bq.deployment.default() is first


def test_load_raises_with_every_problem(tmp_path):
    with pytest.raises(bq.SpecError) as raised:
        bq.load(write(tmp_path, "version: 3\nextra: 1\n"))
    assert len(raised.value.problems) == 2


def test_one_duration_syntax_everywhere():
    """The file, BEANFLOW_* variables and `submit --in` all read durations this way."""
    written = ("250ms", "30s", "5m", "1h", "1d", 2, 0.5, "30", "1.5 m")
    assert [parse_duration(v) for v in written] == [0.25, 30, 300, 3600, 86400, 2, 0.5, 30, 90]
    for wrong in ("soon", "", float("nan"), float("inf"), True, None, "5 minutes"):
        with pytest.raises(ValueError, match="is not a duration such as"):
            parse_duration(wrong)
    for too_long in ("36501d", 1e300, "999999999999d"):  # beyond any datetime, or nearly
        with pytest.raises(ValueError, match="is longer than 100 years"):
            parse_duration(too_long)


def test_shipped_examples_are_valid():
    for path in (
        ROOT / "beanflow.yaml.example",
        ROOT / "examples/orders/beanflow.yaml",
        ROOT / "examples/documents/beanflow.yaml",
        ROOT / "examples/quickstart/beanflow.yaml",
    ):
        _, problems = spec.check(path)
        assert problems == [], path
        assert path.read_text().startswith("# yaml-language-server: $schema=")


def test_schedule_ticks_fall_on_the_cron_boundaries():
    from datetime import datetime, timezone

    from beanflow.engine.schedules import Schedule

    every_second = Schedule("s", None, "* * * * * *")
    now = datetime(2026, 1, 1, 12, 0, 0, 500000, tzinfo=timezone.utc)
    assert [t.isoformat() for t in every_second.recent_ticks(now, 2)] == [
        "2026-01-01T11:59:59+00:00",
        "2026-01-01T12:00:00+00:00",
    ]
    assert every_second.next_tick(now).isoformat() == "2026-01-01T12:00:01+00:00"
    hourly_paris = Schedule("h", None, "0 * * * *", "Europe/Paris")
    on_the_hour = datetime(2026, 1, 1, 11, 0, 0, tzinfo=timezone.utc)
    assert hourly_paris.recent_ticks(on_the_hour, 1)[0] == on_the_hour
    assert hourly_paris.recent_ticks(on_the_hour, 0) == []


def test_merge_keys_work_and_a_key_set_beside_them_wins(tmp_path):
    deployment, problems = spec.check(
        write(
            tmp_path,
            """\
            version: 1
            processors:
              p: &base {function: 'tests.workloads.app:echo', channel: work, timeout: 5s}
              q: {<<: *base, channel: other}
            """,
        )
    )
    assert problems == []
    p, q = deployment.processors["p"], deployment.processors["q"]
    assert (p.channel, q.channel, q.timeout) == ("work", "other", 5.0)


def test_an_alias_bomb_is_refused_in_bounded_time(tmp_path):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{n}: &a{n} [{', '.join([f'*a{n - 1}'] * 10)}]" for n in range(1, 10)]
    text = "\n".join(lines) + "\n"
    assert len(text) < 1500
    [problem] = problems_of(tmp_path, text)
    assert problem.endswith(": the document expands to more than 100,000 values (aliases?)")


def test_a_module_that_exits_at_import_is_a_located_problem(tmp_path):
    (tmp_path / "exits_at_import.py").write_text("import sys\nsys.exit(0)\n")
    (tmp_path / "interrupts.py").write_text("raise KeyboardInterrupt\n")
    problems = problems_of(
        tmp_path,
        "processors:\n  p: {function: 'exits_at_import:f', channel: work}\n"
        "packages: [exits_at_import]\n",
    )
    assert problems == [
        "2:7: processors.p.function: importing 'exits_at_import' failed: SystemExit: 0",
        "3:12: packages[0]: cannot import 'exits_at_import': SystemExit: 0",
    ]


def test_variables_follow_the_shells_rules_in_values_keys_and_flow_mappings(tmp_path):
    env = {"EMPTY": "", "N": "3", "QUEUE": "mail"}
    path = write(
        tmp_path,
        """\
        a: ${EMPTY:-fallback}
        b: ${EMPTY-fallback}
        c: ${UNSET-fallback}
        d: {workers: ${N:-2}, other: ${UNSET:-4}}
        ${QUEUE}: x-${N}
        """,
    )
    document, problems = spec.load_document(path, env)
    assert problems == []
    assert document.data == {
        "a": "fallback",
        "b": None,  # set but empty: an empty plain value, YAML's null
        "c": "fallback",
        "d": {"workers": 3, "other": 4},
        "mail": "x-3",
    }
    assert document.where(("d", "other")) == (4, 23)  # columns are where they were written


def test_a_byte_that_is_not_utf8_is_located(tmp_path):
    path = tmp_path / "beanflow.yaml"
    path.write_bytes(b"version: 1\nprocessors:\n  p\xe9: {}\n")
    _, problems = spec.check(path)
    assert [str(p) for p in problems] == [f"{path}:3:4: byte 0xe9 is not UTF-8 text"]


def test_one_resolution_rule_for_every_spelling(tmp_path, session):
    from .workloads.app import echo

    deployment = bq.load(write(tmp_path, VALID))
    plain = deployment.processors["effect"].func  # declared in the file, not decorated
    by_function = bq.enqueue(session, plain, key="k")
    assert (by_function.name, by_function.id is not None) == ("write_effect", True)
    assert bq.enqueue_many(session, plain, [{"key": "a"}]) == 1
    assert bq.enqueue(session, echo, value=1).channel == "work"  # a decorated one
    with pytest.raises(bq.ProcessorNotFound, match="len is not a processor: decorate it"):
        bq.enqueue(session, len)


def test_the_embedded_server_lives_beside_the_file(tmp_path, monkeypatch):
    monkeypatch.delenv("BEANFLOW_EMBEDDED_DIR", raising=False)
    (tmp_path / "sub").mkdir()
    deployment, _ = spec.check(write(tmp_path / "sub", "version: 1\n"))
    assert str((tmp_path / "sub" / ".beanflow").resolve()) == deployment.app.config.EMBEDDED_DIR
    deployment, _ = spec.check(write(tmp_path / "sub", "version: 1\nembedded_dir: state\n"))
    assert str((tmp_path / "sub" / "state").resolve()) == deployment.app.config.EMBEDDED_DIR
    monkeypatch.setenv("BEANFLOW_EMBEDDED_DIR", "/somewhere/else")
    deployment, _ = spec.check(write(tmp_path / "sub", "version: 1\n"))
    assert deployment.app.config.EMBEDDED_DIR == "/somewhere/else"
