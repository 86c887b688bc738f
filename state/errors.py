"""The one error tree of mailstate.

Every failure an operation, the store or the compiler can report is one of these classes.
Edges (HTTP, MCP, CLI) map the classes to statuses in one table each and never invent codes.

    MailstateError                      code, message, field, target; error (the default,
    │                                   never raised as such)
    ├── InvalidInput          400/422   invalid_domain, invalid_email, invalid_password,
    │                                   invalid_quota, invalid_node_name, invalid_ip_address,
    │                                   invalid_project_id, missing_field, unknown_field,
    │                                   invalid_request, unknown_operation, missing_token
    │                                   (`mailstate mcp` without a token), invalid_token_name,
    │                                   no_working_tree, not_repository_root (`mailstate plan`),
    │                                   invalid_destinations, too_many_destinations (aliases),
    │                                   invalid_limit, invalid_cursor (state/paging.py),
    │                                   invalid_dkim_key (a node report's dkim_keys),
    │                                   duplicate_key (a JSON object naming a key twice: api/strict_json.py),
    │                                   invalid_vacation, invalid_filter, invalid_folder, too_many_filters,
    │                                   invalid_app_password, invalid_scopes, app_password_name_taken,
    │                                   too_many_app_passwords (state/owners.py),
    │                                   invalid_dns_resolver ($MAILSTATE_DNS_RESOLVER, state/dnscheck.py),
    │                                   invalid_limits, invalid_scope (set-limits), invalid_reason
    │                                   (suspend-sending), invalid_webhook_url, invalid_webhook_secret,
    │                                   invalid_events, invalid_webhook_id, webhook_url_not_public
    │                                   (state/webhooks.py), invalid_address (a node's address),
    │                                   invalid_certificate (a node report's tls_certificate),
    │                                   invalid_spam_policy, invalid_sender_rule (state/spam.py)
    ├── Unauthenticated           401   unauthenticated
    ├── Forbidden                 403   admin_required, ip_not_allowed
    ├── NotFound                  404   domain_not_found, mailbox_not_found, node_not_found,
    │                                   token_not_found, repository_not_found,
    │                                   revision_not_found (`mailstate plan`), not_found (default),
    │                                   alias_not_found, app_password_not_found,
    │                                   project_not_found (list-limits), webhook_not_found,
    │                                   sender_rule_not_found (remove-sender-rule)
    ├── Conflict                  409   domain_exists, domain_linked_elsewhere, email_enabled,
    │   │                               email_not_enabled, mailbox_exists, mailbox_inactive,
    │   │                               mailbox_active, conflict (default),
    │   │                               active_mailboxes_remain, node_exists, token_ambiguous
    │   │                               (`token revoke NAME` when several tokens share NAME),
    │   │                               address_in_use, alias_exists, alias_loop,
    │   │                               alias_chain_too_long, alias_domain_target_invalid,
    │   │                               alias_domains_remain (state/aliases.py),
    │   │                               dns_not_configured (dns-records: no `dns:` in mailstate.yaml),
    │   │                               vacation_ends_before_start, vacation_text_missing (set-vacation),
    │   │                               too_many_webhooks (state/webhooks.py),
    │   │                               node_not_usable (not a registered node with an address),
    │   │                               node_in_use (a home, a replica, or in a move), move_in_progress
    │   │                               (move-domain elsewhere while one runs; state/placement.py),
    │   │                               replica_not_usable (set-replica: the home itself, an alias
    │   │                               domain, a domain without a home),
    │   │                               too_many_sender_rules (add-sender-rule)
    │   └── LimitReached              limit_reached, limit_below_use (state/limits.py: carries the
    │                                   limit, its value and the use)
    ├── StateInvalid              422   invalid_state, stale_rendered (a checkout or commit
    │   │                               that breaks the schema, the invariants, or compile())
    │   └── StatementInvalid          invalid_statement (an accepted-head statement that is
    │                                   malformed or not signed by a server key; internal,
    │                                   state/statement.py: the store replaces it, a node refuses)
    ├── StoreError                500   store_error (git, signing, disk: wraps the foreign
    │   │                               exception as __cause__), branch_moved (internal: another
    │   │                               process moved the branch; the store re-runs the operation),
    │   │                               not_initialised (no data dir there), already_initialised
    │   │                               (`mailstate init` on a used dir)
    │   └── Unavailable           503   store_busy (the branch kept moving under other writers),
    │       │                           dns_resolver_invalid, dns_check_unavailable (check-dns
    │       │                           without a usable resolver, state/dnscheck.py),
    │       │                           state_needs_repair (main holds a commit the server refuses,
    │       │                           and a write would build on it or drop answered writes),
    │       │                           webhooks_unavailable (a process without a local database)
    │       └── UpstreamUnavailable 503 upstream_unavailable, upstream_busy
    └── CompileError              500   compile_error (a value that would break a compiled
                                        file got past validation; should never happen)

Messages are human sentences and never contain a password, sync key or token.

The HTTP edge adds codes of its own for what never reaches an operation: request_too_large
(413), method_not_allowed (405), not_found for an unknown route (404), read_only (403, a push
to the node git endpoint), too_many_waiters (429 for one node, 503 for the server: the
follow-mode long poll /v1/nodes/wait holds a bounded number of waits) and internal_error (500,
the body of any StoreError/CompileError).
The MCP edge answers an unknown tool with JSON-RPC error -32602 (unknown_tool is not used any
more), and refuses a request to /mcp whose Host or Origin it does not serve with 403
host_not_allowed or origin_not_allowed (DNS rebinding protection).
tests/state/test_error_tree.py checks that every code raised anywhere in mailstate is drawn here.
"""

from __future__ import annotations

from typing import Any


class MailstateError(Exception):
    """Base of every mailstate error; carries a snake_case code and a human message."""

    default_code = "error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        field: str | None = None,
        target: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.field = field
        self.target = target

    def to_dict(self) -> dict[str, Any]:
        """The `{"code", "message", ...}` body the edges send back."""
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.field is not None:
            body["field"] = self.field
        if self.target is not None:
            body["target"] = self.target
        return body

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, message={self.message!r})"


class InvalidInput(MailstateError):
    default_code = "invalid_request"


class Unauthenticated(MailstateError):
    default_code = "unauthenticated"


class Forbidden(MailstateError):
    default_code = "admin_required"


class NotFound(MailstateError):
    default_code = "not_found"


class Conflict(MailstateError):
    default_code = "conflict"


class LimitReached(Conflict):
    """A write that would pass a plan limit (state/limits.py): the body names the limit, its
    value (`max`) and the use."""

    default_code = "limit_reached"

    def __init__(self, message: str, *, code: str, limit: str, value: int, use: int, scope: str) -> None:
        super().__init__(message, code=code, field=limit, target=scope)
        self.limit = limit
        self.value = value
        self.use = use

    def to_dict(self) -> dict[str, Any]:
        body = super().to_dict()
        body.update(limit=self.limit, max=self.value, use=self.use)
        return body


class StateInvalid(MailstateError):
    """A state checkout or commit that is not valid; `problems` lists every finding."""

    default_code = "invalid_state"

    def __init__(self, message: str, *, problems: list[str] | None = None, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.problems = problems or [message]


class StatementInvalid(StateInvalid):
    """An accepted-head statement (state/statement.py) that is malformed or not signed by a server key."""

    default_code = "invalid_statement"

    def __init__(self, message: str) -> None:
        super().__init__(message, code=self.default_code)


class StoreError(MailstateError):
    default_code = "store_error"


class BranchMoved(StoreError):
    """The branch no longer points where the store expected; nothing was written."""

    default_code = "branch_moved"


class Unavailable(StoreError):
    """Try again later: the write could not be made now, and nothing was changed."""

    default_code = "store_busy"


class UpstreamUnavailable(Unavailable):
    default_code = "upstream_unavailable"


class CompileError(MailstateError):
    default_code = "compile_error"
