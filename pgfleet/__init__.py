"""pgfleet: self-hosted serverless Postgres."""

__version__ = "0.1.0"
