"""Hostile cases for what operators see: metrics, events and the console answer only with the
API token, and carry no secrets."""

from __future__ import annotations

import httpx

SURFACES = ["/metrics", "/v1/events", "/v1/events?follow=true", "/v1/databases/x/history"]


def test_operator_surfaces_need_the_token(daemon):
    token = (daemon.home / "token").read_text().strip()
    with httpx.Client(base_url=daemon.info["api_url"], timeout=30) as anon:
        for path in SURFACES:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic abc"},
                            {"Authorization": f"Bearer {token}x"}, {"Authorization": f"bearer  {token[:-1]}"}):
                r = anon.get(path, headers=headers)
                assert r.status_code == 401, (path, headers, r.status_code)
                assert "pgfleet_up" not in r.text and '"kind"' not in r.text
