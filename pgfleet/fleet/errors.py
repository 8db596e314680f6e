"""Errors the fleet reports to its callers (API, CLI, proxy map them to their own forms)."""

from __future__ import annotations


class FleetError(Exception):
    """Base: `code` is a stable machine-readable reason; `http` its HTTP status."""

    code = "error"
    http = 500


class InvalidRequest(FleetError):
    code = "invalid"
    http = 400


class NotFound(FleetError):
    code = "not_found"
    http = 404


class AlreadyExists(FleetError):
    code = "exists"
    http = 409


class Unavailable(FleetError):
    """The database exists but cannot serve now (being deleted, stopped, failed to start)."""

    code = "unavailable"
    http = 503


class QuotaExceeded(FleetError):
    code = "quota"
    http = 429
