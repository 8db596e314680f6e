"""Host limits an operator overrides: a dataclass's defaults, then `<home>/<file>.json`, then
the environment (`<PREFIX><FIELD>`), later wins. Used for the fleet's quotas
(PGFLEET_QUOTA_*, quotas.json) and the proxy's limits before authentication and on logins
(PGFLEET_LIMIT_*, limits.json). A value that is not a number of the field's kind, or is
negative, is refused with the file or variable it came from: the daemon does not start on a
limit it cannot read."""

from __future__ import annotations

import json
import os
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, Mapping, TypeVar

T = TypeVar("T")


class OverrideError(ValueError):
    pass


def load(defaults: T, home: Path | str | None, file_name: str, env_prefix: str, noun: str,
         environ: Mapping[str, str] | None = None) -> T:
    env: Mapping[str, str] = os.environ if environ is None else environ
    values: dict[str, Any] = {}  # as written (JSON or the environment): checked below
    if home is not None:
        path = Path(home) / file_name
        if path.exists():
            data = json.loads(path.read_text())
            if not isinstance(data, dict):
                raise OverrideError(f"{path}: expected a JSON object")
            values.update(data)
    for f in fields(defaults):  # type: ignore[arg-type]
        raw = env.get(env_prefix + f.name.upper())
        if raw is not None:
            values[f.name] = raw
    changes: dict[str, Any] = {}
    for f in fields(defaults):  # type: ignore[arg-type]
        if f.name not in values:
            continue
        kind = float if str(f.type) == "float" else int
        try:
            value = kind(values[f.name])
        except (TypeError, ValueError):
            article = "a number" if kind is float else "an integer"
            raise OverrideError(f"{noun} {f.name} must be {article}, not {values[f.name]!r}") from None
        if value < 0:
            raise OverrideError(f"{noun} {f.name} must not be negative")
        changes[f.name] = value
    return replace(defaults, **changes)  # type: ignore[type-var]
