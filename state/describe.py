"""What each operation does, in the words a caller (an AI assistant above all) needs.

One text per operation, used by both edges: the MCP tool's description (with the data dir's
real settings, e.g. its `default_quota_mb`) and the OpenAPI operation's description. Each
names the limits of its inputs (tests/api/test_surfaces.py holds every text to them), what the
call changes, and what it can refuse.
"""

from __future__ import annotations

from mailstate.state import aliases as al
from mailstate.state import owners as ow
from mailstate.state import paging
from mailstate.state import validate as v
from mailstate.state.models import PageRequest, Settings
from mailstate.state.ops import Operation

PASSWORD_LIMITS = f"{v.MIN_PASSWORD_BYTES}-{v.MAX_PASSWORD_BYTES} bytes in UTF-8 (8-72 ASCII characters; bcrypt reads no more), no NUL"
QUOTA_LIMITS = f"1-{v.MAX_QUOTA_MB} MB"
NODE_NAME_LIMITS = v.NODE_NAME_RULE
DESTINATION_LIMITS = (
    f"1-{al.MAX_DESTINATIONS} email addresses (on this platform or external; no duplicates; at most "
    f"{al.MAX_DESTINATIONS_CHARS} characters together)"
)
CHAIN_LIMITS = (
    f"Refused (409 alias_loop) when mail would come back to an address already on its way (a -> b -> a, across "
    f"domains and alias domains too), and (409 alias_chain_too_long) when a chain would be longer than "
    f"{al.MAX_ALIAS_DEPTH} steps or expand to more than {al.MAX_EXPANSION} addresses."
)
PAGING = (
    f"Pages for large projects: `limit` (1-{paging.PAGE_MAX}) lists at most that many entries and the answer then "
    "carries `next_cursor`; pass it back as `cursor` for the next page, until `next_cursor` is null. Writes between "
    "pages never make an entry that exists throughout appear twice or go missing. Without limit and cursor, "
    "everything is listed."
)
_WRITE = (
    "One signed git commit; mail nodes apply it within about a minute. Answers `commit` (null when nothing changed)."
)

ADDRESS_LIMITS = (
    "a host name (like mx1.example.net, the rules of a domain name) or an IPv4/IPv6 address: where the other nodes and "
    "mail clients reach the node"
)
_DETAILS: dict[str, str] = {
    "enable-email": (
        "Turns email on for a domain that is linked to your project (email_account_list_domains lists such domains "
        "under `linked_not_enabled`). In a fleet whose nodes have addresses the domain gets a `home`: the addressed "
        "node with the fewest mailboxes, or [Admin] the `node` named (409 node_not_usable when it is not a registered "
        "node with an address; a project token naming one gets 403 admin_required). Calling it again changes "
        "nothing. " + _WRITE
    ),
    "disable-email": (
        "Turns email off for a domain. Refused (409 active_mailboxes_remain) while the domain has active mailboxes: "
        "remove them first; and (409 alias_domains_remain) while alias domains point at it. Its aliases and catch-all "
        "go with it. Soft-deleted mailboxes are PURGED with it: their entries are gone for good and cannot "
        "be restored. The domain stays linked to the project. " + _WRITE
    ),
    "list-domains": (
        "Answers `domains`: your project's email-enabled domains with mailbox counts (total, active, inactive = "
        "soft-deleted), their number of aliases, `alias_of` (the target of an alias domain, else null), `home` "
        "(the node holding its mail; null in a fleet without addressed nodes) and `moving_to` (during move-domain), "
        "and `linked_not_enabled`: domains linked to your project whose email is not enabled yet, "
        "which email_account_enable_email can enable. An admin token sees every project's domains. Reads only."
    ),
    "add-user": (
        "Creates a mailbox on one of your project's email-enabled domains. `password`: "
        + PASSWORD_LIMITS
        + "; it is bcrypt-hashed and never stored or shown. `quota_mb`: "
        + QUOTA_LIMITS
        + "; default {default_quota_mb} MB (this server's default_quota_mb). The local part may use letters, digits, "
        "'.', '_', '+' and '-' (stored lowercase). Refused (409 mailbox_exists) when the address exists, also when it "
        "is soft-deleted (hard-delete it first). " + _WRITE
    ),
    "remove-user": (
        "Removes a mailbox. Soft delete (the default, hard_delete=false): the mailbox is deactivated, no login and "
        "no delivery, but its entry and mail are kept and the address stays taken; it is listed with active=false, and "
        "email_account_restore_user brings it back. "
        "Hard delete (hard_delete=true): the mailbox is deleted from the state and the address is free to add again. "
        "Soft-deleted mailboxes are also purged by disable-email and remove-domain. " + _WRITE
    ),
    "restore-user": (
        "Reactivates a soft-deleted mailbox (remove-user without hard_delete): login and delivery work again with "
        "its old password, quota and mail. Refused (409 mailbox_active) for an active mailbox; a hard-deleted "
        "mailbox is gone (404) and cannot be restored. " + _WRITE
    ),
    "list-users": (
        "Answers `users`: the mailboxes (email, domain, quota_mb, active, forward_to, keep_copy) on your project's email-enabled domains, "
        "or on one `domain`. Soft-deleted mailboxes have active=false. Never returns password hashes. Reads only."
    ),
    "update-password": (
        "Overwrites the password of an active mailbox; the old password stops working once the nodes apply the "
        "change. `password`: "
        + PASSWORD_LIMITS
        + ". Refused (409 mailbox_inactive) for a soft-deleted mailbox. "
        + _WRITE
    ),
    "add-domain": (
        "[Admin] Registers a new mail domain with email enabled. `project_id` (optional, a positive whole number) "
        "links it to that project at once; without it the domain is linked to no project, and only admin tokens "
        "can manage it until link-domain links it. Refused (409 domain_exists) for a known domain. " + _WRITE
    ),
    "remove-domain": (
        "[Admin] Removes a domain from the state, and with it its mail configuration and aliases. Refused (409 "
        "active_mailboxes_remain) while it has active mailboxes, and (409 alias_domains_remain) while alias domains "
        "point at it; soft-deleted mailboxes are PURGED with it. " + _WRITE
    ),
    "list-nodes": (
        "[Admin] Answers `nodes`: each sync node's name, ip_address, created_at and, from its last report, "
        "last_sync_at, applied_commit, status (never_synced before its first report; stale when its newest statement "
        "expired) and error, with commits_behind, diverged, lag_s (seconds behind the oldest accepted commit it lacks), "
        "stale (reported stale, or no report for MAILSTATE_NODE_STALE_AFTER = 600 s) with statement_age_s, "
        "last_error/last_error_at (kept after a later ok) and last_report_at/last_report_age_s, and its `address` "
        "(null: never a home), the `domains` and `mailboxes` it is home to and `tls_fingerprint` (SHA-256 of the "
        "certificate it reported, which the other nodes pin). Reads only."
    ),
    "add-node": (
        "[Admin] Registers a mail node. `name`: " + NODE_NAME_LIMITS + ". `ip_address` (optional): the only IPv4 or "
        "IPv6 address the node may connect from. `address` (optional): " + ADDRESS_LIMITS + "; only a node with an "
        "address becomes a domain's home (409 address_in_use when another node has it). Answers the node's `sync_key` "
        "ONCE: store it, it cannot be shown again (rotate-node-key makes a new one). " + _WRITE
    ),
    "link-domain": (
        "[Admin] Links a domain to a project (the dashboard's Domains tab), creating it (201) if it is new. Refused "
        "(409 domain_linked_elsewhere) when another project has it. " + _WRITE
    ),
    "unlink-domain": (
        "[Admin] Unlinks a domain from its project and removes it from the state. Refused (409 email_enabled) while "
        "its email is enabled. " + _WRITE
    ),
    "add-alias": (
        "Creates an alias: mail to `address` is delivered to every one of `destinations` instead. `address` is "
        "local@domain (letters, digits, '.', '_', '+', '-') or @domain, the domain's catch-all, which gets mail for "
        "addresses that are neither a mailbox nor an alias (a catch-all never takes mail from an existing mailbox or "
        "alias). The domain must be an email-enabled domain of your project. `destinations`: "
        + DESTINATION_LIMITS
        + ". "
        "Refused: 409 address_in_use (the address is a mailbox, active or soft-deleted), 409 alias_exists "
        "(update-alias changes it), 400 too_many_destinations. " + CHAIN_LIMITS + " " + _WRITE
    ),
    "update-alias": (
        "Replaces ALL destinations of an existing alias (local@domain) or catch-all (@domain) (the old list is gone). `destinations`: "
        + DESTINATION_LIMITS
        + ". Refused: 404 alias_not_found, 400 too_many_destinations. "
        + CHAIN_LIMITS
        + " "
        + _WRITE
    ),
    "remove-alias": (
        "Deletes an alias (local@domain) or catch-all (@domain); its mail is then refused (550), or goes to the catch-all if the domain has one. "
        "Refused: 404 alias_not_found; 409 alias_loop if falling through to the catch-all would loop. " + _WRITE
    ),
    "list-aliases": (
        "Answers `aliases`: each alias (address, domain, catch_all, destinations) of your project's email-enabled "
        "domains, or of one `domain`. Mailbox forwarding is listed by list-users (forward_to, keep_copy). Reads only."
    ),
    "set-forwarding": (
        "Forwards an active mailbox: its mail goes to `destinations` ("
        + DESTINATION_LIMITS.replace("1-", "0-", 1)
        + "); "
        "keep_copy=true (default) also keeps a copy in the mailbox, keep_copy=false delivers ONLY to the destinations. "
        "An empty `destinations` list turns forwarding off. A soft-deleted mailbox forwards nothing (refused here "
        "with 409 mailbox_inactive). Refused: 404 mailbox_not_found, 400 too_many_destinations. "
        + CHAIN_LIMITS
        + " "
        + _WRITE
    ),
    "add-alias-domain": (
        "Makes `domain` an alias domain: mail to x@domain is delivered to x@target (the domain's own mailboxes and "
        "aliases, if any, still get their own mail first). Both must be email-enabled domains of your project. Refused "
        "(409 alias_domain_target_invalid) when the target is not email-enabled, belongs to another project, is the "
        "domain itself, is itself an alias domain, or when other alias domains point at `domain`. " + CHAIN_LIMITS + " "
        "disable-email and remove-domain of a target are refused (409 alias_domains_remain) until its alias domains are "
        "removed. " + _WRITE
    ),
    "remove-alias-domain": (
        "Turns an alias domain back into an ordinary domain: x@domain is no longer sent to the target (addresses "
        "without a mailbox or alias are then refused). Refused: 404 alias_not_found if the domain is not an alias domain. "
        + _WRITE
    ),
    "dns-records": (
        "Answers `records`: every DNS record `domain` (an email-enabled domain of your project) needs, each with its "
        "type, name, value and purpose: MX to the platform's mail hosts, the SPF TXT, one DKIM record per node and "
        "selector (a TXT `v=DKIM1; k=rsa; p=...`, or, when the platform has a DKIM zone, a CNAME to it plus the zone's "
        "TXT), the DMARC TXT, the autoconfig/autodiscover names and SRV records mail clients look up, and MTA-STS "
        "(`_mta-sts` TXT whose id changes with the policy, `mta-sts` CNAME) and TLS-RPT (`_smtp._tls` TXT). Publish "
        "every DKIM record, pending and retired ones too: a node signs with a new key only after it was reported "
        "here and its publish wait passed, and keeps the old one published until its next rotation. Refused: 404 "
        "domain_not_found, 409 email_not_enabled, 409 dns_not_configured (the server's mailstate.yaml has no `dns:` "
        "block, and no node has a host name for an address). Without `dns.mx_hosts`, the MX records name every node "
        "whose address is a host name. Reads only."
    ),
    "remove-node": "[Admin] Removes a sync node; its sync key stops working at once. Refused (409 node_in_use) while "
    "it is the home or the replica of a domain or takes part in a move: move-domain its domains (set-replica for "
    "those it is the replica of) first. " + _WRITE,
    "move-domain": (
        "[Admin] Moves a domain's mail to `node` (" + NODE_NAME_LIMITS + "), its new home; answers 202 with `from` "
        "(the home it leaves) and `to`. The new home copies every mailbox with doveadm sync while the old one keeps "
        "receiving; then the home switches in a signed commit and the old home syncs what came in meanwhile. Nothing "
        "is lost or duplicated, mail is accepted and IMAP works throughout; list-domains shows `moving_to` until the "
        "switch. A move to the current home answers commit null (and calls off a move under way). Refused: 409 "
        "node_not_usable (not a registered node, or one without an address), 409 move_in_progress (moving elsewhere "
        "already), 404 domain_not_found, 409 email_not_enabled. " + _WRITE
    ),
    "set-replica": (
        "[Admin] Gives the email-enabled `domain` a replica: `node` (" + NODE_NAME_LIMITS + "), a registered node with "
        "an address other than its home, which keeps a copy of every mailbox in two-way doveadm sync with the home "
        "(a delivery, a flag change or an expunge reaches it within seconds; list-nodes shows the lag). `node` null "
        "removes the replica. list-domains shows `replica`. Refused: 409 node_not_usable (not a registered node, or "
        "one without an address), 409 replica_not_usable (the home itself, an alias domain, a domain without a "
        "home), 404 domain_not_found, 409 email_not_enabled. " + _WRITE
    ),
    "failover-node": (
        "[Admin] Fails node `name` (" + NODE_NAME_LIMITS + ") over, e.g. when it died: one signed commit makes every "
        "domain homed there whose "
        "replica is healthy (reporting, its last tick ok) homed on that replica, and the node its replica. Answers "
        "`moved` (those domains) and `unavailable` (domains left on the node: no replica, or an unhealthy one). When "
        "the node returns it takes no local delivery and merges the mail only it held into the new home. Mail "
        "delivered to the node and not yet replicated when it died is missing until then. Refused: 404 "
        "node_not_found. " + _WRITE
    ),
    "set-node-address": (
        "[Admin] Sets the `address` of node `name` ("
        + NODE_NAME_LIMITS
        + "): "
        + ADDRESS_LIMITS
        + ", or null to take it away (refused, 409 node_in_use, "
        "while the node is home to a domain or takes part in a move). The domains it is home to are compiled again "
        "with the new address. Refused: 404 node_not_found, 409 address_in_use (another node has it). " + _WRITE
    ),
    "set-vacation": (
        "Sets the out-of-office reply of an active mailbox of your project (Sieve vacation on the mail nodes). "
        "`body`: the reply's text, at most 16 KiB (16384 bytes in UTF-8; newlines and tabs allowed; an enabled "
        f"reply needs one, 409 vacation_text_missing); `subject`: one line of at most {ow.MAX_SUBJECT_CHARS} "
        "characters (null: 'Auto: ' and the message's subject). A field left out keeps its stored value, so "
        "`email` and `enabled` alone switch a stored reply on or off; null clears a field. At most one reply "
        f"per sender per `interval_days` ({ow.MIN_INTERVAL_DAYS}-{ow.MAX_INTERVAL_DAYS}, default "
        f"{ow.DEFAULT_INTERVAL_DAYS}); none to mailing lists, bulk mail, automatic replies or the mailbox itself; only "
        "from `start` to `end` (ISO dates such as 2026-07-01, days in UTC, both optional). The reply is DKIM-signed "
        "like other outgoing mail. It runs after the mailbox's filters (a filter with stop, or a discard, means no "
        "reply). enabled=false stops the replies and keeps the text for next time (with every text field null, "
        "nothing is kept). list-users shows `vacation` (enabled, start, end). Refused: 400 invalid_vacation (a limit "
        "above), 409 vacation_text_missing, 409 vacation_ends_before_start, 409 mailbox_inactive, 404 "
        "mailbox_not_found. " + _WRITE
    ),
    "set-filters": (
        f"Replaces ALL filter rules of an active mailbox of your project with `filters` (0-{ow.MAX_FILTERS}, in the "
        "order they run; [] removes them; 400 too_many_filters above that). Each rule: `name` (one line, at most "
        f"{ow.MAX_FILTER_NAME_CHARS} characters), `field` (from, to, subject or header:<Name>), `op` (contains or is; "
        f"case-insensitive), `value` (one line, at most {ow.MAX_VALUE_CHARS} characters; quotes and backslashes are "
        "fine), `action`: fileinto (`target`: a folder, '/' between levels, e.g. Work/Projects, at most "
        f"{ow.MAX_FOLDER_CHARS} characters, no '..', not starting with '/'; created if needed), discard (drops the "
        "message and stops), redirect (`target`: an address; redirects obey the forwarding rules: with the mailbox's "
        f"forwarding at most {al.MAX_DESTINATIONS} addresses, 400 too_many_destinations, never back to itself, "
        "409 alias_loop) or mark_read; `stop` (default false) ends the rules when this one matches. "
        "Refused: 400 invalid_filter, 400 invalid_folder, 409 mailbox_inactive, 404 mailbox_not_found. "
        + CHAIN_LIMITS
        + " "
        + _WRITE
    ),
    "list-filters": (
        "Answers `filters`: the rules of a mailbox of your project in the order they run (name, field, op, value, "
        "action, target, stop). Reads only."
    ),
    "add-app-password": (
        "Makes an app password for an active mailbox of your project: a password for one device or program, "
        "which logs in with the mailbox address. `name`: what it is for, 1-64 letters, digits, spaces or . @ ( ) + ' "
        "_ -, unique in the mailbox (400 app_password_name_taken); `scopes`: imap (reading mail), smtp (sending), or "
        "both, and it is refused elsewhere (an imap-only password cannot send). Answers 201 with `password`, "
        f"generated by the server and shown ONCE: only its bcrypt hash is stored. At most {ow.MAX_APP_PASSWORDS} per "
        "mailbox (400 too_many_app_passwords). The mailbox's own password keeps working. Refused: 409 "
        "mailbox_inactive, 404 mailbox_not_found. " + _WRITE
    ),
    "list-app-passwords": (
        "Answers `app_passwords`: a mailbox's app passwords (name, scopes, created_at, last_used_at: when a mail "
        "node last saw it log in, or null), never the passwords themselves. Reads only."
    ),
    "remove-app-password": (
        "Removes a mailbox's app password by `name`; it stops working when the mail nodes apply the change. Refused: "
        "404 app_password_not_found, 404 mailbox_not_found. " + _WRITE
    ),
    "check-dns": (
        "Looks up every record of dns-records for `domain` (an email-enabled domain of your project) in DNS now, "
        "through the server's resolver ($MAILSTATE_DNS_RESOLVER, else the system's), and answers `ok` (all good) and "
        "`records`: each record of dns-records with `status` ok, missing (no such record), wrong (the name has "
        "records of that kind but not this one, or also others: a second SPF record, a foreign MX) or error (the "
        "lookup failed: `error` timeout, servfail, refused or no_answer_from_servers), and `found`, what DNS "
        "answered. The verdict is kept: list-domains shows it as dns_ok and dns_checked_at (the server also checks "
        "every domain in the background, at most once an hour). DNS providers take minutes to publish a change; "
        "check again later rather than changing a record twice. Refused: 404 domain_not_found, 409 "
        "email_not_enabled, 409 dns_not_configured, 503 dns_resolver_invalid. Reads DNS; changes no state."
    ),
    "mobileconfig": (
        "The Apple configuration profile (iPhone, iPad, macOS Mail) for `email` on an email-enabled domain: one "
        "IMAP account (implicit TLS) with SMTP submission (implicit TLS), the full address as login and NO password "
        "in it (the device asks for it). Any address of the domain gets the same servers, whether or not the "
        "mailbox exists (nothing can be enumerated). Over HTTP, GET /v1/email-account/mobileconfig?email=... "
        "answers the file itself without a token (send the user that link); this tool answers it as `profile`, "
        "with the servers as `imap` and `smtp`. Refused: 404 domain_not_found (unknown or no email), 409 "
        "dns_not_configured. Reads only."
    ),
    "set-limits": (
        "[Admin] Sets a project's (`project_id`) or a domain's (`domain`; give exactly one) plan limits; a limit "
        "left out stays as it is, null removes it. max_mailboxes (active mailboxes; soft-deleted ones do not "
        "count), max_aliases (the catch-all included), max_quota_mb (the largest quota one mailbox may have, "
        "1-1048576 MB), storage_mb (the sum of the quotas) count over the scope's email-enabled domains; both "
        "the domain's and its project's limits apply. send_per_hour and send_per_day are recipients EACH mailbox "
        "may send to in an hour and in 24 hours (a message to three counts three), enforced by the mail nodes "
        "(4xx past the limit); a domain's overrides its project's, which overrides mailstate.yaml's sending "
        "default. Refused (409 limit_below_use) when the scope already uses more than the new limit. Afterwards "
        "every write that would pass a limit (add-user, restore-user, set-quota, add-alias, enable-email, ...) is "
        "refused with 409 limit_reached, naming the limit, its max and the use, and nothing is committed. " + _WRITE
    ),
    "set-spam-policy": (
        "Sets the spam policy of a domain (`domain`) or of one active mailbox (`email`; give exactly one): `action` "
        "junk (over junk_score the message is filed into the mailbox's Junk folder), reject (over reject_score it "
        "is refused at SMTP time with a 5xx; between junk_score and reject_score it is junked) or off (neither; "
        "the Authentication-Results and X-Spam-Status headers are still added). Scores are rspamd's, from 0.1 to "
        "100, rounded to one decimal place; junk_score must be below reject_score. A field left out or null is "
        "inherited: a mailbox's policy overrides its domain's, which overrides mailstate.yaml's default (junk, 6, "
        "15). `action: null` removes the override. Answers the stored `policy` and the `effective` one. A message "
        "to several recipients is scanned once, with the policy of the most specific of them (a mailbox's before "
        "a domain's). Refused: 404 domain_not_found / mailbox_not_found, 409 email_not_enabled, 409 "
        "mailbox_inactive, 400 invalid_spam_policy. " + _WRITE
    ),
    "add-sender-rule": (
        "Puts an envelope sender (`sender`: an address such as bob@example.org, or a whole domain as @example.org) on "
        "the allow or block list of a domain (`domain`) or of one active mailbox (`email`; give exactly one). "
        "allow: the sender's mail is scanned but never junked or refused for its score; block: it is refused at "
        "SMTP time with a 5xx. A mailbox's rule is tried before its domain's, and both before the spam policy. At "
        "most 100 rules per domain and per mailbox; a sender already listed with the other action is switched. "
        "Answers 201 (200 and commit null when the rule was there already). Refused: 404 domain_not_found / "
        "mailbox_not_found, 409 email_not_enabled, mailbox_inactive, too_many_sender_rules, 400 "
        "invalid_sender_rule. " + _WRITE
    ),
    "list-sender-rules": (
        "Answers `rules`: each allow or block rule of your domains and their mailboxes (`email` null for a "
        "domain's own), with `sender` and `action`. `domain` or `email` narrows it down. Reads only."
    ),
    "remove-sender-rule": (
        "Takes `sender` off the allow or block list of a domain (`domain`) or a mailbox (`email`; exactly one). "
        "Refused: 404 sender_rule_not_found when it is not listed there. " + _WRITE
    ),
    "list-spam-policy": (
        "Answers `default` (mailstate.yaml's spam policy, every field resolved) and `policies`: each domain and "
        "mailbox that has a policy of its own, with its `policy` (null fields inherited) and the `effective` one. "
        "`domain` narrows it down to one domain. Reads only."
    ),
    "list-limits": (
        "Answers `limits`: your project (domain null) and its email-enabled domains, each limit with `limit` (set "
        "on that scope, or null), `use` (what the scope uses now; for send_* the most recipients one mailbox sent "
        "to in the window, as the nodes last reported) and, for send_*, `effective` (what each mailbox gets after "
        "the domain > project > default order). `project_id` or `domain` narrows it down. An admin token sees "
        "every project and domain that has limits. Reads only."
    ),
    "set-quota": (
        "Changes an active mailbox's quota, 1-1048576 MB (new mailboxes get default {default_quota_mb} MB). Held to "
        "the plan limits (409 limit_reached for max_quota_mb and storage_mb); 409 mailbox_inactive for a "
        "soft-deleted mailbox. " + _WRITE
    ),
    "suspend-sending": (
        "Stops a mailbox from sending: every submission (587/465) gets a 5xx, while it still receives mail and "
        "logs in (IMAP and SMTP AUTH). `reason` (1-200 characters, one line) is kept in the state and shown by "
        "list-users, never to mail clients. The mail nodes also suspend a mailbox by themselves when its "
        "recipients pass auto_suspend_factor x its send limit; that too shows here and fires sending.suspended. "
        + _WRITE
    ),
    "resume-sending": (
        "Lets a suspended mailbox send again; the nodes count it afresh from now. Nothing changes (commit null) "
        "when it is not suspended. " + _WRITE
    ),
    "add-webhook": (
        "Registers a URL that gets events as signed POSTs (Standard Webhooks: webhook-id, webhook-timestamp, "
        "webhook-signature `v1,<base64 HMAC-SHA256 of id.timestamp.body>`). `events` (1-11 of mailbox.created, "
        "mailbox.deleted, mailbox.restored, domain.enabled, domain.disabled, quota.threshold, sending.limited, "
        "sending.suspended, dns.check_failed; node.stale and node.recovered for admin tokens): a project token's "
        "webhook gets its project's events only, an admin's every project's. `url`: https to a public address "
        "(400 invalid_webhook_url, webhook_url_not_public). Answers `secret` (whsec_...) ONCE; it is never listed. "
        "Delivery is at least once (the same webhook-id on a retry), retried with backoff for 24 hours, and kept "
        "across server restarts. At most 20 webhooks a project (409 too_many_webhooks). Kept in the server's "
        "local database, not in git: no commit."
    ),
    "list-webhooks": (
        "Answers `webhooks`: yours (an admin's token: all), with their events, pending deliveries and the last "
        "success and failure. Never the secrets. Reads only."
    ),
    "remove-webhook": (
        "Removes a webhook by its `id`; its pending deliveries are dropped. 404 webhook_not_found for an unknown "
        "or another project's webhook. No commit (webhooks are not in git)."
    ),
    "rotate-node-key": "[Admin] Gives a node a new sync key, answered ONCE; the old key stops working at once. "
    + _WRITE,
}


def describe(op: Operation, settings: Settings | None = None) -> str:
    """The operation's summary plus what a caller needs to know, for `settings` (defaults if None)."""
    detail = _DETAILS.get(op.name)
    if detail is None:
        return op.summary
    default_quota = (settings or Settings()).default_quota_mb
    text = detail.format(default_quota_mb=default_quota)
    if issubclass(op.request, PageRequest):
        text += " " + PAGING
    return f"{op.summary}\n\n{text}"
