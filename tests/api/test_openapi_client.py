"""The OpenAPI contract, as a client generated from it sees it.

`openapi-python-client` (offline: it needs no network) generates a client from a real
`mailstate serve`'s /openapi.json into a temp dir; the test imports it and drives every
endpoint with it. Each call must come back as the documented, typed model (never None, never
UnexpectedStatus), and no answer may carry a field the schema does not name.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import httpx
import pytest

from mailstate.state.ops import OPERATIONS
from tests.helpers.openapi import call_endpoint, client_module
from tests.helpers.server import LiveServer, live_server

pytestmark = pytest.mark.e2e

PASSWORD = "correct horse battery"


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with live_server(tmp_path_factory.mktemp("openapi")) as server:
        yield server


def test_the_generated_client_drives_every_endpoint(srv: LiveServer, client_pkg: ModuleType) -> None:
    m = client_module("models")
    mk = client_pkg.AuthenticatedClient
    admin = mk(base_url=srv.url, token=srv.admin_token, raise_on_unexpected_status=True)
    project = mk(base_url=srv.url, token=srv.create_token(project=7, name="generated"), raise_on_unexpected_status=True)
    anonymous = client_pkg.Client(base_url=srv.url, raise_on_unexpected_status=True)
    called: set[str] = set()

    def call(c: Any, api: str, op: str, status: int, model: str, **kwargs: Any) -> Any:
        called.add(op)
        return call_endpoint(c, api, op, status, model, **kwargs)

    linked = call(
        admin,
        "admin",
        "link-domain",
        201,
        "DomainResponse",
        body=m.LinkDomainRequest(domain="gen.example", project_id=7),
    )
    assert linked.project_id == 7 and linked.email_enabled is False and len(linked.commit) == 40
    again = call(
        admin,
        "admin",
        "link-domain",
        200,
        "DomainResponse",
        body=m.LinkDomainRequest(domain="gen.example", project_id=7),
    )
    assert again.commit is None
    listed = call(project, "email_account", "list-domains", 200, "ListDomainsResponse")
    assert listed.domains == [] and [d.domain for d in listed.linked_not_enabled] == ["gen.example"]
    enabled = call(
        project, "email_account", "enable-email", 200, "DomainResponse", body=m.EnableEmailRequest(domain="gen.example")
    )
    assert enabled.email_enabled is True

    user = call(
        project,
        "email_account",
        "add-user",
        201,
        "AddUserResponse",
        body=m.AddUserRequest(email="info@gen.example", password=PASSWORD),
    )
    assert (user.email, user.domain, user.quota_mb, user.active) == ("info@gen.example", "gen.example", 1024, True)
    assert isinstance(user.commit, str) and len(user.commit) == 40
    call(
        project,
        "email_account",
        "add-user",
        201,
        "AddUserResponse",
        body=m.AddUserRequest(email="tmp@gen.example", password=PASSWORD, quota_mb=5),
    )
    users = call(project, "email_account", "list-users", 200, "ListUsersResponse", domain="gen.example")
    assert [(u.email, u.quota_mb) for u in users.users] == [("info@gen.example", 1024), ("tmp@gen.example", 5)]
    domains = call(project, "email_account", "list-domains", 200, "ListDomainsResponse")
    assert [(d.domain, d.active_mailboxes) for d in domains.domains] == [("gen.example", 2)]
    new_password = m.UpdatePasswordRequest(email="info@gen.example", password="another passw0rd")
    updated = call(project, "email_account", "update-password", 200, "UpdatePasswordResponse", body=new_password)
    assert updated.updated is True
    soft = call(
        project,
        "email_account",
        "remove-user",
        200,
        "RemoveUserResponse",
        body=m.RemoveUserRequest(email="tmp@gen.example"),
    )
    assert soft.hard_delete is False and soft.active is False
    restored = call(
        project,
        "email_account",
        "restore-user",
        200,
        "RestoreUserResponse",
        body=m.RestoreUserRequest(email="tmp@gen.example"),
    )
    assert restored.active is True and restored.restored is True
    # Plan limits, sending and webhooks (their rules: tests/test_limits.py, test_sending_policy.py, test_webhooks.py).
    ea = "email_account"
    limits = call(
        admin,
        "admin",
        "set-limits",
        200,
        "SetLimitsResponse",
        # A schema with anyOf (project_id or domain) is a plain JSON body to the generator.
        body={"project_id": 7, "max_mailboxes": 10, "send_per_hour": 40},
    )
    assert limits.limits["max_mailboxes"] == 10 and len(limits.commit) == 40
    listed_limits = call(project, ea, "list-limits", 200, "ListLimitsResponse")
    assert listed_limits.limits[0].max_mailboxes.limit == 10 and listed_limits.limits[0].send_per_hour.effective == 40
    quota = call(
        project, ea, "set-quota", 200, "SetQuotaResponse", body=m.SetQuotaRequest(email="tmp@gen.example", quota_mb=9)
    )
    assert quota.quota_mb == 9
    policy = call(
        project,
        ea,
        "set-spam-policy",
        200,
        "SetSpamPolicyResponse",
        # A schema with oneOf (domain or email) is a plain JSON body to the generator.
        body={"email": "tmp@gen.example", "action": "reject", "reject_score": 9.5},
    )
    assert policy.effective.reject_score == 9.5 and policy.effective.junk_score == 6 and len(policy.commit) == 40
    policies = call(project, ea, "list-spam-policy", 200, "ListSpamPolicyResponse")
    assert [p.email for p in policies.policies] == ["tmp@gen.example"] and policies.default.action.value == "junk"
    rule = {"email": "tmp@gen.example", "sender": "@spam.test", "action": "block"}
    added = call(project, ea, "add-sender-rule", 201, "SenderRuleResponse", body=rule)
    assert added.sender == "@spam.test" and len(added.commit) == 40
    rules = call(project, ea, "list-sender-rules", 200, "ListSenderRulesResponse")
    assert [(r.email, r.sender) for r in rules.rules] == [("tmp@gen.example", "@spam.test")]
    body = {"email": "tmp@gen.example", "sender": "@spam.test"}
    assert call(project, ea, "remove-sender-rule", 200, "SenderRuleResponse", body=body).action.value == "block"
    body = m.SuspendSendingRequest(email="tmp@gen.example", reason="generated client")
    assert call(project, ea, "suspend-sending", 200, "SendingResponse", body=body).sending.value == "suspended"
    body = m.ResumeSendingRequest(email="tmp@gen.example")
    assert call(project, ea, "resume-sending", 200, "SendingResponse", body=body).sending.value == "ok"
    event = next(getattr(m, n) for n in dir(m) if n.startswith("AddWebhookRequestEvents"))
    hook = call(
        project,
        ea,
        "add-webhook",
        201,
        "AddWebhookResponse",
        body=m.AddWebhookRequest(url="https://93.184.215.14/gen", events=[event("dns.check_failed")]),
    )
    assert hook.secret.startswith("whsec_")
    hooks = call(project, ea, "list-webhooks", 200, "ListWebhooksResponse")
    assert [h.id for h in hooks.webhooks] == [hook.id]
    gone_hook = call(
        project, ea, "remove-webhook", 200, "RemoveWebhookResponse", body=m.RemoveWebhookRequest(id=hook.id)
    )
    assert gone_hook.removed is True
    # Aliases, forwarding, a catch-all and an alias domain.
    ea = "email_account"
    alias = call(
        project,
        ea,
        "add-alias",
        201,
        "AliasResponse",
        body=m.AddAliasRequest(address="sales@gen.example", destinations=["info@gen.example"]),
    )
    assert alias.destinations == ["info@gen.example"] and len(alias.commit) == 40
    alias = call(
        project,
        ea,
        "update-alias",
        200,
        "AliasResponse",
        body=m.UpdateAliasRequest(address="sales@gen.example", destinations=["x@ext.example"]),
    )
    assert alias.destinations == ["x@ext.example"]
    call(
        project,
        ea,
        "add-alias",
        201,
        "AliasResponse",
        body=m.AddAliasRequest(address="@gen.example", destinations=["info@gen.example"]),
    )
    aliases = call(project, ea, "list-aliases", 200, "ListAliasesResponse", domain="gen.example")
    assert [(a.address, a.catch_all) for a in aliases.aliases] == [("@gen.example", True), ("sales@gen.example", False)]
    forward = m.SetForwardingRequest(email="info@gen.example", destinations=["y@ext.example"], keep_copy=False)
    fwd = call(project, ea, "set-forwarding", 200, "SetForwardingResponse", body=forward)
    assert fwd.keep_copy is False and fwd.destinations == ["y@ext.example"]
    users = call(project, ea, "list-users", 200, "ListUsersResponse", domain="gen.example")
    assert users.users[0].forward_to == ["y@ext.example"]
    for address in ("sales@gen.example", "@gen.example"):
        assert (
            call(
                project, ea, "remove-alias", 200, "RemoveAliasResponse", body=m.RemoveAliasRequest(address=address)
            ).removed
            is True
        )
    call(
        admin,
        "admin",
        "link-domain",
        201,
        "DomainResponse",
        body=m.LinkDomainRequest(domain="gen-old.example", project_id=7),
    )
    call(project, ea, "enable-email", 200, "DomainResponse", body=m.EnableEmailRequest(domain="gen-old.example"))
    ad = call(
        project,
        ea,
        "add-alias-domain",
        200,
        "AliasDomainResponse",
        body=m.AddAliasDomainRequest(domain="gen-old.example", target="gen.example"),
    )
    assert ad.alias_of == "gen.example"
    domains = call(project, ea, "list-domains", 200, "ListDomainsResponse")
    assert {d.domain: d.alias_of for d in domains.domains}["gen-old.example"] == "gen.example"
    ad = call(
        project,
        ea,
        "remove-alias-domain",
        200,
        "AliasDomainResponse",
        body=m.RemoveAliasDomainRequest(domain="gen-old.example"),
    )
    assert ad.alias_of is None
    # What owners ask for: the generated models take the published (anyOf) shapes.
    box = "info@gen.example"
    vac = m.SetVacationRequest.from_dict({"email": box, "enabled": True, "body": "Away.", "start": "2026-07-01"})
    assert call(project, ea, "set-vacation", 200, "SetVacationResponse", body=vac).vacation.enabled is True
    rule = {
        "name": "bills",
        "field": "subject",
        "op": "contains",
        "value": 'a "b"',
        "action": "fileinto",
        "target": "Bills",
    }
    rules = m.SetFiltersRequest.from_dict({"email": box, "filters": [rule]})
    assert call(project, ea, "set-filters", 200, "SetFiltersResponse", body=rules).commit
    listed = call(project, ea, "list-filters", 200, "ListFiltersResponse", email=box)
    assert listed.to_dict()["filters"] == [{**rule, "stop": False}]
    app = m.AddAppPasswordRequest.from_dict({"email": box, "name": "phone", "scopes": ["imap"]})
    made = call(project, ea, "add-app-password", 201, "AddAppPasswordResponse", body=app)
    assert len(made.password) == 29
    apps = call(project, ea, "list-app-passwords", 200, "ListAppPasswordsResponse", email=box)
    assert [a.name for a in apps.app_passwords] == ["phone"]
    gone = m.RemoveAppPasswordRequest.from_dict({"email": box, "name": "phone"})
    assert call(project, ea, "remove-app-password", 200, "RemoveAppPasswordResponse", body=gone).removed is True
    # dns-records: this server's mailstate.yaml has no dns: block (tests/api/test_dns_records.py has one).
    err = call(project, ea, "dns-records", 409, "ErrorResponse", domain="gen.example")
    assert err.error.code == "dns_not_configured"
    err = call(project, ea, "check-dns", 409, "ErrorResponse", domain="gen.example")
    assert err.error.code == "dns_not_configured"
    # mobileconfig takes no token (mail clients call it); tests/api/test_autoconfig.py has the profile itself.
    err = call(anonymous, ea, "mobileconfig", 409, "ErrorResponse", email="info@gen.example")
    assert err.error.code == "dns_not_configured"
    err = call(anonymous, ea, "mobileconfig", 404, "ErrorResponse", email="info@nowhere.example")
    assert err.error.code == "domain_not_found"
    call(project, ea, "disable-email", 200, "DomainResponse", body=m.DisableEmailRequest(domain="gen-old.example"))
    for email in ("tmp@gen.example", "info@gen.example"):
        call(
            project,
            "email_account",
            "remove-user",
            200,
            "RemoveUserResponse",
            body=m.RemoveUserRequest(email=email, hard_delete=True),
        )
    disabled = call(
        project,
        "email_account",
        "disable-email",
        200,
        "DomainResponse",
        body=m.DisableEmailRequest(domain="gen.example"),
    )
    assert disabled.email_enabled is False
    unlinked = call(
        admin, "admin", "unlink-domain", 200, "UnlinkDomainResponse", body=m.UnlinkDomainRequest(domain="gen.example")
    )
    assert unlinked.project_id is None

    added = call(admin, "admin", "add-domain", 201, "DomainResponse", body=m.AddDomainRequest(domain="admin.example"))
    assert added.email_enabled is True
    removed = call(
        admin, "admin", "remove-domain", 200, "RemoveDomainResponse", body=m.RemoveDomainRequest(domain="admin.example")
    )
    assert removed.removed is True

    node = call(admin, "admin", "add-node", 201, "AddNodeResponse", body=m.AddNodeRequest(name="gen01"))
    assert node.sync_key.startswith("mss_") and node.ip_address is None
    nodes = call(admin, "admin", "list-nodes", 200, "ListNodesResponse")
    assert [(n.name, n.status) for n in nodes.nodes] == [("gen01", "never_synced")]
    rotated = call(admin, "admin", "rotate-node-key", 200, "RotateNodeKeyResponse", body=m.NodeRequest(name="gen01"))
    assert rotated.sync_key != node.sync_key
    addressed = call(
        admin,
        "admin",
        "set-node-address",
        200,
        "SetNodeAddressResponse",
        body=m.SetNodeAddressRequest(name="gen01", address="mx1.gen.example"),
    )
    assert addressed.address == "mx1.gen.example" and len(addressed.commit) == 40
    call(admin, "admin", "add-domain", 201, "DomainResponse", body=m.AddDomainRequest(domain="placed.example"))
    moved = call(
        admin,
        "admin",
        "move-domain",
        202,
        "MoveDomainResponse",
        body=m.MoveDomainRequest(domain="placed.example", node="gen01"),
    )
    assert moved.to == "gen01" and moved.commit is None  # add-domain placed it on the only addressed node
    err = call(
        admin,
        "admin",
        "move-domain",
        409,
        "ErrorResponse",
        body=m.MoveDomainRequest(domain="placed.example", node="nowhere"),
    )
    assert err.error.code == "node_not_usable"
    bad = m.SetReplicaRequest(domain="placed.example", node="gen01")  # the home itself
    assert call(admin, "admin", "set-replica", 409, "ErrorResponse", body=bad).error.code == "replica_not_usable"
    ghost = call(admin, "admin", "failover-node", 404, "ErrorResponse", body=m.NodeRequest(name="ghost"))
    assert ghost.error.code == "node_not_found"
    call(
        admin,
        "admin",
        "remove-domain",
        200,
        "RemoveDomainResponse",
        body=m.RemoveDomainRequest(domain="placed.example"),
    )

    # The node report, with the node's HTTP Basic credentials.
    basic = base64.b64encode(f"gen01:{rotated.sync_key}".encode()).decode()
    node_client = client_pkg.Client(
        base_url=srv.url, headers={"Authorization": f"Basic {basic}"}, raise_on_unexpected_status=True
    )
    head = srv.git("rev-parse", "main").strip()
    ack = call_endpoint(
        node_client,
        "nodes",
        "node_report",
        200,
        "NodeReportAck",
        body=m.NodeReport(applied_commit=head, status=m.NodeReportStatus("ok")),
    )
    assert ack.ok is True
    # Follow mode's long poll: a head the node does not know answers at once with the current one.
    waited = call_endpoint(node_client, "nodes", "node_wait", 200, "NodeWaitResponse", head="0" * 40, timeout=0.0)
    assert waited.changed is True and waited.head == head and isinstance(waited.issued_at, int)
    waited = call_endpoint(node_client, "nodes", "node_wait", 200, "NodeWaitResponse", head=head, timeout=0.0)
    assert waited.changed is False and waited.head == head
    nodes = call(admin, "admin", "list-nodes", 200, "ListNodesResponse")
    assert nodes.nodes[0].status == "ok" and nodes.nodes[0].applied_commit == head
    gone = call(admin, "admin", "remove-node", 200, "RemoveNodeResponse", body=m.NodeRequest(name="gen01"))
    assert gone.removed is True

    assert call_endpoint(anonymous, "health", "health", 200, "HealthResponse").status == "ok"
    full = call_endpoint(admin, "health", "health", 200, "HealthResponse")
    assert full.head == srv.git("rev-parse", "main").strip()

    metrics = client_module("api.health.metrics").sync_detailed(client=admin)
    assert metrics.status_code == 200 and isinstance(metrics.parsed, str) and "mailstate_writes_total" in metrics.parsed

    # Errors parse into the one documented error shape.
    err = call_endpoint(
        project,
        "email_account",
        "add-user",
        404,
        "ErrorResponse",
        body=m.AddUserRequest(email="x@nowhere.example", password=PASSWORD),
    )
    assert err.error.code == "domain_not_found"
    err = call_endpoint(project, "admin", "add-node", 403, "ErrorResponse", body=m.AddNodeRequest(name="nope"))
    assert err.error.code == "admin_required"

    assert called == set(OPERATIONS), set(OPERATIONS) - called


def test_the_spec_is_valid_openapi(srv: LiveServer) -> None:
    from openapi_spec_validator import validate

    validate(httpx.get(f"{srv.url}/openapi.json").json())
