"""A minimal host-side Postgres client for administration over a trusted connection
(unix socket or the host-only VM network): startup without a password, simple queries.
It is what drivers use to personalise a database; applications use real drivers.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from . import messages as m
from .protocol import BackendMsg, FrontendMsg


class QueryError(Exception):
    def __init__(self, fields: dict[str, str]) -> None:
        self.sqlstate = fields.get("C", "")
        self.fields = fields
        super().__init__(f"{fields.get('M', 'error')} (SQLSTATE {self.sqlstate})")


@dataclass
class Result:
    columns: list[str]
    rows: list[tuple[str | None, ...]]
    command: str


class AdminConnection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.parameters: dict[str, str] = {}
        self.process_id = 0
        self.secret_key = 0

    @classmethod
    async def open(
        cls, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, user: str,
        database: str = "postgres", application_name: str = "pgfleet",
    ) -> "AdminConnection":
        conn = cls(reader, writer)
        writer.write(m.startup_message(
            {"user": user, "database": database, "application_name": application_name}
        ))
        await conn._until_ready(expect_auth=True)
        return conn

    async def _until_ready(self, expect_auth: bool = False) -> None:
        while True:
            kind, body = await m.read_message(self.reader)
            if kind == BackendMsg.AUTHENTICATION:
                code = int.from_bytes(body[:4], "big")
                if code != m.AUTH_OK:
                    raise QueryError({"C": "28000", "M": f"server asked for authentication {code}"})
            elif kind == BackendMsg.PARAMETER_STATUS:
                name, value, _ = body.split(b"\0", 2)
                self.parameters[name.decode()] = value.decode()
            elif kind == BackendMsg.BACKEND_KEY_DATA:
                self.process_id = int.from_bytes(body[:4], "big", signed=True)
                self.secret_key = int.from_bytes(body[4:8], "big", signed=True)
            elif kind == BackendMsg.ERROR_RESPONSE:
                raise QueryError(m.parse_error_fields(body))
            elif kind == BackendMsg.READY_FOR_QUERY:
                return

    async def query(self, sql: str) -> list[Result]:
        """Run a simple-protocol query string; returns one Result per statement."""
        self.writer.write(m.message(FrontendMsg.QUERY, m.cstr(sql)))
        results: list[Result] = []
        columns: list[str] = []
        rows: list[tuple[str | None, ...]] = []
        error: QueryError | None = None
        while True:
            kind, body = await m.read_message(self.reader)
            if kind == BackendMsg.ROW_DESCRIPTION:
                columns, rows = _row_description(body), []
            elif kind == BackendMsg.DATA_ROW:
                rows.append(_data_row(body))
            elif kind == BackendMsg.COMMAND_COMPLETE:
                results.append(Result(columns, rows, body.rstrip(b"\0").decode()))
                columns, rows = [], []
            elif kind == BackendMsg.ERROR_RESPONSE:
                error = QueryError(m.parse_error_fields(body))
            elif kind == BackendMsg.READY_FOR_QUERY:
                if error is not None:
                    raise error
                return results

    async def scalar(self, sql: str) -> str | None:
        results = await self.query(sql)
        return results[-1].rows[0][0]

    async def close(self) -> None:
        try:
            self.writer.write(m.message(FrontendMsg.TERMINATE))
            self.writer.close()
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass


def _row_description(body: bytes) -> list[str]:
    count = int.from_bytes(body[:2], "big")
    names, pos = [], 2
    for _ in range(count):
        end = body.index(b"\0", pos)
        names.append(body[pos:end].decode())
        pos = end + 1 + 18
    return names


def _data_row(body: bytes) -> tuple[str | None, ...]:
    return tuple(None if v is None else v.decode() for v in m.parse_data_row(body))


def quote_ident(name: str) -> str:
    """An SQL identifier, exactly as given (case kept, any character)."""
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    """An SQL string literal that means the same whatever standard_conforming_strings is."""
    return "E'" + value.replace("\\", "\\\\").replace("'", "''") + "'"
