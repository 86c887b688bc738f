"""The node bundle: deterministic, units valid, ini parses and points at the right files."""

from __future__ import annotations

import configparser
import grp
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jinja2
import pytest

from mailstate.compiler.node_bundle import (
    GTUBE,
    GTUBE_MARKER,
    GTUBE_SCORE,
    INSTALL_PATHS,
    MAX_RSPAMD_SCORE,
    RSPAMD_LOCAL_D,
    SYNC_KEY_FILE,
    BundleOptions,
    build_pi_pull,
    render_node_bundle,
    render_template,
)
from mailstate.state.errors import InvalidInput
from mailstate.state.spam import MAX_SCORE
from tests.helpers.mailnode import AGENT_DIR, age_file, require_binaries

SIGNERS = 'mailstate namespaces="git" ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHcQ0gX0m8c4n3dK5u6a0b2c3d4e5f6a7b8c9d0e1f2a3b4 mailstate\n'
EXPECTED_FILES = {
    "pi-pull.ini",
    "allowed_signers",
    "pi-pull.service",
    "pi-pull.timer",
    "pi-pull-follow.service",  # follow mode, the timer beside it as the fallback
    "pi-pull-policy.service",  # the outbound policy service the submission services ask
    "dovecot/conf.d/90-mailstate.conf",
    "postfix/main.cf.mailstate",
    "postfix/master.cf.mailstate",
    "opendkim/opendkim.conf",  # the DKIM signer (pi-pull/pipull/dkim.py writes its tables)
    # rspamd, port 25's milter (docs/inbound.md)
    "rspamd/local.d/worker-proxy.inc",
    "rspamd/local.d/worker-normal.inc",
    "rspamd/local.d/worker-controller.inc",
    "rspamd/local.d/milter_headers.conf",
    "rspamd/local.d/actions.conf",
    "rspamd/local.d/settings.conf",  # includes the state's policies pi-pull writes
    "rspamd/local.d/classifier-bayes.conf",  # Bayes in SQLite, which the learn scripts teach
    "rspamd/local.d/regexp.conf",  # MAILSTATE_GTUBE: port 25's GTUBE marker scored as certain spam
    "junk.sieve",  # Dovecot's sieve_before: what rspamd marked as spam into Junk
    "learn-spam.sieve",  # IMAPSieve: a move into Junk teaches rspamd spam
    "learn-ham.sieve",  # ... and a move out of it (not into Trash) ham
    "sieve-pipe/rspamd-learn",  # the program they pipe the message to (rspamc learn_spam / learn_ham)
    "pi_pull.py",
    "postfix/main.cf.base",
    "bundle.json",
}


def bundle(node_name: str = "pi-01", server_url: str = "https://mail.example.net", **options: Any) -> dict[str, Any]:
    """The bundle for pi-01 (values are str, except pi_pull.py: bytes)."""
    return render_node_bundle(node_name, server_url, options.pop("allowed_signers", SIGNERS), BundleOptions(**options))


def parse_unit(text: str) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(interpolation=None, strict=True)
    cp.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    cp.read_string(text)
    return cp


def test_bundle_is_deterministic_and_complete() -> None:
    a, b = bundle(), bundle()
    assert a == b
    assert set(a) == EXPECTED_FILES
    assert set(INSTALL_PATHS) == EXPECTED_FILES
    assert a["pi_pull.py"] == build_pi_pull()
    assert a["allowed_signers"] == SIGNERS
    assert bundle(node_name="pi-02") != a


def test_sync_key_is_not_in_the_bundle() -> None:
    b = bundle()
    cp = configparser.ConfigParser(interpolation=None)
    cp.read_string(b["pi-pull.ini"])
    assert cp.get("node", "sync_key_file") == SYNC_KEY_FILE == "/etc/pi-pull/sync_key"
    assert not any(cp.has_option(s, "sync_key") for s in cp.sections())


def test_ini_points_at_the_right_files() -> None:
    b = bundle(root="/srv/pi-pull")
    cp = configparser.ConfigParser(interpolation=None)
    cp.read_string(b["pi-pull.ini"])
    assert cp.get("remote", "url") == "https://mail.example.net/v1/nodes/state.git"
    assert cp.get("remote", "branch") == "main"
    assert cp.getboolean("remote", "send_credentials") is True
    assert cp.get("node", "name") == "pi-01"
    assert cp.get("node", "allowed_signers") == INSTALL_PATHS["allowed_signers"]
    assert cp.get("paths", "root") == "/srv/pi-pull"
    assert cp.get("report", "url") == "https://mail.example.net/v1/nodes/report"
    assert cp.get("services", "map_type") == "hash"
    assert cp.get("services", "postfix_reload") == "postfix reload"
    assert cp.get("services", "dovecot_reload") == "doveadm reload"
    # a new bundle has the bucketed layout (16 tables a map, passwd.d/<c>/<bb>/<domain>: pipull/buckets.py)
    assert cp.get("services", "map_buckets") == "16"
    assert "/srv/pi-pull/current/dovecot/passwd.d/%1d/%2d/%d\n" in b["dovecot/conf.d/90-mailstate.conf"]
    tables = ", ".join(f"hash:/srv/pi-pull/current/postfix/virtual_mailbox_maps.{k:02x}" for k in range(16))
    assert f"virtual_mailbox_maps = {tables}\n" in b["postfix/main.cf.mailstate"]


def test_one_table_layout_on_request_and_for_types_postmap_cannot_update() -> None:
    for b, map_type in (
        (bundle(root="/srv/pi-pull", map_buckets=0), "hash"),
        (bundle(root="/srv/pi-pull", map_type="cdb"), "cdb"),
    ):
        cp = configparser.ConfigParser(interpolation=None)
        cp.read_string(b["pi-pull.ini"])
        assert cp.get("services", "map_buckets") == "0" and cp.get("services", "map_type") == map_type
        assert "/srv/pi-pull/current/dovecot/passwd.d/%d\n" in b["dovecot/conf.d/90-mailstate.conf"]
        assert (
            f"virtual_mailbox_maps = {map_type}:/srv/pi-pull/current/postfix/virtual_mailbox_maps\n"
            in b["postfix/main.cf.mailstate"]
        )
    with pytest.raises(InvalidInput, match="map_buckets needs"):
        bundle(map_type="cdb", map_buckets=16)


@pytest.mark.e2e
def test_pi_pull_is_built_deterministically_from_the_package(tmp_path: Path, pi_pull: Path) -> None:
    """Same sources, same bytes (fixed timestamps/order); a changed source changes the file."""
    first = build_pi_pull(AGENT_DIR)
    assert first == build_pi_pull(AGENT_DIR) == pi_pull.read_bytes()
    copy = tmp_path / "agent"
    shutil.copytree(AGENT_DIR / "pipull", copy / "pipull", ignore=shutil.ignore_patterns("__pycache__"))
    for f in (copy / "pipull").iterdir():
        os.utime(f, (0, 0))
    assert build_pi_pull(copy) == first
    (copy / "pipull" / "errors.py").write_text((copy / "pipull" / "errors.py").read_text() + "\n# changed\n")
    assert build_pi_pull(copy) != first
    r = subprocess.run([sys.executable, "-I", "-S", str(pi_pull), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "exit codes:" in r.stdout


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"node_name": "bad name"}, "node_name"),
        ({"server_url": "ftp://x"}, "server_url"),
        ({"server_url": ""}, "server_url"),
        ({"root": "relative"}, "root"),
        ({"allowed_signers": "# nothing\n"}, "allowed_signers"),
        ({"allowed_signers": "not a key\n"}, "allowed_signers"),
        ({"postfix_reload": "a\nb"}, "postfix_reload"),
        ({"policy_port": 0}, "policy_port"),
        ({"policy_port": 70000}, "policy_port"),
    ],
)
def test_bad_arguments_are_invalid_input(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidInput) as exc:
        bundle(**kwargs)
    assert exc.value.field == field and exc.value.message.endswith(".")


def test_ini_is_accepted_by_pi_pull(tmp_path: Path, pipull: Any) -> None:
    try:
        grp.getgrnam("dovecot")
    except KeyError:
        pytest.skip("the bundle's passwd_group is dovecot, which is not installed here")
    path = tmp_path / "pi-pull.ini"
    path.write_text(bundle(map_type="lmdb")["pi-pull.ini"])
    cfg = pipull.config.load_config(str(path))
    assert cfg.remote_is_http and cfg.send_credentials and cfg.needs_key
    assert cfg.sync_key_file == SYNC_KEY_FILE and cfg.allowed_signers == INSTALL_PATHS["allowed_signers"]
    assert cfg.root == "/var/lib/pi-pull" and cfg.map_type == "lmdb" and cfg.passwd_group == "dovecot"
    # The fleet's policy port and the key the policy service presents to the other nodes.
    assert (cfg.fleet_policy_port, cfg.fleet_tls_key) == (10041, "/etc/pi-pull/tls/privkey.pem")
    path.write_text(bundle(policy_port=11041, tls_key="/etc/ssl/private/node.key")["pi-pull.ini"])
    cfg = pipull.config.load_config(str(path))
    assert (cfg.fleet_policy_port, cfg.fleet_tls_key) == (11041, "/etc/ssl/private/node.key")


def test_git_host_remote_without_server() -> None:
    b = bundle(server_url="", remote_url="git@git.example.net:ops/mailstate.git")
    cp = configparser.ConfigParser(interpolation=None)
    cp.read_string(b["pi-pull.ini"])
    assert cp.get("remote", "url") == "git@git.example.net:ops/mailstate.git"
    assert not cp.has_option("remote", "send_credentials")
    assert cp.get("report", "url") == ""


def test_service_unit() -> None:
    unit = parse_unit(bundle()["pi-pull.service"])
    svc = unit["Service"]
    assert svc["Type"] == "oneshot"  # a oneshot unit never overlaps itself
    assert svc["ExecStart"].split() == [
        "/usr/bin/python3",
        INSTALL_PATHS["pi_pull.py"],
        "--config",
        INSTALL_PATHS["pi-pull.ini"],
        "--once",
    ]
    assert svc["SuccessExitStatus"] == "4"
    assert "network-online.target" in unit["Unit"]["After"]


def test_timer_unit() -> None:
    unit = parse_unit(bundle()["pi-pull.timer"])
    timer = unit["Timer"]
    assert timer.get("OnCalendar") == "*-*-* *:*:00" or timer.get("OnUnitActiveSec") in ("60s", "1min")
    assert timer["RandomizedDelaySec"].rstrip("s").isdigit() and int(timer["RandomizedDelaySec"].rstrip("s")) > 0
    assert timer["Unit"] == "pi-pull.service"
    assert unit["Install"]["WantedBy"] == "timers.target"


def test_templates_use_strict_undefined() -> None:
    with pytest.raises(jinja2.UndefinedError):
        render_template("postfix-main.cf.j2", root="/var/lib/pi-pull")


@pytest.mark.e2e
def test_dovecot_snippet_is_valid_dovecot_config(tmp_path: Path) -> None:
    require_binaries("doveconf")
    conf = tmp_path / "dovecot.conf"
    conf.write_text(
        f"base_dir = {tmp_path}/run\nprotocols = imap lmtp\nssl = no\n"
        + bundle(root="/srv/node", lmtp_port=2424)["dovecot/conf.d/90-mailstate.conf"]
    )
    r = subprocess.run(["doveconf", "-c", str(conf), "-n"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "args = scheme=BLF-CRYPT username_format=%u /srv/node/current/dovecot/passwd.d/%1d/%2d/%d\n" in r.stdout
    assert "port = 2424" in r.stdout


@pytest.mark.e2e
def test_postfix_snippet_is_valid_postfix_config(tmp_path: Path) -> None:
    require_binaries("postconf")
    (tmp_path / "main.cf").write_text(
        "compatibility_level = 3.6\n"
        + bundle(root="/srv/node", map_type="lmdb", lmtp_port=2424)["postfix/main.cf.mailstate"]
    )
    age_file(tmp_path / "main.cf")
    r = subprocess.run(
        ["postconf", "-c", str(tmp_path), "-n", "virtual_mailbox_domains", "virtual_mailbox_maps", "virtual_transport"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "virtual_mailbox_domains = "
        + ", ".join(f"lmdb:/srv/node/current/postfix/virtual_mailbox_domains.{k:02x}" for k in range(16)),
        "virtual_mailbox_maps = "
        + ", ".join(f"lmdb:/srv/node/current/postfix/virtual_mailbox_maps.{k:02x}" for k in range(16)),
        "virtual_transport = lmtp:inet:127.0.0.1:2424",
    ]


@pytest.mark.e2e
def test_dovecot_user_unknown_during_a_swap_is_a_retry_not_a_bounce(tmp_path: Path) -> None:
    """The snippet's lmtp_delivery_status_filter, through the real postconf and postmap: Dovecot's
    550 5.1.1 "User doesn't exist" (only ever the moment before it re-reads a swapped passwd-file)
    becomes 4.1.1, so Postfix queues the mail instead of bouncing it; other 5xx stay 5xx."""
    require_binaries("postconf", "postmap")
    (tmp_path / "main.cf").write_text(
        "compatibility_level = 3.6\n" + bundle(root="/srv/node")["postfix/main.cf.mailstate"]
    )
    age_file(tmp_path / "main.cf")
    r = subprocess.run(
        ["postconf", "-c", str(tmp_path), "-x", "-h", "lmtp_delivery_status_filter"], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    table = r.stdout.strip()
    assert table.startswith("regexp:{")

    def filtered(status: str) -> str | None:
        q = subprocess.run(["postmap", "-c", str(tmp_path), "-q", status, table], capture_output=True, text=True)
        assert q.returncode in (0, 1), q.stderr
        return q.stdout.strip() if q.returncode == 0 else None

    race = (
        "5.1.1 host 127.0.0.1[127.0.0.1] said: 550 5.1.1 <new@example.com> User doesn't exist: new@example.com"
        " (in reply to RCPT TO command)"
    )
    assert filtered(race) == "4" + race[1:]
    assert (
        filtered(
            "5.2.2 host 127.0.0.1[127.0.0.1] said: 552 5.2.2 <a@example.com> Quota exceeded (mailbox for user is full)"
        )
        is None
    )
    assert filtered("4.1.1 host 127.0.0.1[127.0.0.1] said: 451 4.3.0 Temporary internal error") is None


@pytest.mark.e2e
def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    b = bundle()
    units = ("pi-pull.service", "pi-pull.timer", "pi-pull-follow.service", "pi-pull-policy.service")
    for name in units:
        (tmp_path / name).write_text(b[name])
    r = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *(f"./{name}" for name in units)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    complaints = [line for line in (r.stdout + r.stderr).splitlines() if "pi-pull." in line]
    assert r.returncode == 0 and not complaints, r.stdout + r.stderr


@pytest.mark.e2e
def test_sending_snippets_pass_postconf_and_doveconf(tmp_path: Path) -> None:
    """main.cf + master.cf.mailstate through the real postconf (as `postconf -M -e` sets them),
    the Dovecot snippet through doveconf: TLS paths, SASL via Dovecot, no AUTH on port 25, the
    submission services' restrictions, and IMAP only over TLS."""
    require_binaries("postconf", "doveconf")
    b = bundle(
        root="/srv/node",
        tls_cert="/srv/tls/cert.pem",
        tls_key="/srv/tls/key.pem",
        imaps_port=1993,
        postfix_queue_dir="/srv/spool/postfix",
    )
    (tmp_path / "main.cf").write_text("compatibility_level = 3.6\n" + b["postfix/main.cf.mailstate"])
    (tmp_path / "master.cf").write_text("smtp inet n - y - - smtpd\n")
    entries = [line for line in b["postfix/master.cf.mailstate"].splitlines() if line and not line.startswith("#")]
    # Port 25's postscreen with its pass service and helpers (docs/inbound.md), the submission
    # services, Sieve's loopback service, then the fleet's relay transport and relay listener
    # (docs/fleet.md).
    assert [e.split(" = ")[0] for e in entries] == [
        "smtp/inet", "smtpd/pass", "dnsblog/unix", "tlsproxy/unix", "cleanup-inbound/unix",
        "submission/inet", "submissions/inet", "127.0.0.1:10026/inet", "fleet/unix", "2525/inet",
    ]  # fmt: skip
    r = subprocess.run(["postconf", "-c", str(tmp_path), "-M", "-e", *entries], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    age_file(tmp_path / "main.cf")
    age_file(tmp_path / "master.cf")
    r = subprocess.run(["postconf", "-c", str(tmp_path), "-n"], capture_output=True, text=True)
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr
    conf = {k.strip(): v.strip() for k, _, v in (line.partition("=") for line in r.stdout.splitlines())}
    assert conf["smtpd_tls_cert_file"] == "/srv/tls/cert.pem" and conf["smtpd_tls_key_file"] == "/srv/tls/key.pem"
    assert conf["smtpd_sasl_type"] == "dovecot" and conf["smtpd_sasl_path"] == "private/auth"
    assert conf["smtpd_sasl_auth_enable"] == "no" and conf["smtpd_tls_auth_only"] == "yes"
    assert conf["smtpd_sender_login_maps"] == ", ".join(
        f"hash:/srv/node/current/postfix/sender_login_maps.{k:02x}" for k in range(16)
    )
    r = subprocess.run(["postconf", "-c", str(tmp_path), "-P"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    params = set(r.stdout.splitlines())
    for svc in ("submission/inet", "submissions/inet"):
        assert f"{svc}/smtpd_sasl_auth_enable = yes" in params
        assert f"{svc}/smtpd_relay_restrictions = permit_sasl_authenticated,reject" in params
        assert (
            f"{svc}/smtpd_sender_restrictions = reject_sender_login_mismatch,permit_sasl_authenticated,reject" in params
        )
        assert (
            f"{svc}/smtpd_milters = inet:127.0.0.1:8891" in params
            and f"{svc}/milter_default_action = tempfail" in params
        )
    assert "submission/inet/smtpd_tls_security_level = encrypt" in params
    assert "fleet/unix/smtp_tls_policy_maps = hash:/srv/node/fleet/tls_policy" in params
    assert "2525/inet/smtpd_client_restrictions = check_ccert_access,hash:/srv/node/fleet/ccerts,reject" in params
    assert "2525/inet/receive_override_options = no_address_mappings,no_milters" in params
    assert "submissions/inet/smtpd_tls_wrappermode = yes" in params
    # port 25 (postscreen, then smtpd pass): main.cf's milter and no SASL; only its own cleanup (GTUBE)
    port_25 = {p for p in params if p.startswith(("smtp/inet/", "smtpd/pass/"))}
    assert port_25 == {"smtpd/pass/cleanup_service_name = cleanup-inbound"}
    m = subprocess.run(["postconf", "-c", str(tmp_path), "-M", "submission/inet"], capture_output=True, text=True)
    assert m.stdout.split()[:8] == ["submission", "inet", "n", "-", "n", "-", "-", "smtpd"], m.stdout  # chroot n

    conf_d = tmp_path / "dovecot.conf"
    conf_d.write_text(f"base_dir = {tmp_path}/run\nprotocols = imap lmtp\n" + b["dovecot/conf.d/90-mailstate.conf"])
    r = subprocess.run(["doveconf", "-c", str(conf_d), "-n"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    dv = r.stdout
    assert "ssl = required" in dv and "ssl_cert = </srv/tls/cert.pem" in dv
    assert "unix_listener /srv/spool/postfix/private/auth {" in dv and "port = 1993" in dv
    for key in ("ssl", "disable_plaintext_auth"):
        one = subprocess.run(["doveconf", "-c", str(conf_d), "-h", key], capture_output=True, text=True)
        assert one.stdout.strip() in ("required", "yes"), (key, one.stdout)
    # The fleet's proxy passdb first (a login for a domain homed elsewhere goes to the home, which
    # checks every password), then owners' (docs/owners.md) 20 app-password passdbs before the
    # mailbox's own, each mailbox's script from the node's sieve/ dir, Sieve on delivery with our
    # extensions only, and replies handed to the loopback service below.
    passdbs = re.findall(r"passdb \{\n(.*?)\n\}", dv, re.S)
    # ... and the fleet's proxy passdb (docs/fleet.md)
    assert len(passdbs) == 22 and sum("/srv/node/current/dovecot/passwd.d/" in p for p in passdbs) == 1
    assert sum("/srv/node/current/dovecot/proxy.%s" in p for p in passdbs) == 1
    raw = b["dovecot/conf.d/90-mailstate.conf"]  # the order Dovecot tries them (doveconf -n sorts names)
    assert raw.index("/current/dovecot/proxy.%s") < raw.index("name = mailstate-app-00")
    assert raw.index("name = mailstate-app-19") < raw.index(
        "args = scheme=BLF-CRYPT username_format=%u /srv/node/current"
    )
    assert "username_format=%u/%s/00/%{sha256;truncate=16:password} /srv/node/app-passwords/%d" in dv
    assert (
        "override_fields = sieve=file:/srv/node/sieve/%d/%n.sieve;bindir=~/.mailstate-sieve sieve_user_log=~/.mailstate-sieve.log"
        in dv
    )
    assert "sieve_extensions = fileinto mailbox imap4flags vacation date relational envelope" in dv
    assert "submission_host = 127.0.0.1:10026" in dv and 'mail_plugins = " quota sieve"' in dv  # LMTP: quota and Sieve
    loop = "127.0.0.1:10026/inet"
    for param in (
        "smtpd_milters = inet:127.0.0.1:8891",
        "smtpd_sasl_auth_enable = no",
        "smtpd_relay_restrictions = permit_mynetworks,reject",
        "mynetworks = 127.0.0.0/8,[::1]/128",
    ):
        assert f"{loop}/{param}" in params, param  # fmt: skip


def test_sending_options_refuse_bad_values() -> None:
    with pytest.raises(InvalidInput):
        bundle(tls_cert="relative/cert.pem")
    with pytest.raises(InvalidInput):
        bundle(submission_listen="587 inet")
    with pytest.raises(InvalidInput):
        bundle(dkim_milter="inet:127.0.0.1:8891 -o x=y")
    no_milter = bundle(dkim_milter="")["postfix/master.cf.mailstate"]
    # no milter on the submission services: not even port 25's spam milter of main.cf
    assert re.findall(r"-o smtpd_milters=(\S*)", no_milter) == ["", "", ""] and "ORIGINATING" in no_milter


def test_port_25_is_filtered_by_rspamd_and_only_port_25() -> None:
    b = bundle()
    main = b["postfix/main.cf.mailstate"]
    for line in (
        "smtpd_milters = unix:rspamd/milter.sock",  # a socket under the queue directory, not loopback TCP
        "non_smtpd_milters =",
        "milter_default_action = tempfail",  # rspamd down: 4xx, never unfiltered, never a bounce
    ):
        assert f"\n{line}\n" in main, line
    # the submission and Sieve services name their own milter (OpenDKIM), the fleet relay none
    master = b["postfix/master.cf.mailstate"]
    assert re.findall(r"-o smtpd_milters=(\S*)", master) == ["inet:127.0.0.1:8891"] * 3
    assert "receive_override_options=no_address_mappings,no_milters" in master
    bind = 'bind_socket = "/var/spool/postfix/rspamd/milter.sock mode=0660 owner=_rspamd group=postfix";'
    assert bind in b["rspamd/local.d/worker-proxy.inc"]
    assert "self_scan = yes;" in b["rspamd/local.d/worker-proxy.inc"]
    assert 'bind_socket = "127.0.0.1:11334";' in b["rspamd/local.d/worker-controller.inc"]
    assert "greylist = null;" in b["rspamd/local.d/actions.conf"]
    assert "skip_local = false;" in b["rspamd/local.d/milter_headers.conf"]
    assert '"/var/lib/pi-pull/spam/settings.inc"' in b["rspamd/local.d/settings.conf"]
    assert '"/var/lib/pi-pull/spam/actions.inc"' in b["rspamd/local.d/actions.conf"]
    assert "sieve_before = /etc/pi-pull/junk.sieve" in b["dovecot/conf.d/90-mailstate.conf"]
    cp = configparser.ConfigParser(interpolation=None)
    cp.read_string(b["pi-pull.ini"])
    assert cp.getboolean("spam", "enabled") and cp.get("spam", "controller") == "127.0.0.1:11334"
    manifest = json.loads(b["bundle.json"])
    assert manifest["rspamd"] == {"local_d": sorted(RSPAMD_LOCAL_D), "milter_dir": "/var/spool/postfix/rspamd"}
    assert {(f["file"], f["dir"], f["name"]) for f in manifest["files"] if f["dir"] == "rspamd_dir"} == {
        (f"rspamd/local.d/{n}", "rspamd_dir", f"local.d/{n}") for n in RSPAMD_LOCAL_D
    }


def test_moving_mail_into_or_out_of_junk_teaches_rspamd() -> None:
    b = bundle(spam_controller="inet:127.0.0.1:11444")
    dovecot = b["dovecot/conf.d/90-mailstate.conf"]
    for line in (
        "  mail_plugins = $mail_plugins imap_sieve",
        "  sieve_plugins = sieve_imapsieve sieve_extprograms",
        "  sieve_pipe_bin_dir = /usr/local/lib/pi-pull/sieve-pipe",
        "  imapsieve_mailbox1_name = Junk",
        "  imapsieve_mailbox1_causes = COPY",
        "  imapsieve_mailbox1_before = file:/etc/pi-pull/learn-spam.sieve",
        "  imapsieve_mailbox2_name = *",
        "  imapsieve_mailbox2_from = Junk",
        "  imapsieve_mailbox2_before = file:/etc/pi-pull/learn-ham.sieve",
    ):
        assert f"\n{line}\n" in dovecot, line
    # only global scripts may pipe: the mailboxes' own keep the compiler's extensions
    assert "  sieve_global_extensions = +vnd.dovecot.pipe " in dovecot
    assert "  sieve_extensions = fileinto mailbox imap4flags vacation date relational envelope\n" in dovecot
    assert 'pipe :copy :try "rspamd-learn" ["spam"];' in b["learn-spam.sieve"]
    assert 'if string :is "${mailbox}" "Trash"' in b["learn-ham.sieve"]
    program = b["sieve-pipe/rspamd-learn"]
    assert "rspamc -h 127.0.0.1:11444 -t 20 learn_spam" in program and "learn_ham" in program
    assert 'backend = "sqlite3";' in b["rspamd/local.d/classifier-bayes.conf"]
    files = {f["file"]: f for f in json.loads(b["bundle.json"])["files"]}
    assert files["sieve-pipe/rspamd-learn"] == {
        "file": "sieve-pipe/rspamd-learn", "dir": "lib_dir", "name": "sieve-pipe/rspamd-learn", "mode": "0755"
    }  # fmt: skip
    assert files["learn-spam.sieve"]["dir"] == files["learn-ham.sieve"]["dir"] == "etc_dir"
    with pytest.raises(InvalidInput):
        bundle(spam_controller="inet:10.0.0.5:11334")  # the controller, which trusts loopback, stays on it


def test_the_spam_milter_follows_the_queue_directory_or_takes_loopback_tcp() -> None:
    b = bundle(postfix_queue_dir="/srv/postfix-queue", spam_milter="unix:filters/rspamd.sock")
    assert "\nsmtpd_milters = unix:filters/rspamd.sock\n" in b["postfix/main.cf.mailstate"]
    assert 'bind_socket = "/srv/postfix-queue/filters/rspamd.sock mode=0660' in b["rspamd/local.d/worker-proxy.inc"]
    assert json.loads(b["bundle.json"])["rspamd"]["milter_dir"] == "/srv/postfix-queue/filters"
    tcp = bundle(spam_milter="inet:127.0.0.1:11332")
    assert "\nsmtpd_milters = inet:127.0.0.1:11332\n" in tcp["postfix/main.cf.mailstate"]
    assert 'bind_socket = "127.0.0.1:11332";' in tcp["rspamd/local.d/worker-proxy.inc"]
    assert "milter_dir" not in json.loads(tcp["bundle.json"])["rspamd"]  # nothing for install to make


def test_a_bundle_without_the_spam_milter_ships_no_rspamd() -> None:
    b = bundle(spam_milter="")
    assert not [f for f in b if f.startswith("rspamd/")] and "junk.sieve" not in b
    assert "learn-spam.sieve" not in b and "sieve-pipe/rspamd-learn" not in b
    assert "sieve_before" not in b["dovecot/conf.d/90-mailstate.conf"]
    assert "imapsieve" not in b["dovecot/conf.d/90-mailstate.conf"]
    assert "smtpd_milters" not in b["postfix/main.cf.mailstate"] and "[spam]" not in b["pi-pull.ini"]
    assert "rspamd" not in json.loads(b["bundle.json"])
    # nor port 25's GTUBE rewriting: a node that does not filter delivers the string as it came
    master = b["postfix/master.cf.mailstate"]
    assert "cleanup-inbound" not in master and "GTUBE" not in master
    assert "\nsmtpd/pass = smtpd pass - - n - - smtpd\n" in master


def test_rspamd_scores_the_gtube_marker_above_any_reject_score() -> None:
    """rspamd 3.4 refuses GTUBE before any policy; port 25 hands it the marker instead, which the
    bundle's MAILSTATE_GTUBE rule scores above any reject_score a policy or a bundle may set."""
    assert GTUBE_SCORE > MAX_RSPAMD_SCORE >= MAX_SCORE
    rule = bundle()["rspamd/local.d/regexp.conf"]
    assert "MAILSTATE_GTUBE {" in rule and f'  re = "/{GTUBE_MARKER}/{{mime}}";' in rule
    assert f"  score = {GTUBE_SCORE:g};" in rule


@pytest.mark.e2e
def test_only_port_25_rewrites_gtube_read_back_with_postconf(tmp_path: Path) -> None:
    """The bundle's master.cf entries through the real postconf and postmap: port 25's pass service,
    and no other, uses the cleanup whose body_checks turn GTUBE into the marker, the rest of the
    line kept; submission, Sieve and the fleet relay keep the default cleanup (GTUBE as sent)."""
    require_binaries("postconf", "postmap")
    b = bundle()
    (tmp_path / "main.cf").write_text("compatibility_level = 3.6\n" + b["postfix/main.cf.mailstate"])
    (tmp_path / "master.cf").write_bytes(Path("/usr/share/postfix/master.cf.dist").read_bytes())
    entries = [line for line in b["postfix/master.cf.mailstate"].splitlines() if line and not line.startswith("#")]
    r = subprocess.run(["postconf", "-c", str(tmp_path), "-M", "-e", *entries], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for name in ("main.cf", "master.cf"):
        age_file(tmp_path / name)
    r = subprocess.run(["postconf", "-c", str(tmp_path), "-Px"], capture_output=True, text=True)
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr
    params = {k.strip(): v.strip() for k, _, v in (line.partition(" =") for line in r.stdout.splitlines())}
    assert {k for k in params if k.endswith("/cleanup_service_name")} == {"smtpd/pass/cleanup_service_name"}
    assert params["smtpd/pass/cleanup_service_name"] == "cleanup-inbound"
    assert {k for k in params if k.endswith("/body_checks")} == {"cleanup-inbound/unix/body_checks"}
    m = subprocess.run(["postconf", "-c", str(tmp_path), "-M", "cleanup-inbound/unix"], capture_output=True, text=True)
    assert m.stdout.split()[:8] == ["cleanup-inbound", "unix", "n", "-", "n", "-", "0", "cleanup"], m.stdout
    table = params["cleanup-inbound/unix/body_checks"]
    cases = {
        f"Buy now {GTUBE} (a test)": f"REPLACE Buy now {GTUBE_MARKER} (a test)",
        GTUBE: f"REPLACE {GTUBE_MARKER}",
        f"{GTUBE} and again {GTUBE}": f"REPLACE {GTUBE_MARKER}",  # none left for rspamd's own reject
        GTUBE.lower(): "",  # rspamd's match is case-sensitive: so is this one
        "Nothing to see here": "",
    }
    for line, expected in cases.items():
        q = subprocess.run(["postmap", "-c", str(tmp_path), "-q", line, table], capture_output=True, text=True)
        assert q.stdout.strip() == expected and not q.stderr, (line, q.stdout, q.stderr)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"spam_milter": "inet:10.0.0.5:11332"},  # rspamd listens on loopback only
        {"spam_milter": "inet:127.0.0.1:11332 -o x=y"},
        {"spam_milter": "unix:/run/rspamd.sock"},  # absolute: not under the queue directory
        {"spam_milter": "unix:../rspamd.sock"},
        {"spam_milter": "unix:rspamd/milter.sock mode=0666"},
        {"spam_milter": "unix:"},
        {"spam_milter": "rspamd/milter.sock"},
        {"spam_milter": "inet:127.0.0.1:99999"},
        {"spam_controller": "0.0.0.0:11334"},
    ],
)
def test_spam_milter_options_refuse_bad_values(kwargs: dict[str, str]) -> None:
    with pytest.raises(InvalidInput):
        bundle(**kwargs)


@pytest.mark.e2e
def test_bundle_ships_opendkim_conf_that_opendkim_accepts_and_turns_on_dkim(tmp_path: Path) -> None:
    """The DKIM signer: opendkim.conf checked by the real `opendkim -n`; pi-pull.ini's [dkim] is on."""
    import json

    files = bundle()
    conf = str(files["opendkim/opendkim.conf"])
    assert "Socket\t\t\tinet:8891@127.0.0.1" in conf and "Mode\t\t\ts" in conf
    assert "KeyTable\t\tfile:/etc/pi-pull/dkim/KeyTable" in conf and "RequireSafeKeys" not in conf
    assert json.loads(str(files["bundle.json"]))["opendkim"] == {
        "conf": "opendkim/opendkim.conf",
        "name": "opendkim.conf",
    }
    ini = str(files["pi-pull.ini"])
    assert "\nenabled = yes\nkey_dir = /etc/pi-pull/dkim\n" in ini and "[dkim]" in ini and "publish_wait = 86400" in ini
    if shutil.which("opendkim") is None and not Path("/usr/sbin/opendkim").exists():
        if os.environ.get("CI") == "true":
            pytest.fail("opendkim is missing (apt-get install opendkim opendkim-tools)")
        pytest.skip("opendkim is missing")
    keys = tmp_path / "dkim"
    keys.mkdir()
    (keys / "KeyTable").write_text("")
    (keys / "SigningTable").write_text("")
    (tmp_path / "opendkim.conf").write_text(conf.replace("/etc/pi-pull/dkim", str(keys)))
    r = subprocess.run(["opendkim", "-n", "-x", str(tmp_path / "opendkim.conf")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    # Without a dkim milter there is no signer and no [dkim].
    plain = bundle(dkim_milter="")
    assert "opendkim/opendkim.conf" not in plain and "[dkim]" not in str(plain["pi-pull.ini"])


def test_cli_bundle_takes_the_tls_paths(data_dir: Any, tmp_path: Path) -> None:
    from mailstate.api.cli import main

    out = tmp_path / "bundle"
    assert (
        main(
            [
                "node",
                "bundle",
                "--data",
                str(data_dir.root),
                "--name",
                "pi-09",
                "--allow-unregistered",
                "--server-url",
                "https://mail.example.net",
                "--tls-cert",
                "/srv/tls/c.pem",
                "--tls-key",
                "/srv/tls/k.pem",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    main_cf = (out / "postfix/main.cf.mailstate").read_text()
    assert "smtpd_tls_cert_file = /srv/tls/c.pem" in main_cf and "smtpd_tls_key_file = /srv/tls/k.pem" in main_cf
    assert "ssl_cert = </srv/tls/c.pem" in (out / "dovecot/conf.d/90-mailstate.conf").read_text()
    assert "submission/inet = submission inet n - n - - smtpd" in (out / "postfix/master.cf.mailstate").read_text()
