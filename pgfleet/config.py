"""Where pgfleet keeps its state, and the defaults every entry point shares."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

DEFAULT_LISTEN = "127.0.0.1:6432"
DEFAULT_LISTEN_POOLED = "127.0.0.1:6433"
DEFAULT_API = "127.0.0.1:8760"
DEFAULT_LISTEN_HTTP = "127.0.0.1:6434"  # SQL over HTTP and WebSocket (pgfleet.edge)
HOME_ENV = "PGFLEET_HOME"


def resolve_home(given: Path | None = None) -> Path:
    """The home a command works on: the one given (--home), else $PGFLEET_HOME, else the
    standard data directory (root's or the user's)."""
    return (given or default_home()).absolute()


def use_home(home: Path) -> None:
    """Make `home` the default for the rest of this process (the CLI's top-level --home),
    whichever package's sub-command runs."""
    os.environ[HOME_ENV] = str(home.absolute())


def default_home() -> Path:
    env = os.environ.get(HOME_ENV)
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/pgfleet")
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local/share")) / "pgfleet"


def default_cache() -> Path:
    """Slow-to-build, input-keyed artefacts (template clusters, guest images) live here,
    outside any checkout and any one home, so every home and test run reuses them."""
    env = os.environ.get("PGFLEET_CACHE")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/cache/pgfleet")
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pgfleet"


def parse_hostport(value: str, what: str = "address") -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"invalid {what} {value!r}: expected HOST:PORT")
    return (host.strip("[]") or "127.0.0.1"), int(port)


@dataclass
class DaemonInfo:
    """What a running daemon publishes in its home, so the CLI can find it."""

    pid: int
    api_url: str
    listen: str
    listen_pooled: str
    driver: str
    version: str
    ca_file: str | None = None
    domain: str | None = None
    tls: bool = False
    listen_http: str | None = None
    http_tls: bool = False

    @staticmethod
    def path(home: Path) -> Path:
        return home / "daemon.json"

    def write(self, home: Path) -> None:
        tmp = self.path(home).with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.replace(self.path(home))

    @classmethod
    def read(cls, home: Path) -> "DaemonInfo | None":
        try:
            data = json.loads(cls.path(home).read_text())
        except (OSError, ValueError):
            return None
        info = cls(**data)
        return info if pid_alive(info.pid) else None  # else a stale file from a daemon that died


def pid_alive(pid: int) -> bool:
    """True for a running process; a zombie (dead, not yet reaped) counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = open(f"/proc/{pid}/stat").read()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] != "Z"


def token_path(home: Path) -> Path:
    return home / "token"


class DaemonNotFound(RuntimeError):
    """No daemon serves this home (or its token cannot be read): one line for the user."""


def find_daemon(home: Path) -> tuple[DaemonInfo, str]:
    """The daemon serving `home` and its API token: how the CLI and the node agent find it."""
    info = DaemonInfo.read(home)
    if info is None:
        raise DaemonNotFound(f"no pgfleet daemon is running on {home} (start one with `pgfleet up --detach`)")
    try:
        return info, token_path(home).read_text().strip()
    except OSError as exc:
        raise DaemonNotFound(f"cannot read the API token in {home}: {exc.strerror}") from exc


def ensure_token(home: Path) -> str:
    """The API token: created at first start (0600), stable afterwards."""
    import secrets

    path = token_path(home)
    if path.exists():
        return path.read_text().strip()
    home.mkdir(parents=True, exist_ok=True)
    token = "pgf_" + secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token
