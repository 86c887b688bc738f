"""pi-pull: the mailstate node agent.

Pulls the signed mailstate "state repo", verifies it, and applies the compiled
Postfix/Dovecot files under ``rendered/`` to this node atomically.

Runs on small mail nodes (e.g. a Raspberry Pi): Python 3.9+ standard library
only, plus ``git`` (>= 2.31 when sending credentials to an http(s) remote),
``ssh-keygen`` and ``postmap``.

Usage::

    pi_pull.py --config /etc/pi-pull/pi-pull.ini --once   # one tick (systemd timer)
    pi_pull.py --config /etc/pi-pull/pi-pull.ini          # loop every [agent] interval

One tick:

1. fetch the server-signed accepted-head statement ``refs/mailstate/accepted`` (and
   the history of the commit it names; never a branch) into a quarantine next to the
   local bare mirror (``<root>/mirror.git``), bounded by ``[limits] max_fetch_mb``;
2. verify the statement (``ssh-keygen -Y verify -I mailstate``: a SERVER key, or one
   learned from its predecessor's endorsement, trust.py) against the node's *local*
   allowed_signers (never keys from the repo); refuse an Issued-At in the future; a
   statement older than ``[freshness] max_staleness`` brings nothing live (exit 5, stale);
3. require the commit to descend from the last applied commit (unrelated history is
   refused as a rollback; a statement of an older commit changes nothing), and EVERY
   commit since the applied one to be signed by a trusted key at its committer time
   (chain.py), before anything is materialised;
4. materialise ``rendered/`` from git objects (no work tree) into
   ``<root>/releases/<sha>/``, streaming and validating every line against what the
   compiler writes with the node's own mail_root/mail_uid/mail_gid, and postmap the
   maps; only then do the quarantined objects enter the mirror;
5. swap ``<root>/current`` atomically (rename of a temporary symlink);
6. reload Postfix / Dovecot only if their files changed;
7. if a reload fails: swap back, reload again, keep the last good release;
8. prune old releases (keep ``keep_releases``; never ``current`` or the
   previous good one);
9. report ``{name, sync_key, applied_commit, status, error, statement_issued_at}`` to the server; a
   report that cannot be delivered is stored and sent on the next tick.

The mailbox lifecycle (lifecycle.py, state format 2) hooks in: every tick starts by
purging ``<mail_root>/.graveyard/`` entries older than ``purge_after_days``; just
before the swap ``rendered/settings`` is checked and, on the upgrade to format 2,
each Maildir moves to ``<local>~<id>`` (with a symlink at the old path); after the
reload the Maildirs no listed mailbox owns go to the graveyard; every
``usage_interval`` the report carries each mailbox's usage (usage.py).

A tick with nothing new only talks to the remote (and the report URL): it
writes nothing to disk.

Release layout under ``root``::

    mirror.git/                                  bare mirror (objects only)
    releases/<sha>/postfix/virtual_mailbox_domains (+ .db)
    releases/<sha>/postfix/virtual_mailbox_maps    (+ .db)
    releases/<sha>/dovecot/passwd.d/<domain>
    releases/<sha>/COMMIT
    releases/<sha>/MANIFEST.json
    current -> releases/<sha>
    state.json
    .lock

Exit codes:

    0  applied a new commit, or already up to date
    1  error (fetch failed, postmap failed, reload failed and rolled back, ...)
    2  usage or configuration error
    3  refused: no/bad statement, bad/missing/untrusted signature, rollback, invalid
       content, or over a limit
    4  another pi-pull run holds the lock

Log lines go to stderr, one line per event, prefixed ``pi-pull:``. The sync key
is read from its key file (mode 0600), passed to git only through the
environment, and never logged.
"""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "1"
