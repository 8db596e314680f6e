"""Hostile cases for what operators see: metrics, events and the console's data answer only
with the API token; the console's page and script (public) hold no data and allow no other
script; nothing carries secrets."""

from __future__ import annotations

import httpx

SURFACES = ["/metrics", "/v1/events", "/v1/events?follow=true", "/v1/databases/x/history",
            "/v1/console/databases"]


def test_operator_surfaces_need_the_token(daemon):
    token = (daemon.home / "token").read_text().strip()
    created = daemon.json("db", "create", "secretive")
    with httpx.Client(base_url=daemon.info["api_url"], timeout=30) as anon:
        for path in SURFACES:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic abc"},
                            {"Authorization": f"Bearer {token}x"}, {"Authorization": f"bearer  {token[:-1]}"}):
                r = anon.get(path, headers=headers)
                assert r.status_code == 401, (path, headers, r.status_code)
                assert "pgfleet_up" not in r.text and '"kind"' not in r.text and "secretive" not in r.text
        for path in ("/console", "/console/app.js"):
            r = anon.get(path)
            assert r.status_code == 200
            assert "secretive" not in r.text and token not in r.text
            csp = r.headers["content-security-policy"]
            assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp.split(
                "script-src", 1)[1].split(";", 1)[0]
            assert r.headers["x-frame-options"] == "DENY"
        # the console's script never writes data as HTML
        script = anon.get("/console/app.js").text
        assert "innerHTML" not in script and "outerHTML" not in script and "insertAdjacentHTML" not in script
        # with the token: the data, and no secrets in it
        authed = {"Authorization": f"Bearer {token}"}
        for path in ("/metrics", "/v1/events", "/v1/console/databases", "/v1/databases/secretive/history"):
            r = anon.get(path, headers=authed)
            assert r.status_code == 200 and "secretive" in r.text
            assert created["password"] not in r.text and "SCRAM-SHA-256$" not in r.text
