"""The node endpoints of the fleet over HTTP: a report's certificate, the credentials endpoint."""

from __future__ import annotations

import base64
from pathlib import Path

import httpx
import pytest

from mailstate.state.validate import certificate_fingerprint
from tests.helpers.certs import certificate
from tests.helpers.server import assert_error, live_server

pytestmark = pytest.mark.e2e


def test_reports_and_credentials_over_http(tmp_path: Path) -> None:
    with live_server(tmp_path / "srv") as srv, srv.client(srv.admin_token) as admin:
        key = admin.post("/v1/email-account/add-node", json={"name": "n1", "address": "10.0.0.1"}).json()["sync_key"]
        basic = {"Authorization": "Basic " + base64.b64encode(f"n1:{key}".encode()).decode()}
        pem = certificate("n1", "10.0.0.1")
        r = httpx.post(f"{srv.url}/v1/nodes/report", json={"status": "ok", "tls_certificate": pem}, headers=basic)
        assert r.status_code == 200, r.text
        nodes_ = admin.get("/v1/email-account/list-nodes").json()["nodes"]
        assert nodes_[0]["tls_fingerprint"] == certificate_fingerprint(pem)
        bad = httpx.post(f"{srv.url}/v1/nodes/report", json={"status": "ok", "tls_certificate": "nope"}, headers=basic)
        assert_error(bad, 400, "invalid_certificate")
        creds = httpx.get(f"{srv.url}/v1/nodes/fleet", headers=basic)
        assert creds.status_code == 200 and creds.json()["name"] == "n1" and creds.json()["peers"] == {}
        assert creds.json()["doveadm_password"].startswith("msd_") and creds.headers["cache-control"] == "no-store"
        assert creds.json()["doveadm_password"] not in srv.log_text()
        assert_error(httpx.get(f"{srv.url}/v1/nodes/fleet"), 401)
        wrong = {"Authorization": "Basic " + base64.b64encode(b"n1:mss_wrong").decode()}
        assert_error(httpx.get(f"{srv.url}/v1/nodes/fleet", headers=wrong), 401)
        moved = admin.post("/v1/email-account/move-domain", json={"domain": "nowhere.example", "node": "n1"})
        assert_error(moved, 404, "domain_not_found")
