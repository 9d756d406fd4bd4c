"""beanflow's errors: one base class, each subclass keeping the built-in base callers catch.

The command line turns any ``BeanflowError`` into one ``Error:`` line (``cli.main``).
"""

from __future__ import annotations

from datetime import timedelta

import psycopg2


class BeanflowError(Exception):
    """Base of every error beanflow raises on purpose; its message is meant for a person."""


class ConfigError(BeanflowError, ValueError):
    """A setting is invalid; the message names the setting and where it came from."""


class ProcessorNotFound(BeanflowError, LookupError):
    """No registered (or declared) processor answers to a name, or not on that channel."""


class KwargsError(BeanflowError, ValueError):
    """A task's kwargs cannot be stored, or do not fit its function; the message says why."""


class TablesMissing(BeanflowError):
    """beanflow's tables do not exist in the database; the message says how to create them."""

    def __init__(self, create_tables: str = "beanflow create-tables") -> None:
        super().__init__(
            "beanflow's tables do not exist in this database; create them with "
            f"`{create_tables}` (or `beanflow run FILE --create-tables`)"
        )


class TaskFailed(BeanflowError):
    """A task failed as its processor said with ``beanflow.fail(task, message)``."""


class NotCompleted(BeanflowError):
    """A processor with ``auto_complete`` off returned without completing or failing its task."""


class Cancel(BeanflowError):
    """Raise inside a processor to end its task CANCELLED, not retried (the message says why;
    its changes are rolled back like a failure's)."""


class Retry(BeanflowError):
    """Raise inside a processor to run its task again ``after`` seconds (or a timedelta) from
    now, without counting this attempt: a snooze, e.g. while a resource is busy."""

    def __init__(self, after: float | timedelta = 0.0, reason: str = "") -> None:
        self.after = after if isinstance(after, timedelta) else timedelta(seconds=after)
        super().__init__(reason or f"snoozed for {self.after.total_seconds():g}s")


class SpecError(BeanflowError, ValueError):
    """A beanflow.yaml has problems; ``problems`` lists every one, each located."""

    def __init__(self, problems: list) -> None:
        self.problems = problems
        super().__init__("\n".join(map(str, problems)))


def first_line(error: BaseException) -> str:
    """The first non-empty line of an error's message, or its type's name (never raises)."""
    try:
        text = str(error)
    except Exception:  # noqa: BLE001 - a user's exception whose __str__ itself fails
        text = ""
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return type(error).__name__


# classes of SQLSTATE by which the server refuses a statement for a reason of its own, not a
# row's: a lost connection (08), a read-only transaction (25), a prepared statement the
# session lost (26: a pooler in transaction mode), a deadlock or serialization failure (40),
# no resources (53), a lock timeout (55), a cancel or statement timeout (57), a system error
# (58)
_NOT_A_ROWS_FAULT = frozenset({"08", "25", "26", "40", "53", "55", "57", "58"})


def refused_for_now(error: BaseException) -> bool:
    """Whether the server refused a statement for a reason of its own, which may pass, or
    could not be reached: no task or row is failed for it, and what was refused is tried
    again."""
    cause = getattr(error, "orig", None) or error
    code = getattr(cause, "pgcode", None)
    if code is None:  # the driver's own: no connection, or it broke
        return isinstance(cause, (psycopg2.OperationalError, psycopg2.InterfaceError))
    return code[:2] in _NOT_A_ROWS_FAULT
