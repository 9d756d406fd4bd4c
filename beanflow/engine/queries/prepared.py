"""Statements PREPAREd once per worker connection."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Any

from sqlalchemy import bindparam, text
from sqlalchemy.dialects.postgresql.psycopg2 import PGDialect_psycopg2
from sqlalchemy.engine import Connection

# renders $1, $2 … as PREPARE needs, and lists the parameters in that order
_POSITIONAL = PGDialect_psycopg2(paramstyle="numeric_dollar")


class Prepared:
    """A statement PREPAREd on a connection: parsed and planned once, then EXECUTEd.

    psycopg2 sends every statement as text, to be parsed and planned again each time; for the
    claim, planning costs more than running it (0.55 ms against 0.3 ms here). A worker prepares
    its hot statements on its own connection, once.
    """

    def __init__(self, name: str, statement: Any, *columns: Any) -> None:
        self.name, self.statement = name, statement
        compiled = statement.compile(dialect=_POSITIONAL)
        self.definition = f"PREPARE {name} AS {compiled}"
        by_name = {rendered: bind for bind, rendered in compiled.bind_names.items()}
        names = list(compiled.positiontup or [])
        self.parameters = names
        # the caller's parameters keep their names; the statement's constants their values
        self.execute = (
            text(f"EXECUTE {name}({', '.join(':' + n for n in names)})")
            .bindparams(
                *[
                    bindparam(n, type_=by_name[n].type)
                    if by_name[n].required
                    else bindparam(n, value=by_name[n].value, type_=by_name[n].type)
                    for n in names
                ]
            )
            .columns(*columns)
        )

    def prepare(self, connection: Connection) -> None:
        connection.exec_driver_sql(self.definition)

    def execute_text(self, uuid_arrays: dict[str, Iterable[Any]]) -> str:
        """Its EXECUTE as one string, for a statement whose parameters are all arrays of UUIDs
        (to travel in front of another statement, ``db.send_with_next_statement``)."""
        arrays = [
            "'{" + ",".join(str(uuid.UUID(str(v))) for v in uuid_arrays[name]) + "}'"
            for name in self.parameters
        ]
        return f"EXECUTE {self.name}({', '.join(arrays)})"
