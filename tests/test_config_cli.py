"""Configuration from BEANFLOW_* variables, and the CLI's one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import beanflow as bq

from .helpers import beanflow, environment


def test_fields_come_from_arguments_then_environment_then_defaults():
    env = {
        "BEANFLOW_BATCH_SIZE": "10",
        "BEANFLOW_PROCESSOR_PACKAGES": '["a.b", "c"]',
        "BEANFLOW_EVENTS": "false",
        "BEANFLOW_POLL_TIMEOUT": "2.5",
    }
    config = bq.Config(env=env, BATCH_SIZE=3)
    assert config.BATCH_SIZE == 3
    assert config.PROCESSOR_PACKAGES == ["a.b", "c"]
    assert config.EVENTS is False
    assert config.POLL_TIMEOUT == 2.5
    assert config.DATABASE_URL is None
    assert config.TASK_MODEL == "beanflow.models.Task"


def test_comma_separated_packages():
    assert bq.Config(env={"BEANFLOW_PROCESSOR_PACKAGES": "a, b"}).PROCESSOR_PACKAGES == ["a", "b"]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"BEANFLOW_BATCH_SIZE": "many"}, "BEANFLOW_BATCH_SIZE: expected an integer, got 'many'"),
        ({"BEANFLOW_BATCH_SIZE": "0"}, "BEANFLOW_BATCH_SIZE: must be > 0, got 0"),
        ({"BEANFLOW_POLL_TIMEOUT": "-1"}, "BEANFLOW_POLL_TIMEOUT: must be > 0, got -1"),
        ({"BEANFLOW_EVENTS": "maybe"}, "BEANFLOW_EVENTS: expected true or false"),
        ({"BEANFLOW_PROCESSOR_PACKAGES": "[1, 2]"}, "expected a list of strings"),
        ({"BEANFLOW_PROCESSOR_PACKAGES": "[oops"}, "BEANFLOW_PROCESSOR_PACKAGES: not valid JSON"),
    ],
)
def test_invalid_environment_names_the_variable(env, message):
    with pytest.raises(bq.ConfigError, match=message.replace("[", r"\[")):
        bq.Config(env=env)


def test_invalid_argument_names_the_field():
    with pytest.raises(bq.ConfigError, match="BATCH_SIZE: expected an integer"):
        bq.Config(env={}, BATCH_SIZE="ten")
    with pytest.raises(bq.ConfigError, match="unknown setting"):
        bq.Config(env={}, BATCHSIZE=1)


def test_postgresql_url_uses_psycopg2():
    url = bq.db.database_url(bq.Config(env={}, DATABASE_URL="postgresql://u:p@h:5/d"))
    assert url == "postgresql+psycopg2://u:p@h:5/d"


def cli(db_url: str, *arguments: str) -> subprocess.CompletedProcess:
    return beanflow("-a", "tests.workloads.app:app", *arguments, BEANFLOW_DATABASE_URL=db_url)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["submit", "work", "nope"], "no processor named 'nope'; registered: "),
        (
            ["submit", "elsewhere", "echo", "-k", '{"value": 1}'],
            "processor 'echo' belongs to channel 'work', not 'elsewhere'",
        ),
        (["submit", "work", "echo", "-k", "{value: 1}"], "--kwargs is not valid JSON: "),
        (["submit", "work", "echo", "-k", "[1]"], "--kwargs must be a JSON object, got list"),
        (
            ["submit", "work", "echo", "-k", '{"wrong": 1}'],
            "kwargs do not fit echo(value): missing a required argument: 'value'",
        ),
        (["submit", "work", "a", "b", "c"], "expected [MODULE] NAME after the channel"),
        (
            ["submit", "work", "echo", "-k", '{"value": [1, NaN]}'],
            "kwargs cannot be stored as JSON: kwargs['value'][1]: nan is not a JSON number",
        ),
        (
            ["submit", "work", "echo", "-k", '{"value": "a\\u0000b"}'],
            "kwargs cannot be stored as JSON: kwargs['value']: the NUL character",
        ),
        (
            ["submit", "work", "echo", "-k", '{"value": 1}', "--in", "1000000000d"],
            '--in: "1000000000d" is longer than 100 years',
        ),
        (
            ["submit", "work", "echo", "-k", '{"value": 1}', "--at", "0001-01-01T00:00+05:00"],
            "--at '0001-01-01T00:00+05:00' is out of range (years 1 to 9999, in UTC)",
        ),
        (
            ["submit", "work", "echo", "-k", '{"value": ' + "[" * 5000 + "]" * 5000 + "}"],
            "--kwargs is not valid JSON: nested too deeply",
        ),
        (["tasks", "--since", "999999999d"], '--since "999999999d" is longer than 100 years'),
        (["purge", "--older-than", "36600d"], '--older-than: "36600d" is longer than 100 years'),
    ],
)
def test_command_errors_are_one_line_with_status_2(db_url, arguments, message):
    result = cli(db_url, *arguments)
    assert result.returncode == 2
    assert result.stderr.startswith(f"Error: {message}")
    assert len(result.stderr.strip().splitlines()) == 1


def test_submit_prints_the_task_id(db_url, session):
    result = cli(db_url, "submit", "work", "echo", "--kwargs", '{"value": [1, 2]}')
    assert result.returncode == 0, result.stderr
    task = session.get(bq.Task, result.stdout.strip())
    assert (task.channel, task.name, task.kwargs) == ("work", "echo", {"value": [1, 2]})


def test_unreachable_database_is_a_message_without_the_password():
    result = cli("postgresql://someone:s3cret@127.0.0.1:1/nowhere", "create-tables")
    assert result.returncode == 1
    assert result.stderr.startswith("Error: cannot use the database: ")
    assert "s3cret" not in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "arguments",
    [["process", "work", "--burst"], ["submit", "work", "echo", "-k", '{"value": 1}']],
)
def test_missing_tables_are_one_line_naming_the_command_that_creates_them(empty_db_url, arguments):
    result = cli(empty_db_url, *arguments)
    assert result.returncode == 1
    assert result.stderr == (
        "Error: beanflow's tables do not exist in this database; create them with "
        "`beanflow -a tests.workloads.app:app create-tables` "
        "(or `beanflow run FILE --create-tables`)\n"
    )


def test_submit_with_config_and_missing_tables_names_the_file(empty_db_url, tmp_path):
    path = tmp_path / "beanflow.yaml"
    path.write_text(
        "version: 1\ndatabase: ${TEST_DB_URL}\n"
        "processors:\n  echo: {function: 'tests.workloads.app:echo', channel: work}\n"
    )
    result = beanflow(
        "submit",
        "work",
        "echo",
        "-k",
        '{"value": 1}',
        "--config",
        str(path),
        TEST_DB_URL=empty_db_url,
    )
    assert result.returncode == 1
    assert f"`beanflow create-tables --config {path}`" in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_a_package_that_cannot_be_imported_is_one_line(db_url):
    result = beanflow(
        "process", "work", BEANFLOW_DATABASE_URL=db_url, BEANFLOW_PROCESSOR_PACKAGES="nowhere"
    )
    assert result.returncode == 2
    assert result.stderr == (
        "Error: PROCESSOR_PACKAGES: cannot import ['nowhere']: "
        "ModuleNotFoundError: No module named 'nowhere'\n"
    )


def test_every_setting_has_one_syntax_whichever_way_it_arrives():
    assert bq.Config(env={"BEANFLOW_POLL_TIMEOUT": "5m"}).POLL_TIMEOUT == 300
    assert bq.Config(env={}, POLL_TIMEOUT="250ms").POLL_TIMEOUT == 0.25
    for bad in ({"BEANFLOW_POLL_TIMEOUT": "0"}, {"BEANFLOW_BATCH_WINDOW": "NaN"}):
        with pytest.raises(bq.ConfigError, match=next(iter(bad))):
            bq.Config(env=bad)
    with pytest.raises(bq.ConfigError, match="must be longer than WORKER_HEARTBEAT_PERIOD"):
        bq.Config(env={"BEANFLOW_WORKER_HEARTBEAT_TIMEOUT": "5s"})
    with pytest.raises(bq.ConfigError, match="DATABASE_URL: beanflow needs PostgreSQL"):
        bq.Config(env={}, DATABASE_URL="mysql://root@localhost/shop")
    with pytest.raises(bq.ConfigError, match="'notaurl' is not a database URL"):
        bq.Config(env={}, DATABASE_URL="notaurl")


def test_the_beanflow_command_imports_from_the_current_folder(db_url, tmp_path):
    """As the README's worker example does: `-a` names a module of the current folder."""
    (tmp_path / "mytasks.py").write_text(
        "import beanflow as bq\n"
        "app = bq.BeanQueue()\n"
        "@app.processor(channel='here')\n"
        "def hello() -> str:\n"
        "    return 'hi'\n"
    )
    command = str(Path(sys.executable).parent / "beanflow")
    result = subprocess.run(
        [command, "-a", "mytasks:app", "process", "here", "--burst"],
        cwd=tmp_path,
        env=environment(BEANFLOW_DATABASE_URL=db_url),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
