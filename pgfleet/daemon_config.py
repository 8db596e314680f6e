"""The daemon's settings as a file: `pgfleet up --config FILE`, and `<home>/config.toml`,
which every start writes with what it serves on (the ports it really bound), so that a
plain `pgfleet up` (or `up --detach` after `down`) comes back on the same listeners that
URIs and ~/.pgpass point at.

Precedence, later wins: built-in defaults, <home>/config.toml, --config FILE, flags."""

from __future__ import annotations

import json
import socket
import tomllib
from pathlib import Path
from typing import Any

from pgfleet.config import DEFAULT_API, DEFAULT_LISTEN, DEFAULT_LISTEN_HTTP, DEFAULT_LISTEN_POOLED, parse_hostport

DEFAULTS: dict[str, Any] = {
    "listen": DEFAULT_LISTEN,
    "listen_pooled": DEFAULT_LISTEN_POOLED,
    "api": DEFAULT_API,
    "driver": "auto",
    "domain": "db.localhost",
    "tls": True,
    "tls_cert": None,
    "tls_key": None,
    "log_format": "text",
    "listen_http": DEFAULT_LISTEN_HTTP,  # or "off"
    "http_tls": "auto",
    "ws_session": "direct",
    "http_max_request_mb": 10,
    "http_max_response_mb": 10,
}
#: the type of each setting whose default is None
_TYPES: dict[str, type] = {"tls_cert": str, "tls_key": str}


class ConfigError(ValueError):
    pass


def home_config(home: Path) -> Path:
    return home / "config.toml"


def load(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"no such config file: {path}") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    data = data.get("daemon", data)  # a [daemon] table, or the keys at the top
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in DEFAULTS:
            raise ConfigError(f"{path}: unknown setting {key!r} (known: {', '.join(DEFAULTS)})")
        want = _TYPES.get(name) or type(DEFAULTS[name])
        if type(value) is not want:  # noqa: E721 (bool is not an int here)
            kind = {bool: "true or false", int: "an integer", str: "a string"}[want]
            raise ConfigError(f"{path}: {key} must be {kind}")
        out[name] = value
    return out


def resolve(home: Path, config_file: Path | None, flags: dict[str, Any]) -> dict[str, Any]:
    values = dict(DEFAULTS)
    if home_config(home).exists():
        values.update(load(home_config(home)))
    if config_file is not None:
        values.update(load(config_file))
    values.update({k: v for k, v in flags.items() if v is not None})
    return values


def save(home: Path, values: dict[str, Any]) -> None:
    lines = ["# written by `pgfleet up`: what this home's daemon serves on; edit, or pass flags", "[daemon]"]
    for key in DEFAULTS:
        value = values.get(key)
        if value is None:
            continue
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int):
            text = str(value)
        else:
            text = json.dumps(str(value))
        lines.append(f"{key} = {text}")
    path = home_config(home)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)


def check_free(addresses: dict[str, str]) -> None:
    """A clear one-line error for a listener that cannot be bound, before anything starts."""
    for flag, value in addresses.items():
        host, port = parse_hostport(value, flag)
        if port == 0:
            continue
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except socket.gaierror as exc:
            raise ConfigError(f"cannot listen on {value} ({flag}): {exc.strerror}") from None
        family, _, _, _, addr = infos[0]
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(addr)
            except OSError as exc:
                raise ConfigError(f"cannot listen on {value} ({flag}): {exc.strerror.lower()}"
                                  f"{' (another pgfleet or PgBouncer?)' if exc.errno == 98 else ''}") from None
