"""The web console in headless Chromium against a real daemon: sign in with the token, see
every database with its state and recent wakes, create, suspend, resume, branch and delete
from the page, live updates from events; hostile text from clients stays text. Screenshots of the
main pages are kept in tests/artifacts/console/."""

from __future__ import annotations

import json

import psycopg
import pytest

from .chromium import CHROMIUM, Browser, artifacts_dir

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="SKIPPED LOUDLY: no chromium (Debian package `chromium`, "
                                "installed by `make deps` from apt-packages-test.txt)")

ROW = "document.querySelector(`tr[data-name=\"{name}\"]`)"
STATE = ROW + "?.querySelector('.state')?.textContent"


def click(page, name: str, label: str) -> None:
    page.evaluate(f"[...{ROW.format(name=name)}.querySelectorAll('button')]"
                  f".find(b => b.textContent === {json.dumps(label)}).click()")


@pytest.fixture
def browser(tmp_path):
    b = Browser(tmp_path / "chromium-profile")
    try:
        yield b
    finally:
        b.close()


def test_console_end_to_end(daemon, browser):
    shots = artifacts_dir() / "console"
    created = daemon.json("db", "create", "shop")
    daemon.cli("db", "suspend", "shop")
    with psycopg.connect(created["uri"], connect_timeout=60) as conn:  # one wake for the sparkline
        conn.execute("SELECT 1")
    # a hostile client's startup user name ends up in an event: it must stay text
    hostile = '<img src=x onerror="window.pwned=1">'
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(host="127.0.0.1", port=daemon.proxy_port, dbname="shop", user=hostile,
                        password="x", sslmode="disable", connect_timeout=60)

    url = daemon.cli("console").stdout.strip()
    assert "#token=" in url
    page = browser.new_page()
    page.navigate(url)
    page.wait_for(STATE.format(name="shop") + " === 'running'", what="shop running in the table")
    assert page.evaluate("location.hash") == ""  # the token left the address bar
    assert page.evaluate(ROW.format(name="shop") + ".querySelectorAll('svg.spark rect').length") == 1
    events = page.wait_for("document.getElementById('events').textContent.includes('auth_failure') && "
                           "document.getElementById('events').textContent", what="the auth failure event")
    assert hostile in events  # shown as the text it is
    assert page.evaluate("window.pwned === undefined && !document.querySelector('#events img')")
    page.screenshot(shots / "databases.png")

    # create from the page: the password is shown once
    page.evaluate("document.getElementById('new-name').value = 'web'; "
                  "document.getElementById('create-form').requestSubmit()")
    page.wait_for(STATE.format(name="web") + " === 'running'", what="web created")
    assert "password, shown once" in page.evaluate("document.getElementById('notice').textContent")
    assert daemon.json("db", "show", "web")["state"] == "running"

    click(page, "web", "Suspend")
    page.wait_for(STATE.format(name="web") + " === 'standby'", what="web suspended")
    click(page, "web", "Resume")
    page.wait_for(STATE.format(name="web") + " === 'running'", what="web resumed")

    # live: a database made elsewhere appears without a reload
    daemon.cli("db", "create", "elsewhere")
    page.wait_for(STATE.format(name="elsewhere") + " === 'running'", what="a live update")
    page.screenshot(shots / "after-actions.png")

    # branch from the page (the name asked for in a prompt)
    page.evaluate("window.prompt = () => 'web-copy'")
    click(page, "web", "Branch")
    page.wait_for(STATE.format(name="web-copy") + " === 'running'", timeout_s=120, what="the branch")

    page.evaluate("window.confirm = () => true")
    click(page, "web", "Delete")
    page.wait_for(ROW.format(name="web") + " === null", what="web deleted")
    assert sorted(d["name"] for d in daemon.json("db", "list")) == ["elsewhere", "shop", "web-copy"]

    # a wrong token is refused and the page shows no data
    login = browser.new_page()
    login.navigate(daemon.info["api_url"] + "/console")
    login.wait_for("!document.getElementById('login').classList.contains('hidden')", what="the sign-in form")
    login.evaluate("document.getElementById('token').value = 'pgf_wrong'; "
                   "document.getElementById('login-form').requestSubmit()")
    login.wait_for("document.getElementById('login-error').textContent.includes('not accepted')",
                   what="the refusal")
    assert login.evaluate("document.querySelectorAll('#databases tbody tr').length") == 0
    login.screenshot(shots / "sign-in.png")
