"""Set-up and CLI rough edges: --version, busy ports, the remembered config, delete's question,
--json everywhere, unsplit URIs, db uri / update, unknown images, a TLS hint that works."""

from __future__ import annotations

import json
import os
import pty
import re
import shlex
import socket
import subprocess
import time
from pathlib import Path

import httpx

from ..conftest import PGFLEET, start_daemon, stop_daemon


def run(env, *args, stdin=None, timeout=120):
    return subprocess.run([*PGFLEET, *args], env=env, capture_output=True, text=True, timeout=timeout, stdin=stdin)


def test_version_without_a_command():
    proc = run(os.environ, "--version")
    assert proc.returncode == 0 and re.fullmatch(r"pgfleet \d+\.\d+\.\d+\n", proc.stdout)


def test_busy_ports_are_one_line(daemon_env):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for flag in ("--listen", "--listen-pooled", "--api", "--listen-http"):
            args = {"--listen": "127.0.0.1:0", "--listen-pooled": "127.0.0.1:0", "--api": "127.0.0.1:0",
                    "--listen-http": "127.0.0.1:0"}
            args[flag] = f"127.0.0.1:{port}"
            for detach in ((), ("--detach",)):
                proc = run(daemon_env, "up", *detach, "--driver", "sandbox", *[w for kv in args.items() for w in kv])
                assert proc.returncode == 1, proc.stderr
                lines = proc.stderr.strip().splitlines()
                assert len(lines) == 1 and f"cannot listen on 127.0.0.1:{port} ({flag})" in lines[0], proc.stderr
                assert "address already in use" in lines[0] and "Traceback" not in proc.stderr


def test_config_is_remembered_and_flags_and_files_win(daemon_env, tmp_path):
    home = Path(daemon_env["PGFLEET_HOME"])
    d = start_daemon(home, daemon_env)
    try:
        first = dict(d.info)
        saved = (home / "config.toml").read_text()
        assert f'listen = "{first["listen"]}"' in saved  # the port it really bound, not 0
        down = json.loads(d.cli("down", "--json").stdout)
        assert down["stopped"] is True and down["pid"] == first["pid"]
        # a plain `up --detach` (the hint the CLI prints) comes back on the same listeners
        up = json.loads(d.cli("up", "--detach", "--json").stdout)
        assert (up["listen"], up["listen_pooled"], up["api_url"]) == (
            first["listen"], first["listen_pooled"], first["api_url"])
        assert json.loads(d.cli("token", "--json").stdout)["token"] == (home / "token").read_text().strip()
    finally:
        stop_daemon(d)
    bad = tmp_path / "bad.toml"
    bad.write_text('[daemon]\nlisten = "127.0.0.1:0"\nport = 5\n')
    proc = run(daemon_env, "up", "--config", str(bad))
    assert proc.returncode == 1 and "unknown setting 'port'" in proc.stderr and len(proc.stderr.splitlines()) == 1
    proc = run(daemon_env, "up", "--config", str(tmp_path / "missing.toml"))
    assert proc.returncode == 1 and "no such config file" in proc.stderr


def test_database_commands(daemon):
    created = daemon.json("db", "create", "a-rather-long-database-name-for-wrapping")
    name = created["name"]
    # piped, the table is never wrapped: each URI is whole on its line
    listed = daemon.cli("db", "list").stdout
    assert created["uri"].replace(":" + created["password"], "") in listed
    assert daemon.cli("db", "uri", name).stdout.strip() == daemon.json("db", "show", name)["uri"]
    assert daemon.cli("db", "uri", name, "--pooled").stdout.strip().endswith(f"/{name}")
    updated = daemon.json("db", "update", name, "--cooldown-ms", "123456", "--memory-mb", "256")
    assert updated["scale_to_zero"]["cooldown_ms"] == 123456 and updated["memory_mb"] == 256
    assert updated["scale_to_zero"]["policy"] == "on"
    proc = daemon.cli("db", "update", name, check=False)
    assert proc.returncode == 1 and "nothing to change" in proc.stderr
    proc = daemon.cli("db", "update", name, "--policy", "sometimes", check=False)
    assert proc.returncode == 1 and "policy" in proc.stderr

    # unknown images are refused with the list of available ones
    token = (daemon.home / "token").read_text().strip()
    r = httpx.post(daemon.info["api_url"] + "/v1/databases", json={"name": "seventeen", "image": "postgres:17"},
                   headers={"Authorization": f"Bearer {token}"}, timeout=60)
    assert r.status_code == 400 and "postgres:15" in r.json()["message"] and "postgres:17" in r.json()["message"]

    # on a terminal, delete asks (and "no" keeps the database); --yes does not ask
    primary, secondary = pty.openpty()
    try:
        proc = subprocess.Popen([*PGFLEET, "db", "delete", name], env=daemon.env, stdin=secondary,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        os.write(primary, b"n\n")
        _, stderr = proc.communicate(timeout=60)
    finally:
        os.close(primary)
        os.close(secondary)
    assert proc.returncode == 1 and "delete" in stderr and "not deleted" in stderr
    assert daemon.json("db", "show", name)["name"] == name
    gone = daemon.json("db", "delete", name, "--yes")
    assert gone["state"] == "deleted"


def test_tls_hint_works_as_printed(daemon):
    created = daemon.json("db", "create", "secure")
    lines = daemon.cli("status").stdout.splitlines()
    hint = next(line.strip() for line in lines if line.strip().startswith("psql "))
    argv = shlex.split(hint.replace("NAME", "secure"))
    env = dict(daemon.env, PGPASSWORD=created["password"])
    proc = subprocess.run([*argv, "-XAtc", "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, (hint, proc.stderr)
