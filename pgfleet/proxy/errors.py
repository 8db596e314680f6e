"""The one error a proxy listener ends a client connection with."""

from __future__ import annotations


class ClientError(Exception):
    """Ends a client connection with an ErrorResponse carrying this SQLSTATE (an empty
    SQLSTATE: the client has already been told, by the database itself)."""

    def __init__(self, sqlstate: str, message: str, detail: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.detail = detail
