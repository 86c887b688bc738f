"""A mail node's provisioning bundle: pi-pull config, trusted keys, systemd units, service snippets.

``render_node_bundle()`` is pure and deterministic: the same arguments give the same bytes.
It returns relative file names mapped to contents; the caller (``mailstate node bundle``)
writes them out. Where each file goes on the node is in ``INSTALL_PATHS``:

    pi-pull.ini                        -> /etc/pi-pull/pi-pull.ini
    allowed_signers                    -> /etc/pi-pull/allowed_signers
    pi_pull.py                         -> /usr/local/lib/pi-pull/pi_pull.py (a zipapp, see below)
    pi-pull.service, pi-pull.timer     -> /etc/systemd/system/
    pi-pull-follow.service             -> /etc/systemd/system/ (follow mode; the timer stays as fallback)
    pi-pull-policy.service             -> /etc/systemd/system/ (the outbound policy service of the submission ports)
    dovecot/conf.d/90-mailstate.conf   -> /etc/dovecot/conf.d/90-mailstate.conf
    postfix/main.cf.mailstate          -> lines to add to /etc/postfix/main.cf
    postfix/master.cf.mailstate        -> port 25 (postscreen) and submission entries for /etc/postfix/master.cf (postconf -M -e)
    postfix/main.cf.base               -> /etc/postfix/main.cf, only if there is none ("No configuration")
    bundle.json                        -> read by `pi_pull.py install` (``bundle_manifest()``)

``python3 pi_pull.py install --bundle DIR`` (pi-pull/pipull/install.py) installs all of it from
the manifest ``bundle.json``, which lists each file, its destination directory and mode, the
mail root with its owner, and the files' SHA-256.

The sync key is never part of the bundle: the operator writes it to ``/etc/pi-pull/sync_key``
(mode 0600), which the generated ini points at.

``pi_pull.py`` is built by ``build_pi_pull()`` from the agent package ``pi-pull/pipull/`` (shipped
in the wheel as data under ``mailstate/node_agent/``): a zipapp, one file that ``python3
pi_pull.py`` (also ``python3 -I -S``) runs, with fixed timestamps and order so the same sources
give the same bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import zipapp
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2

from mailstate.compiler.postscreen import (
    DEFAULT_DNSBL_SITES,
    DEFAULT_DNSBL_THRESHOLD,
    check_dnsbl_sites,
    check_dnsbl_threshold,
)
from mailstate.state.errors import InvalidInput, StoreError
from mailstate.state.owners import MAX_APP_PASSWORDS
from mailstate.state.signers import parse_signers_line
from mailstate.state.validate import validate_node_name

# The checkout's top level (state/, compiler/, templates/, pi-pull/ side by side), or, installed,
# site-packages/mailstate (templates/ and node_agent/, the wheel's copy of pi-pull/).
PACKAGE_ROOT = Path(__file__).resolve().parent.parent
NODE_TEMPLATES = PACKAGE_ROOT / "templates" / "node"
AGENT_DIR = PACKAGE_ROOT / "pi-pull" if (PACKAGE_ROOT / "pi-pull").is_dir() else PACKAGE_ROOT / "node_agent"
AGENT_PACKAGE = "pipull"
# The zipapp's entry point (the package's own __main__ is for `python3 -m pipull` in pi-pull/).
#
# Why the code cache: zipimport compiles every module of a zipapp on every run (it writes no
# .pyc), ~40 ms of a no-op tick on a 2-core node whose whole budget is 150 ms. So a
# root run unpacks the archive's sources once into CODE_CACHE/<sha256 of the archive>/ (root-owned
# 0755 directories, renamed into place complete) and imports from there, where Python keeps its
# __pycache__ as for any installed package. Another version of pi_pull.py gets its own directory;
# nothing is deleted while agents may run (a tick imports some modules only when it applies a
# commit): ``pi_pull.py uninstall`` removes the cache. Anything unexpected (not root, a directory not owned by root or
# writable by others, no space): the archive itself is imported.
# PI_PULL_CODE_CACHE=<absolute dir> moves the cache, PI_PULL_CODE_CACHE=off turns it off.
CODE_CACHE = "/var/cache/pi-pull/code"
_ZIP_MAIN = b"""import sys


def _code_cache():
    import os

    where = os.environ.get("PI_PULL_CODE_CACHE", "%(cache)s")
    if where == "off" or not where.startswith("/") or os.geteuid() != 0:
        return None
    import hashlib

    archive = sys.path[0]
    with open(archive, "rb") as fh:
        here = os.path.join(where, hashlib.sha256(fh.read()).hexdigest()[:32])
    if not os.path.isfile(os.path.join(here, "pipull", "cli.py")):
        _unpack(archive, where, here)
    for path in (where, here, os.path.join(here, "pipull"), os.path.join(here, "pipull", "__pycache__")):
        st = os.lstat(path)
        if st.st_uid != 0 or st.st_mode & 0o022 or (st.st_mode & 0o170000) != 0o040000:
            return None
    return here


def _unpack(archive, where, here):
    import os
    import py_compile
    import shutil
    import zipfile

    os.makedirs(where, mode=0o755, exist_ok=True)
    tmp = "%%s.tmp-%%d" %% (here, os.getpid())
    shutil.rmtree(tmp, ignore_errors=True)
    for d in (tmp, os.path.join(tmp, "pipull"), os.path.join(tmp, "pipull", "__pycache__")):
        os.mkdir(d)
        os.chmod(d, 0o755)
    with zipfile.ZipFile(archive) as zf:
        for name in zf.namelist():
            if name.startswith("pipull/") and name.endswith(".py") and "/" not in name[7:]:
                path = os.path.join(tmp, name)
                with open(path, "xb") as out:
                    out.write(zf.read(name))
                os.chmod(path, 0o644)
                py_compile.compile(path, dfile=os.path.join(archive, name), doraise=True)
    try:
        os.rename(tmp, here)
    except OSError:  # another run unpacked it first
        shutil.rmtree(tmp, ignore_errors=True)


try:
    _cached = _code_cache()
except (OSError, ValueError):
    _cached = None
if _cached:
    sys.path.insert(0, _cached)

from pipull.cli import main

sys.exit(main())
""" % {b"cache": CODE_CACHE.encode()}
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)

# The bucketed layout (pi-pull/pipull/buckets.py) for every new bundle whose map type postmap
# updates in place. Why 16 tables a map (docs/benchmarks.md, bench_node_apply): a change
# copies and postmaps only its domain's table, 1/N of the map; at 1M mailboxes a table of 1/16
# is ~62k lines (~10 MB), copied in < 10 ms and updated with postmap -d/-i in ~0.04 s each, so a
# one-mailbox apply is ~0.3 s (quiet) where one whole table would be a 20 s postmap. More tables
# buy little more (the copy is already small) and cost Postfix a lookup in each of them in turn
# (every process opens 4N tables) and a first apply 4N postmap runs; 8 would double the copy.
# A config without map_buckets keeps pi-pull's one-table layout (0).
DEFAULT_MAP_BUCKETS = 16
BUCKETED_MAP_TYPES = ("hash", "btree", "lmdb")

ETC_DIR = "/etc/pi-pull"
SYNC_KEY_FILE = f"{ETC_DIR}/sync_key"
ALLOWED_SIGNERS_FILE = f"{ETC_DIR}/allowed_signers"
CONFIG_FILE = f"{ETC_DIR}/pi-pull.ini"
DEFAULT_ROOT = "/var/lib/pi-pull"
# Sending (docs/node-guide.md, "TLS"): one certificate for Postfix and Dovecot. Link the
# ACME/Let's Encrypt files there (fullchain + key of the node's mail host name).
TLS_CERT = f"{ETC_DIR}/tls/fullchain.pem"
TLS_KEY = f"{ETC_DIR}/tls/privkey.pem"
POSTFIX_QUEUE_DIR = "/var/spool/postfix"
DKIM_MILTER = "inet:127.0.0.1:8891"
# Where Dovecot's Sieve hands in vacation replies and redirects: a Postfix service on loopback
# with the DKIM milter (postfix-master.cf.j2), so they are signed like submitted mail.
SIEVE_LISTEN = "127.0.0.1:10026"
_HOST_PORT = re.compile(r"^(?:[0-9.]+|\[[0-9a-fA-F:]+\]):[0-9]{1,5}$")
# pi-pull's outbound policy service (pipull/policy.py): Postfix's form, and the ini's [policy] listen.
POLICY_SERVICE = "inet:127.0.0.1:10040"
# The fleet (docs/fleet.md): the ports every node of a fleet opens to the others (the same on
# every node: a node reaches its peers there) and where pi-pull keeps its fleet files.
FLEET_RELAY_PORT = 2525
FLEET_DOVEADM_PORT = 12345
FLEET_POLICY_PORT = 10041
# Inbound filtering (docs/inbound.md): rspamd's proxy worker is the milter of port 25 (and of no
# other service); its controller, on loopback, answers pi-pull's `rspamc stat` for the report.
# The milter is a UNIX socket under Postfix's queue directory: Postfix reads the relative path
# against that directory (chrooted or not). Over loopback TCP each message waited ~40 ms on a
# delayed ACK at the end of data (bench/bench_inbound.py measures both).
SPAM_MILTER = "unix:rspamd/milter.sock"
# rspamd creates the socket mode 0660 in a directory install makes _rspamd's, group postfix and
# setgid: the socket's group is postfix even where rspamd runs as _rspamd (systemd's unit) and its
# own chown to _rspamd:postfix (bind_socket's owner=/group=) fails, which rspamd only logs.
SPAM_MILTER_DIR_MODE = 0o2750
SPAM_CONTROLLER = "127.0.0.1:11334"
RSPAMD_DIR = "/etc/rspamd"
# rspamd's own thresholds before any policy: "add header" (junk) and "reject" (5xx at SMTP time).
SPAM_JUNK_SCORE = 6.0
SPAM_REJECT_SCORE = 15.0
# The highest reject_score a bundle's baseline may have (a policy's is at most state/spam.py's 100).
MAX_RSPAMD_SCORE = 1000.0
# The GTUBE test string (docs/inbound.md). Debian 12's rspamd (3.4) refuses a message carrying it
# while parsing, before any setting or rule runs, whatever the recipient's policy. So port 25's
# own cleanup service (INBOUND_CLEANUP, a Postfix body_checks REPLACE) turns the string into
# GTUBE_MARKER before the milter sees the message, and the bundle's rspamd rule MAILSTATE_GTUBE
# (local.d/regexp.conf) scores the marker above any reject_score: the policy then decides as for
# any spam (junk: Junk; reject: 5xx; off: INBOX). Submission, Sieve and the fleet relay keep the
# string as it is (a user may send it out to test another filter).
GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
GTUBE_MARKER = "MAILSTATE-GTUBE-TEST"
GTUBE_SCORE = 2 * MAX_RSPAMD_SCORE
INBOUND_CLEANUP = "cleanup-inbound"
# Bundle file -> template: installed as <rspamd_dir>/local.d/<name> (rspamd merges them over its defaults).
RSPAMD_BUNDLE_DIR = "rspamd/local.d"
RSPAMD_LOCAL_D: dict[str, str] = {
    "worker-proxy.inc": "rspamd-worker-proxy.inc.j2",
    "worker-normal.inc": "rspamd-worker-normal.inc.j2",
    "worker-controller.inc": "rspamd-worker-controller.inc.j2",
    "milter_headers.conf": "rspamd-milter_headers.conf.j2",
    "actions.conf": "rspamd-actions.conf.j2",
    "settings.conf": "rspamd-settings.conf.j2",
    "classifier-bayes.conf": "rspamd-classifier-bayes.conf.j2",
    "regexp.conf": "rspamd-regexp.conf.j2",
}
# Before every mailbox's own Sieve: what rspamd marked as spam goes into Junk (Dovecot's sieve_before).
JUNK_SIEVE = f"{ETC_DIR}/junk.sieve"
# Learning (docs/inbound.md): Dovecot's IMAPSieve runs learn-spam.sieve on a move into Junk and
# learn-ham.sieve on a move out of it; both pipe the message to rspamd-learn (rspamc learn_spam /
# learn_ham on the controller), the only program in the Sieve pipe directory.
LEARN_DIR = ETC_DIR
LEARN_SIEVES: dict[str, str] = {
    "learn-spam.sieve": "mailstate-learn-spam.sieve",
    "learn-ham.sieve": "mailstate-learn-ham.sieve",
}
SIEVE_PIPE_DIR = "/usr/local/lib/pi-pull/sieve-pipe"
LEARN_PROGRAM = "rspamd-learn"


def fleet_dir(root: str) -> str:
    return f"{root.rstrip('/')}/fleet"


INSTALL_PATHS: dict[str, str] = {
    "pi-pull.ini": CONFIG_FILE,
    "allowed_signers": ALLOWED_SIGNERS_FILE,
    "pi_pull.py": "/usr/local/lib/pi-pull/pi_pull.py",
    "pi-pull.service": "/etc/systemd/system/pi-pull.service",
    "pi-pull.timer": "/etc/systemd/system/pi-pull.timer",
    "pi-pull-follow.service": "/etc/systemd/system/pi-pull-follow.service",
    "pi-pull-policy.service": "/etc/systemd/system/pi-pull-policy.service",
    "dovecot/conf.d/90-mailstate.conf": "/etc/dovecot/conf.d/90-mailstate.conf",
    "postfix/main.cf.mailstate": "/etc/postfix/main.cf (postconf -e)",
    "postfix/master.cf.mailstate": "/etc/postfix/master.cf (postconf -M -e)",
    "postfix/main.cf.base": "/etc/postfix/main.cf (only if missing)",
    "opendkim/opendkim.conf": "/etc/opendkim.conf (with a dkim milter; the original kept)",
    "bundle.json": "(read by pi_pull.py install)",
    "junk.sieve": "/etc/pi-pull/junk.sieve (with a spam milter: Dovecot's sieve_before)",
    "learn-spam.sieve": "/etc/pi-pull/learn-spam.sieve (with a spam milter: IMAPSieve, a move into Junk)",
    "learn-ham.sieve": "/etc/pi-pull/learn-ham.sieve (with a spam milter: IMAPSieve, a move out of Junk)",
    f"sieve-pipe/{LEARN_PROGRAM}": f"{SIEVE_PIPE_DIR}/{LEARN_PROGRAM} (with a spam milter: rspamc learn_spam / learn_ham)",
}
# rspamd's local.d files (with a spam milter): any file of the same name already there is kept and restored by uninstall.
INSTALL_PATHS.update({f"{RSPAMD_BUNDLE_DIR}/{name}": f"{RSPAMD_DIR}/local.d/{name}" for name in RSPAMD_LOCAL_D})
MANIFEST_NAME = "bundle.json"
# Bundle files that name the default install directories (install rewrites them for other ones);
# the Postfix and Dovecot snippets name the TLS files, which live under the etc dir by default.
RELOCATED = (
    "pi-pull.ini",
    "pi-pull.service",
    "pi-pull-follow.service",
    "pi-pull-policy.service",
    "postfix/main.cf.mailstate",
    "dovecot/conf.d/90-mailstate.conf",
)
MANIFEST_FORMAT = 1
# Where `pi_pull.py install` puts things by default; each is an option of install.
INSTALL_DIRS: dict[str, str] = {
    "etc_dir": ETC_DIR,
    "lib_dir": "/usr/local/lib/pi-pull",
    "systemd_dir": "/etc/systemd/system",
    "postfix_dir": "/etc/postfix",
    "dovecot_dir": "/etc/dovecot",
    "rspamd_dir": RSPAMD_DIR,
}
# (bundle file, install dir key, name under that dir, mode)
_INSTALLED_FILES: tuple[tuple[str, str, str, int], ...] = (
    ("pi-pull.ini", "etc_dir", "pi-pull.ini", 0o644),
    ("allowed_signers", "etc_dir", "allowed_signers", 0o644),
    ("pi_pull.py", "lib_dir", "pi_pull.py", 0o755),
    ("pi-pull.service", "systemd_dir", "pi-pull.service", 0o644),
    ("pi-pull.timer", "systemd_dir", "pi-pull.timer", 0o644),
    ("pi-pull-follow.service", "systemd_dir", "pi-pull-follow.service", 0o644),
    ("pi-pull-policy.service", "systemd_dir", "pi-pull-policy.service", 0o644),
    ("dovecot/conf.d/90-mailstate.conf", "dovecot_dir", "conf.d/90-mailstate.conf", 0o644),
)

_SAFE_VALUE = re.compile(r"^[^\n\r]*$")
# A master.cf service name (`submission`, `465`, `127.0.0.1:10587`) and a milter address.
_SERVICE = re.compile(r"^[A-Za-z0-9._:\[\]-]+$")
_MILTER = re.compile(r"^((inet|unix):)?[A-Za-z0-9._:/\[\]-]+$")
_POLICY = re.compile(r"^inet:[A-Za-z0-9.\[\]:-]+:[0-9]{1,5}$")
_UNIX_RELATIVE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}(/[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}){0,3}$")
_LOOPBACK_PORT = re.compile(r"^127\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}:[0-9]{1,5}$")


@lru_cache(maxsize=4)
def _env(template_dir: str) -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(template_dir),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
    )


def render_template(name: str, template_dir: Path | str = NODE_TEMPLATES, **variables: Any) -> str:
    """Render one ``templates/node`` template with StrictUndefined (a missing variable is an error)."""
    for key, value in variables.items():
        if isinstance(value, str) and not _SAFE_VALUE.match(value):
            raise InvalidInput(f"{key} must be a single line.", field=key)
    return _env(str(template_dir)).get_template(name).render(**variables)


def _tls_path(name: str, value: str) -> str:
    if not value.startswith("/") or any(c.isspace() for c in value):
        raise InvalidInput(f"{name} must be an absolute path without spaces.", field=name)
    return value


def dovecot_snippet(
    root: str = DEFAULT_ROOT,
    *,
    lmtp_address: str = "127.0.0.1",
    lmtp_port: int = 24,
    quota: bool = True,
    tls_cert: str = TLS_CERT,
    tls_key: str = TLS_KEY,
    imaps_port: int = 993,
    postfix_queue_dir: str = POSTFIX_QUEUE_DIR,
    map_buckets: int = 0,
    sieve_submission: str = SIEVE_LISTEN,
    junk_sieve: str = "",
    learn_dir: str = "",
    sieve_pipe_dir: str = "",
) -> str:
    """The Dovecot conf.d snippet: passwd-file passdb/userdb under ``<root>/current``, LMTP listener,
    quota, IMAP over TLS only (``imaps_port``) and the auth socket Postfix's SASL uses
    (``<postfix_queue_dir>/private/auth``). With ``map_buckets`` > 0 the passwd-files are
    ``passwd.d/%1d/%2d/%d`` (pi-pull's bucketed layout, pi-pull/pipull/buckets.py). The fleet's
    proxy defaults (the home's ``imaps_port``, TLS) and pi-pull's ``<root>/fleet/dovecot.conf``. Mailbox owners'
    settings (docs/owners.md): the app-password passdbs (``<root>/app-passwords``) before the
    mailbox's own, each mailbox's Sieve script from ``<root>/sieve``; ``sieve_submission``
    (``host:port``): where Sieve sends a vacation reply or a redirect, Postfix's loopback service
    with the DKIM milter (``postfix_master_snippet(sieve_listen=...)``). ``junk_sieve``: the script
    that files what rspamd marked as spam into Junk, before each mailbox's own ("" for none).
    ``learn_dir`` (with ``sieve_pipe_dir``): where learn-spam.sieve and learn-ham.sieve are, which
    IMAPSieve runs on a move into and out of Junk, piping the message to the programs of
    ``sieve_pipe_dir`` ("" for no learning)."""
    if not _HOST_PORT.match(sieve_submission):
        raise InvalidInput("sieve_submission must be HOST:PORT, e.g. 127.0.0.1:10026.", field="sieve_submission")
    return render_template(
        "dovecot-mailstate.conf.j2",
        fleet_dir=fleet_dir(root),
        passwd_path="passwd.d/%1d/%2d/%d" if int(map_buckets) > 0 else "passwd.d/%d",
        root=root.rstrip("/"),
        lmtp_address=lmtp_address,
        lmtp_port=int(lmtp_port),
        quota=quota,
        tls_cert=_tls_path("tls_cert", tls_cert),
        tls_key=_tls_path("tls_key", tls_key),
        imaps_port=int(imaps_port),
        postfix_queue_dir=_tls_path("postfix_queue_dir", postfix_queue_dir).rstrip("/"),
        app_password_slots=MAX_APP_PASSWORDS,
        sieve_submission=sieve_submission,
        junk_sieve=junk_sieve and _tls_path("junk_sieve", junk_sieve),
        learn_dir=learn_dir and _tls_path("learn_dir", learn_dir).rstrip("/"),
        sieve_pipe_dir=sieve_pipe_dir and _tls_path("sieve_pipe_dir", sieve_pipe_dir).rstrip("/"),
    )


def postfix_snippet(
    root: str = DEFAULT_ROOT,
    *,
    map_type: str = "hash",
    lmtp_address: str = "127.0.0.1",
    lmtp_port: int = 24,
    tls_cert: str = TLS_CERT,
    tls_key: str = TLS_KEY,
    map_buckets: int = 0,
    spam_milter: str = "",
    dnsbl_sites: Sequence[str] = DEFAULT_DNSBL_SITES,
    dnsbl_threshold: int = DEFAULT_DNSBL_THRESHOLD,
) -> str:
    """The main.cf lines: virtual maps under ``<root>/current``, LMTP delivery to Dovecot, TLS,
    SASL through Dovecot (enabled only by the master.cf submission services) and the sender-login map.
    ``spam_milter`` (``unix:rspamd/milter.sock`` under the queue directory, or ``inet:127.0.0.1:PORT``;
    "" for none): rspamd's proxy as the milter of port 25, which tempfails while it does not answer
    (the submission services name their own milters). ``dnsbl_sites``/``dnsbl_threshold``: postscreen's DNS blocklists on port 25 (compiler/postscreen.py;
    empty: none, postscreen still refuses clients that talk before their turn)."""
    return render_template(
        "postfix-main.cf.j2",
        spam_milter=spam_milter and spam_milter_address(spam_milter),
        dnsbl_sites=check_dnsbl_sites(dnsbl_sites),
        dnsbl_threshold=check_dnsbl_threshold(dnsbl_threshold),
        root=root.rstrip("/"),
        map_type=map_type,
        map_buckets=int(map_buckets),
        lmtp_address=lmtp_address,
        lmtp_port=int(lmtp_port),
        tls_cert=_tls_path("tls_cert", tls_cert),
        tls_key=_tls_path("tls_key", tls_key),
    )


def postfix_master_snippet(
    *,
    smtp_listen: str = "smtp",
    submission_listen: str = "submission",
    smtps_listen: str = "submissions",
    dkim_milter: str = DKIM_MILTER,
    sieve_listen: str = SIEVE_LISTEN,
    policy_service: str = POLICY_SERVICE,
    relay_listen: str = str(FLEET_RELAY_PORT),
    root: str = DEFAULT_ROOT,
    map_type: str = "hash",
    tls_cert: str = TLS_CERT,
    tls_key: str = TLS_KEY,
    rewrite_gtube: bool = True,
) -> str:
    """The master.cf entries (``service/type = ...``, for ``postconf -M -e``): port 25 (``smtp_listen``)
    through postscreen, which hands the clients it lets in to the ``smtpd`` pass service (main.cf's
    milter and restrictions), with its ``dnsblog`` and ``tlsproxy`` helpers; submission (587,
    STARTTLS required) and submissions (465, implicit TLS), SASL-authenticated clients only, the
    sender checked against the sender-login map, the DKIM milter (``dkim_milter``; "" for none)
    and the outbound policy service (``policy_service``, ``inet:HOST:PORT``; "" for none) on these
    services only, so inbound port 25 never depends on either. ``sieve_listen``: a loopback
    service, loopback clients only, where Dovecot's Sieve hands in vacation replies and redirects,
    with the DKIM milter too (docs/owners.md). The fleet: the ``fleet`` transport that relays to a
    domain's home and the relay listener (``relay_listen``; "" for none) that takes the other
    nodes' mail, both over TLS checked against ``<root>/fleet``'s tables. ``rewrite_gtube`` (a bundle
    that filters port 25): the pass service's own cleanup, which rewrites the GTUBE string into the
    marker the bundle's rspamd rule scores (``gtube_body_checks()``)."""
    if not _HOST_PORT.match(sieve_listen) or not sieve_listen.startswith(("127.", "[::1]")):
        raise InvalidInput("sieve_listen must be a loopback HOST:PORT, e.g. 127.0.0.1:10026.", field="sieve_listen")
    listens = (("smtp_listen", smtp_listen), ("submission_listen", submission_listen), ("smtps_listen", smtps_listen))
    for key, value in listens:
        if not _SERVICE.match(value):
            raise InvalidInput(
                f"{key} must be a master.cf service name such as submission or 127.0.0.1:10587.", field=key
            )
    if dkim_milter and not _MILTER.match(dkim_milter):
        raise InvalidInput("dkim_milter must be a milter address such as inet:127.0.0.1:8891.", field="dkim_milter")
    if policy_service and not _POLICY.match(policy_service):
        raise InvalidInput(
            "policy_service must be inet:HOST:PORT, such as inet:127.0.0.1:10040.", field="policy_service"
        )
    for key, value in (("relay_listen", relay_listen),):
        if value and not _SERVICE.match(value):
            raise InvalidInput(f"{key} must be a master.cf service name such as 2525 or 127.0.0.1:2525.", field=key)
    return render_template(
        "postfix-master.cf.j2",
        smtp_listen=smtp_listen,
        submission_listen=submission_listen,
        smtps_listen=smtps_listen,
        dkim_milter=dkim_milter,
        sieve_listen=sieve_listen,
        policy_service=policy_service,
        relay_listen=relay_listen,
        map_type=map_type,
        fleet_dir=fleet_dir(root),
        tls_cert=_tls_path("tls_cert", tls_cert),
        tls_key=_tls_path("tls_key", tls_key),
        gtube_body_checks=gtube_body_checks() if rewrite_gtube else "",
        inbound_cleanup=INBOUND_CLEANUP,
    )


def gtube_body_checks() -> str:
    """Port 25's ``body_checks`` (an inline regexp table, as master.cf's ``-o`` takes it): a body line
    with the GTUBE string gets GTUBE_MARKER in its place, the rest of the line kept; a line with it
    twice or more becomes the marker alone (one REPLACE a line, and any string left would still be
    rspamd's reject). The ``i`` flag makes the match case-sensitive, as rspamd's is; ``$$`` is one
    ``$`` once Postfix expands the parameter."""
    pattern = re.sub(r"([.*])", r"\\\1", GTUBE)
    rules = (
        f"/{pattern}.*{pattern}/i REPLACE {GTUBE_MARKER}",
        f"/^(.*){pattern}(.*)/i REPLACE $${{1}}{GTUBE_MARKER}$${{2}}",
    )
    return "regexp:{ " + ", ".join("{" + rule + "}" for rule in rules) + " }"


def _spam_bind(name: str, value: str) -> str:
    """``inet:127.0.0.1:PORT`` (or ``127.0.0.1:PORT``) -> ``127.0.0.1:PORT``: rspamd listens on loopback only."""
    where = value.removeprefix("inet:")
    if not _LOOPBACK_PORT.match(where) or not 1 <= int(where.rpartition(":")[2]) <= 65535:
        raise InvalidInput(f"{name} must be a loopback address such as inet:127.0.0.1:11332.", field=name)
    return where


def spam_milter_address(spam_milter: str) -> str:
    """Postfix's form of port 25's rspamd milter: ``unix:RELATIVE/PATH`` (under Postfix's queue
    directory) or ``inet:127.0.0.1:PORT``; anything else raises InvalidInput."""
    if spam_milter.startswith("unix:"):
        rel = spam_milter.removeprefix("unix:")
        if not _UNIX_RELATIVE.match(rel):
            raise InvalidInput(
                "spam_milter must be unix:DIR/NAME, relative to Postfix's queue directory (such as "
                "unix:rspamd/milter.sock), or a loopback address such as inet:127.0.0.1:11332.",
                field="spam_milter",
            )
        return spam_milter
    return "inet:" + _spam_bind("spam_milter", spam_milter)


def spam_milter_socket(spam_milter: str, postfix_queue_dir: str = POSTFIX_QUEUE_DIR) -> str | None:
    """Where rspamd creates port 25's milter socket (None for a TCP milter)."""
    address = spam_milter_address(spam_milter)
    if not address.startswith("unix:"):
        return None
    return f"{_tls_path('postfix_queue_dir', postfix_queue_dir).rstrip('/')}/{address.removeprefix('unix:')}"


def rspamd_snippets(
    spam_milter: str = SPAM_MILTER,
    controller: str = SPAM_CONTROLLER,
    *,
    junk_score: float = SPAM_JUNK_SCORE,
    reject_score: float = SPAM_REJECT_SCORE,
    spam_dir: str = f"{DEFAULT_ROOT}/spam",
    postfix_queue_dir: str = POSTFIX_QUEUE_DIR,
) -> dict[str, str]:
    """rspamd's ``local.d`` files (name -> content): the proxy worker as port 25's milter on
    ``spam_milter`` (a ``unix:`` socket under ``postfix_queue_dir``, mode 0660, or loopback TCP),
    scanning by itself (no normal worker), the controller on ``controller``, the
    Authentication-Results and X-Spam-Status headers for every message, and the baseline actions
    (``junk_score``: "X-Spam: Yes"; ``reject_score``: 5xx), with no greylisting, and the state's
    policies pi-pull writes under ``spam_dir`` (``<root>/spam``: actions.inc, settings.inc)."""
    if not 0 < junk_score < reject_score <= MAX_RSPAMD_SCORE:
        raise InvalidInput(
            f"junk_score must be above 0 and below reject_score (at most {MAX_RSPAMD_SCORE:g}).", field="junk_score"
        )
    variables = {
        "milter_bind": _milter_bind(spam_milter, postfix_queue_dir),
        "controller_bind": _spam_bind("spam_controller", controller),
        "junk_score": f"{junk_score:g}",
        "reject_score": f"{reject_score:g}",
        "spam_dir": _tls_path("spam_dir", spam_dir).rstrip("/"),
        "gtube_marker": GTUBE_MARKER,
        "gtube_score": f"{GTUBE_SCORE:g}",
    }
    return {name: render_template(template, **variables) for name, template in RSPAMD_LOCAL_D.items()}


def _milter_bind(spam_milter: str, postfix_queue_dir: str) -> str:
    """rspamd's bind_socket for the milter: the socket path with its mode, or loopback HOST:PORT."""
    path = spam_milter_socket(spam_milter, postfix_queue_dir)
    return _spam_bind("spam_milter", spam_milter) if path is None else f"{path} mode=0660 owner=_rspamd group=postfix"


def rspamd_learn_program(controller: str = SPAM_CONTROLLER) -> str:
    """The program IMAPSieve pipes a message to (``rspamd-learn spam|ham``): rspamc learn_spam or
    learn_ham on the controller at ``controller`` (loopback, which the controller trusts)."""
    return render_template("rspamd-learn.j2", controller=_spam_bind("spam_controller", controller))


def learn_sieves() -> dict[str, str]:
    """The IMAPSieve scripts (name -> content): learn-spam.sieve and learn-ham.sieve."""
    return {name: (NODE_TEMPLATES / template).read_text(encoding="utf-8") for name, template in LEARN_SIEVES.items()}


def policy_listen(policy_service: str) -> str:
    """The ini's ``[policy] listen`` for Postfix's ``inet:HOST:PORT``."""
    return policy_service.partition(":")[2]


DKIM_KEY_DIR = f"{ETC_DIR}/dkim"
OPENDKIM_CONF = "opendkim/opendkim.conf"


def opendkim_snippet(
    *,
    dkim_milter: str = DKIM_MILTER,
    key_dir: str = DKIM_KEY_DIR,
    pid_file: str = "/run/opendkim/opendkim.pid",
    user: str = "opendkim",
    syslog: bool = True,
    require_safe_keys: bool = True,
) -> str:
    """The bundle's opendkim.conf: a signing-only milter on ``dkim_milter`` (Postfix's form,
    ``inet:HOST:PORT`` or ``unix:PATH``) whose KeyTable and SigningTable pi-pull writes under
    ``key_dir`` (pi-pull/pipull/dkim.py). ``require_safe_keys=False`` only for keys under a
    world-writable directory such as /tmp (tests): OpenDKIM refuses those keys otherwise."""
    kind, _, where = dkim_milter.partition(":")
    if kind == "inet" and where.rpartition(":")[2].isdigit():
        host, _, port = where.rpartition(":")
        socket = f"inet:{port}@{host}"  # OpenDKIM spells it port@host
    elif kind == "unix" and where.startswith("/"):
        socket = f"local:{where}"
    else:
        raise InvalidInput("dkim_milter must be inet:HOST:PORT or unix:/PATH for OpenDKIM.", field="dkim_milter")
    if not key_dir.startswith("/"):
        raise InvalidInput("The DKIM key directory must be an absolute path.", field="key_dir")
    return render_template(
        "opendkim.conf.j2",
        socket=socket,
        key_dir=key_dir.rstrip("/"),
        pid_file=pid_file,
        user=user,
        syslog="yes" if syslog else "no",
        require_safe_keys=require_safe_keys,
    )


def build_pi_pull(agent_dir: Path | None = None) -> bytes:
    """The single-file node agent: a zipapp of ``<agent_dir>/pipull/*.py`` with a ``python3`` shebang.

    Deterministic: members are sorted, stored uncompressed, with a fixed timestamp and mode, so
    the same sources give the same bytes (bundles can be compared and diffed by checksum).
    """
    src = (agent_dir or AGENT_DIR) / AGENT_PACKAGE
    files = sorted(p for p in src.glob("*.py") if p.is_file())
    if not files:
        raise StoreError(f"the node agent's sources are missing ({src}); reinstall mailstate", code="store_error")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        members = [("__main__.py", _ZIP_MAIN)] + [(f"{AGENT_PACKAGE}/{p.name}", p.read_bytes()) for p in files]
        for name, data in members:
            info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
            info.external_attr = 0o644 << 16
            zf.writestr(info, data)
    out = io.BytesIO()
    buf.seek(0)
    zipapp.create_archive(buf, out, interpreter="/usr/bin/env python3")
    return out.getvalue()


def _normalise_signers(allowed_signers: str) -> str:
    lines = [line.strip() for line in allowed_signers.splitlines()]
    keys = [line for line in lines if line and not line.startswith("#")]
    if not keys:
        raise InvalidInput(
            "allowed_signers holds no key: a node must trust at least one signing key.", field="allowed_signers"
        )
    for line in keys:
        if parse_signers_line(line) is None:
            raise InvalidInput(f"Not an allowed_signers line: {line[:60]!r}.", field="allowed_signers")
    return "\n".join(line for line in lines if line) + "\n"


# The systemd units, shipped as they are.
UNIT_FILES = ("pi-pull.service", "pi-pull.timer", "pi-pull-follow.service", "pi-pull-policy.service")


@dataclass(frozen=True)
class BundleOptions:
    """A node's bundle beyond its name, its server and the keys it trusts; the defaults are the
    bundle ``mailstate node bundle`` writes when given no options.

    ``remote_url`` (any git URL, e.g. a git host) and ``report_url`` override where the node
    fetches and reports (by default ``<server_url>/v1/nodes/state.git`` and ``/v1/nodes/report``).
    ``mail_root``/``mail_uid``/``mail_gid`` are the state's settings (mailstate.yaml): install
    creates the mail root owned by them. ``tls_cert``/``tls_key`` (Postfix and Dovecot),
    ``submission_listen``/``smtps_listen`` (master.cf service names), ``imaps_port``,
    ``postfix_queue_dir`` (where Dovecot puts the auth socket) and ``dkim_milter`` configure
    sending; with a ``dkim_milter`` the bundle also ships ``opendkim/opendkim.conf`` and turns on
    pi-pull's ``[dkim]`` (keys under ``dkim_key_dir``, default /etc/pi-pull/dkim; a new key signs
    ``dkim_publish_wait`` seconds after it was reported; ``dkim_rotate_days``: 0 = rotate by hand).
    ``map_buckets`` None: the default for ``map_type``. ``spam_milter`` (``inet:127.0.0.1:PORT``;
    "" for none) filters port 25 with rspamd: the bundle then ships rspamd's ``local.d`` files (its
    controller on ``spam_controller``), the Junk script and pi-pull's ``[spam]``, which reports the
    filter's state and counters (docs/inbound.md). ``dnsbl_sites``/``dnsbl_threshold``: the DNS
    blocklists postscreen asks on port 25 and the score from which it refuses a client
    (compiler/postscreen.py; empty: none).
    """

    root: str = DEFAULT_ROOT
    remote_url: str | None = None
    report_url: str | None = None
    branch: str = "main"
    map_type: str = "hash"
    postfix_reload: str = "postfix reload"
    dovecot_reload: str = "doveadm reload"
    postmap: str = "postmap"
    lmtp_address: str = "127.0.0.1"
    lmtp_port: int = 24
    keep_releases: int = 5
    passwd_group: str = "dovecot"
    interval: int = 60
    quota: bool = True
    mail_root: str = "/var/vmail"
    mail_uid: int = 5000
    mail_gid: int = 5000
    tls_cert: str = TLS_CERT
    tls_key: str = TLS_KEY
    submission_listen: str = "submission"
    smtps_listen: str = "submissions"
    imaps_port: int = 993
    postfix_queue_dir: str = POSTFIX_QUEUE_DIR
    dkim_milter: str = DKIM_MILTER
    sieve_listen: str = SIEVE_LISTEN
    dkim_key_dir: str = ""
    dkim_publish_wait: int = 86400
    dkim_rotate_days: int = 0
    map_buckets: int | None = None
    policy_service: str = POLICY_SERVICE
    relay_port: int = FLEET_RELAY_PORT
    doveadm_port: int = FLEET_DOVEADM_PORT
    policy_port: int = FLEET_POLICY_PORT
    address: str | None = None
    spam_milter: str = SPAM_MILTER
    spam_controller: str = SPAM_CONTROLLER
    dnsbl_sites: tuple[str, ...] = DEFAULT_DNSBL_SITES
    dnsbl_threshold: int = DEFAULT_DNSBL_THRESHOLD


def render_node_bundle(
    node_name: str, server_url: str, allowed_signers: str, options: BundleOptions = BundleOptions()
) -> dict[str, str | bytes]:
    """Render node ``node_name``'s bundle: relative file name -> file content (``pi_pull.py`` is bytes).

    ``server_url`` is the mailstate server's base URL (``https://host[:port]``), which the node
    fetches from and reports to unless ``options`` say otherwise; with an empty ``server_url``
    there is no report URL unless one is given. ``allowed_signers`` is the text of the
    allowed_signers file the node will trust (e.g. the server's ``DIR/allowed_signers``).
    Bad arguments raise InvalidInput.
    """
    validate_node_name(node_name, field="node_name")
    remote, report = _bundle_urls(server_url, options)
    o = _checked_options(options)
    buckets = _map_buckets(o)
    files: dict[str, str | bytes] = {
        "pi-pull.ini": _pi_pull_ini(node_name, remote, report, o, buckets),
        "allowed_signers": _normalise_signers(allowed_signers),
        **{name: (NODE_TEMPLATES / name).read_text(encoding="utf-8") for name in UNIT_FILES},
        **_service_snippets(o, buckets),
        "postfix/main.cf.base": render_template("postfix-main.cf.base.j2", node_name=node_name),
        "pi_pull.py": build_pi_pull(),
    }
    if o.dkim_milter:
        files[OPENDKIM_CONF] = opendkim_snippet(dkim_milter=o.dkim_milter, key_dir=o.dkim_key_dir or DKIM_KEY_DIR)
    files.update(_spam_files(o))
    files[MANIFEST_NAME] = bundle_manifest(
        node_name,
        files,
        mail_root=o.mail_root,
        mail_uid=o.mail_uid,
        mail_gid=o.mail_gid,
        tls=(_tls_path("tls_cert", o.tls_cert), _tls_path("tls_key", o.tls_key)),
        address=o.address,
        milter_socket=spam_milter_socket(o.spam_milter, o.postfix_queue_dir) if o.spam_milter else None,
    )
    return files


def _spam_files(o: BundleOptions) -> dict[str, str]:
    """rspamd's local.d files and the Junk script (none without a spam milter)."""
    if not o.spam_milter:
        return {}
    files = {f"{RSPAMD_BUNDLE_DIR}/{name}": content for name, content in rspamd_snippets(
        o.spam_milter, o.spam_controller, spam_dir=f"{o.root}/spam", postfix_queue_dir=o.postfix_queue_dir
    ).items()}  # fmt: skip
    files["junk.sieve"] = (NODE_TEMPLATES / "mailstate-junk.sieve").read_text(encoding="utf-8")
    files.update(learn_sieves())
    files[f"sieve-pipe/{LEARN_PROGRAM}"] = rspamd_learn_program(o.spam_controller)
    return files


def _bundle_urls(server_url: str, o: BundleOptions) -> tuple[str, str]:
    """(the git remote, the report URL) the node uses."""
    base = server_url.rstrip("/")
    if base and not base.lower().startswith(("http://", "https://")):
        raise InvalidInput("The server URL must start with http:// or https://.", field="server_url")
    remote = o.remote_url or (f"{base}/v1/nodes/state.git" if base else "")
    if not remote:
        raise InvalidInput("Either a server URL or a remote URL is needed.", field="server_url")
    report = o.report_url if o.report_url is not None else (f"{base}/v1/nodes/report" if base else "")
    return remote, report


def _checked_options(o: BundleOptions) -> BundleOptions:
    """`o` with its paths normalised; InvalidInput for a bad value."""
    if not o.root.startswith("/"):
        raise InvalidInput("The node's root must be an absolute path.", field="root")
    if not o.mail_root.startswith("/") or not _SAFE_VALUE.match(o.mail_root):
        raise InvalidInput("The mail root must be an absolute path.", field="mail_root")
    for key, value in (("mail_uid", o.mail_uid), ("mail_gid", o.mail_gid)):
        if not isinstance(value, int) or value < 1:
            raise InvalidInput(f"{key} must be a positive number (never root).", field=key)
    ports = (("relay_port", o.relay_port), ("doveadm_port", o.doveadm_port), ("policy_port", o.policy_port))
    for key, value in ports:
        if not isinstance(value, int) or not 1 <= value <= 65535:
            raise InvalidInput(f"{key} must be a port number (1-65535).", field=key)
    if o.dkim_milter and (int(o.dkim_publish_wait) < 0 or int(o.dkim_rotate_days) < 0):
        raise InvalidInput("dkim_publish_wait and dkim_rotate_days must be >= 0.", field="dkim_publish_wait")
    return replace(o, root=o.root.rstrip("/") or "/", mail_root=o.mail_root.rstrip("/") or "/")


def _map_buckets(o: BundleOptions) -> int:
    """The tables per map: ``o.map_buckets``, or the default for ``o.map_type``."""
    map_buckets = o.map_buckets
    if map_buckets is None:
        map_buckets = DEFAULT_MAP_BUCKETS if o.map_type in BUCKETED_MAP_TYPES else 0
    if not 0 <= int(map_buckets) <= 256:
        raise InvalidInput("map_buckets must be between 0 and 256.", field="map_buckets")
    if int(map_buckets) and o.map_type not in BUCKETED_MAP_TYPES:
        raise InvalidInput(
            "map_buckets needs map_type hash, btree or lmdb (postmap -i updates them in place).", field="map_buckets"
        )
    return int(map_buckets)


def _pi_pull_ini(node_name: str, remote: str, report: str, o: BundleOptions, map_buckets: int) -> str:
    ini = render_template(
        "pi-pull.ini.j2",
        relay_port=o.relay_port,
        doveadm_port=o.doveadm_port,
        policy_port=o.policy_port,
        tls_cert=o.tls_cert,
        tls_key=o.tls_key,
        map_buckets=map_buckets,
        node_name=node_name,
        remote_url=remote,
        branch=o.branch,
        send_credentials=True if remote.lower().startswith(("http://", "https://")) else None,
        sync_key_file=SYNC_KEY_FILE,
        allowed_signers_file=ALLOWED_SIGNERS_FILE,
        root=o.root,
        keep_releases=int(o.keep_releases),
        passwd_group=o.passwd_group,
        report_url=report,
        postfix_reload=o.postfix_reload,
        dovecot_reload=o.dovecot_reload,
        map_type=o.map_type,
        postmap=o.postmap,
        interval=int(o.interval),
        mail_root=o.mail_root,
        mail_uid=int(o.mail_uid),
        mail_gid=int(o.mail_gid),
        policy_listen=policy_listen(o.policy_service) if o.policy_service else policy_listen(POLICY_SERVICE),
    )
    if o.dkim_milter:
        # pi-pull.ini's [dkim]: this node's keys and OpenDKIM's tables (pi-pull/pipull/dkim.py).
        ini += render_template(
            "pi-pull-dkim.ini.j2",
            key_dir=(o.dkim_key_dir or DKIM_KEY_DIR).rstrip("/"),
            publish_wait=int(o.dkim_publish_wait),
            rotate_days=int(o.dkim_rotate_days),
        )
    if o.spam_milter:
        ini += render_template("pi-pull-spam.ini.j2", controller=_spam_bind("spam_controller", o.spam_controller))
    return ini


def _service_snippets(o: BundleOptions, map_buckets: int) -> dict[str, str]:
    """Dovecot's and Postfix's configuration snippets."""
    return {
        "dovecot/conf.d/90-mailstate.conf": dovecot_snippet(
            o.root,
            lmtp_address=o.lmtp_address,
            lmtp_port=o.lmtp_port,
            quota=o.quota,
            tls_cert=o.tls_cert,
            tls_key=o.tls_key,
            imaps_port=o.imaps_port,
            postfix_queue_dir=o.postfix_queue_dir,
            map_buckets=map_buckets,
            sieve_submission=o.sieve_listen,
            junk_sieve=JUNK_SIEVE if o.spam_milter else "",
            learn_dir=LEARN_DIR if o.spam_milter else "",
            sieve_pipe_dir=SIEVE_PIPE_DIR if o.spam_milter else "",
        ),
        "postfix/main.cf.mailstate": postfix_snippet(
            o.root,
            map_type=o.map_type,
            lmtp_address=o.lmtp_address,
            lmtp_port=o.lmtp_port,
            tls_cert=o.tls_cert,
            tls_key=o.tls_key,
            map_buckets=map_buckets,
            spam_milter=o.spam_milter,
            dnsbl_sites=o.dnsbl_sites,
            dnsbl_threshold=o.dnsbl_threshold,
        ),
        "postfix/master.cf.mailstate": postfix_master_snippet(
            submission_listen=o.submission_listen,
            smtps_listen=o.smtps_listen,
            dkim_milter=o.dkim_milter,
            sieve_listen=o.sieve_listen,
            policy_service=o.policy_service,
            relay_listen=str(int(o.relay_port)),
            root=o.root,
            map_type=o.map_type,
            tls_cert=o.tls_cert,
            tls_key=o.tls_key,
            rewrite_gtube=bool(o.spam_milter),
        ),
    }


def bundle_manifest(
    node_name: str,
    files: dict[str, str | bytes],
    *,
    mail_root: str,
    mail_uid: int,
    mail_gid: int,
    tls: tuple[str, str] = (TLS_CERT, TLS_KEY),
    address: str | None = None,
    milter_socket: str | None = None,
) -> str:
    """``bundle.json``: what `pi_pull.py install` installs where (pi-pull/pipull/install.py reads it).

    ``files``: each bundle file with its install directory (a key of ``dirs``, overridable by an
    install option), its name under it and its mode. ``relocate``: files that name the default
    directories and are rewritten when install is given other ones (the Postfix and Dovecot
    snippets name the TLS files, which live under the etc directory by default). ``tls``: where
    install puts the node's certificate and key (ACME or self-signed, pi-pull/pipull/certs.py).
    ``sha256`` lets install refuse a damaged or partly copied bundle.
    """

    def sha(content: str | bytes) -> str:
        return hashlib.sha256(content.encode("utf-8") if isinstance(content, str) else content).hexdigest()

    rspamd = sorted(f for f in files if f.startswith(RSPAMD_BUNDLE_DIR + "/"))
    installed = [*_INSTALLED_FILES, *((f, "rspamd_dir", f"local.d/{f.rpartition('/')[2]}", 0o644) for f in rspamd)]
    for name in ("junk.sieve", *LEARN_SIEVES):
        if name in files:
            installed.append((name, "etc_dir", name, 0o644))
    if f"sieve-pipe/{LEARN_PROGRAM}" in files:
        installed.append((f"sieve-pipe/{LEARN_PROGRAM}", "lib_dir", f"sieve-pipe/{LEARN_PROGRAM}", 0o755))
    manifest = {
        "format": MANIFEST_FORMAT,
        "node": node_name,
        "dirs": INSTALL_DIRS,
        "files": [{"file": f, "dir": d, "name": n, "mode": f"{m:04o}"} for f, d, n, m in installed],
        "relocate": list(RELOCATED),
        "tls": {"cert": tls[0], "key": tls[1]},
        "sync_key": {"dir": "etc_dir", "name": "sync_key", "mode": "0600"},
        "postfix": {
            "main_cf": "postfix/main.cf.mailstate",
            "main_cf_base": "postfix/main.cf.base",
            "master_cf": "postfix/master.cf.mailstate",
        },
        "dovecot": {"snippet": "conf.d/90-mailstate.conf", "disable_auth_system": True},
        "mail_root": {"path": mail_root, "uid": mail_uid, "gid": mail_gid, "mode": "0750"},
        "units": {
            "service": "pi-pull.service",
            "timer": "pi-pull.timer",
            "follow": "pi-pull-follow.service",
            "policy": "pi-pull-policy.service",
        },
        "sha256": {name: sha(content) for name, content in sorted(files.items())},
    }
    if address is not None:
        # Where the other nodes of a fleet reach this one (add-node's address): a self-signed
        # certificate install makes names it too, since they verify the name (docs/fleet.md).
        manifest["address"] = address
    if rspamd:
        # rspamd's local.d files (install keeps any it replaces, checks them with `rspamadm configtest`
        # and restarts rspamd when they changed).
        spam: dict[str, object] = {"local_d": [f.rpartition("/")[2] for f in rspamd]}
        if milter_socket:
            # port 25's milter socket: install makes its directory (_rspamd, group postfix, setgid).
            spam["milter_dir"] = milter_socket.rpartition("/")[0]
        manifest["rspamd"] = spam
    if OPENDKIM_CONF in files:
        # Installed as opendkim.conf beside the postfix dir (/etc/opendkim.conf), the original kept;
        # it names its tables under the etc dir, so install relocates it as it does pi-pull.ini.
        manifest["opendkim"] = {"conf": OPENDKIM_CONF, "name": "opendkim.conf"}
        manifest["relocate"] = [*RELOCATED, OPENDKIM_CONF]
    return json.dumps(manifest, indent=2, sort_keys=True) + "\n"
