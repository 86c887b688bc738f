"""Node certificates: `pi_pull.py install` (the built single file, as a subprocess) with the real
certbot against a real local ACME server (Debian's pebble, its own CA made here with openssl),
which resolves the mail host through a real authoritative DNS server (knotd, tests/helpers/knot.py) and
validates HTTP-01 for real on the port install gives certbot.

The node is a real Postfix + Dovecot (tests/helpers/mailnode.py): the bundle's TLS paths and reload
commands are that node's, so after `certbot renew --force-renewal` (the same directories) runs
the deploy hook, IMAPS and SMTPS serve the renewed certificate. Uninstall takes the certificate
out of certbot, removes the hook and its directories, and puts the node's old files back.

Without --acme-email, install makes a self-signed certificate (and says so) unless one is there;
bad options are refused before anything changes (exit 2), and a certbot that fails says why
(exit 1) and leaves a self-signed certificate so the services still start.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from mailstate.compiler.node_bundle import BundleOptions, render_node_bundle
from tests.helpers.knot import KnotServer
from tests.helpers.mailnode import (
    MailNode,
    make_public_tmpdir,
    pi_pull_script,
    require_binaries,
)

pytestmark = pytest.mark.e2e

HOST = "mx1.acme.test"
SIGNERS = 'mailstate namespaces="git" ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHcQ0gX0m8c4n3dK5u6a0b2c3d4e5f6a7b8c9d0e1f2a3b4 mailstate\n'
SYNC_KEY = "sk-acme-3f1c0e5b2d7a4e96b3a1f0c2d4e6a8b0"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@dataclass
class Pebble:
    url: str  # the ACME directory
    ca: Path  # trust for pebble's own HTTPS listener (--acme-ca-bundle)
    http_port: int  # where pebble's VA connects for HTTP-01 (certbot listens there)
    proc: subprocess.Popen[bytes]


@pytest.fixture(scope="module")
def pebble(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pebble]:
    require_binaries("pebble", "certbot", "openssl")
    w = tmp_path_factory.mktemp("pebble")
    with KnotServer(w / "knot", ["acme.test"]) as knot:
        knot.set_zone("acme.test", ["mx1 A 127.0.0.1"])
        # pebble's HTTPS listener needs a certificate: a CA and a leaf for 127.0.0.1, made here.
        openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
                "-subj", "/CN=test ACME CA", "-keyout", str(w / "ca.key"), "-out", str(w / "ca.pem"))  # fmt: skip
        openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", "/CN=127.0.0.1",
                "-keyout", str(w / "key.pem"), "-out", str(w / "req.csr"))  # fmt: skip
        (w / "ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        openssl("x509", "-req", "-in", str(w / "req.csr"), "-CA", str(w / "ca.pem"), "-CAkey", str(w / "ca.key"),
                "-CAcreateserial", "-days", "2", "-extfile", str(w / "ext"), "-out", str(w / "cert.pem"))  # fmt: skip
        port, http_port = free_port(), free_port()
        config = {
            "pebble": {
                "listenAddress": f"127.0.0.1:{port}",
                "managementListenAddress": f"127.0.0.1:{free_port()}",
                "certificate": str(w / "cert.pem"),
                "privateKey": str(w / "key.pem"),
                "httpPort": http_port,
                "tlsPort": free_port(),
                "ocspResponderURL": "",
                "externalAccountBindingRequired": False,
            }
        }
        (w / "pebble.json").write_text(json.dumps(config))
        # No sleeps before validation, no rejected nonces, no reused authorizations: a renewal
        # is validated over HTTP-01 again, like the first order.
        env = {**os.environ, "PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0", "PEBBLE_AUTHZREUSE": "0"}
        log = (w / "pebble.log").open("wb")
        argv = ["pebble", "-config", str(w / "pebble.json"), "-dnsserver", knot.address]
        proc = subprocess.Popen(argv, stdout=log, stderr=log, env=env)
        url = f"https://127.0.0.1:{port}/dir"
        ctx = ssl.create_default_context(cafile=str(w / "ca.pem"))
        deadline = time.monotonic() + 20
        while True:
            try:
                import urllib.request

                with urllib.request.urlopen(url, context=ctx, timeout=2) as resp:
                    assert "newOrder" in json.loads(resp.read())
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, (w / "pebble.log").read_text()[-2000:]
                time.sleep(0.1)
        try:
            yield Pebble(url=url, ca=w / "ca.pem", http_port=http_port, proc=proc)
        finally:
            proc.terminate()
            proc.wait(timeout=10)


@dataclass
class NodeHost:
    """A node's config dirs under one temp dir (Dovecot's packaged /etc/dovecot copied, Postfix
    "No configuration"), and the install options that point at them."""

    w: Path

    def dirs(self) -> list[str]:
        out = []
        for opt, sub in (("etc", "etc/pi-pull"), ("lib", "usr/local/lib/pi-pull"), ("systemd", "etc/systemd/system"),
                         ("postfix", "etc/postfix"), ("dovecot", "etc/dovecot")):  # fmt: skip
            out += [f"--{opt}-dir", str(self.w / sub)]
        return out

    def bundle(self, **kwargs: Any) -> Path:
        args: dict[str, Any] = {
            "node_name": "pi-acme",
            "server_url": "https://mail.example.net",
            "allowed_signers": SIGNERS,
            "root": str(self.w / "var/lib/pi-pull"),
            "mail_root": str(self.w / "var/vmail"),
            "postmap": f"postmap -c {self.w}/etc/postfix",
        }
        args.update(kwargs)
        out = self.w / "bundle"
        for rel, content in render_node_bundle(
            args.pop("node_name"), args.pop("server_url"), args.pop("allowed_signers"), BundleOptions(**args)
        ).items():
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            (out / rel).write_bytes(content.encode() if isinstance(content, str) else content)
        return out

    def pi_pull(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(pi_pull_script()), *args], input=SYNC_KEY, capture_output=True, text=True, timeout=600
        )

    def install(self, bundle: Path, *args: str) -> subprocess.CompletedProcess[str]:
        return self.pi_pull("install", "--bundle", str(bundle), "--sync-key-stdin", *self.dirs(), "--no-start",
                            "--no-tick", *args)  # fmt: skip

    def uninstall(self) -> subprocess.CompletedProcess[str]:
        return self.pi_pull("uninstall", "--etc-dir", str(self.w / "etc/pi-pull"), "--no-start")


@pytest.fixture
def node_host() -> Iterator[NodeHost]:
    require_binaries("postconf", "doveconf", "postmap")
    if os.geteuid() != 0:
        (pytest.fail if os.environ.get("CI") == "true" else pytest.skip)("install needs root (chown of the mail root)")
    host = NodeHost(make_public_tmpdir("acme-host-"))
    shutil.copytree("/etc/dovecot", host.w / "etc/dovecot", symlinks=True)
    (host.w / "etc/postfix").mkdir(parents=True)
    try:
        yield host
    finally:
        shutil.rmtree(host.w, ignore_errors=True)


def leaf(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def served(port: int) -> x509.Certificate:
    """The certificate a TLS server on 127.0.0.1:port presents (implicit TLS)."""
    return leaf(ssl.get_server_certificate(("127.0.0.1", port), timeout=10).encode())


def names(cert: x509.Certificate) -> list[str]:
    return list(
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    )


def same_key(cert_pem: bytes, key_pem: bytes) -> bool:
    fmt = (serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    key = serialization.load_pem_private_key(key_pem, None)
    return bool(leaf(cert_pem).public_key().public_bytes(*fmt) == key.public_key().public_bytes(*fmt))


def test_acme_certificate_lands_at_the_bundle_paths_and_renewal_reloads(
    pebble: Pebble,
    node_host: NodeHost,
    mailnode: MailNode,
) -> None:
    node = mailnode
    old_cert, old_key = node.tls_cert.read_bytes(), node.tls_key.read_bytes()
    bundle = node_host.bundle(
        tls_cert=str(node.tls_cert),
        tls_key=str(node.tls_key),
        postfix_reload=node.postfix_reload,
        dovecot_reload=node.dovecot_reload,
    )
    acme_dir = node_host.w / "letsencrypt"
    acme = ["--acme-email", "admin@acme.test", "--mail-host", HOST, "--acme-server", pebble.url,
            "--acme-ca-bundle", str(pebble.ca), "--acme-http-port", str(pebble.http_port), "--acme-dir", str(acme_dir)]  # fmt: skip
    r = node_host.install(bundle, *acme)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"get a certificate for {HOST} from {pebble.url} (certbot)" in r.stdout
    first = node.tls_cert.read_bytes()
    cert = leaf(first)
    assert names(cert) == [HOST] and "Pebble" in cert.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert same_key(first, node.tls_key.read_bytes())
    assert (node.tls_cert.stat().st_mode & 0o777, node.tls_key.stat().st_mode & 0o777) == (0o644, 0o600)
    assert first == (acme_dir / "config/live" / HOST / "fullchain.pem").read_bytes()
    hook = node_host.w / "usr/local/lib/pi-pull/certbot-deploy-hook"
    assert hook.stat().st_mode & 0o777 == 0o755
    assert f"renew_hook = {hook}" in (acme_dir / "config/renewal" / f"{HOST}.conf").read_text()
    # Install reloads nothing itself (it restarts the services when systemd runs them): the node still
    # serves its old certificate until it is reloaded.
    assert served(node.imaps_port).serial_number == leaf(old_cert).serial_number

    again = node_host.install(bundle, *acme)
    assert again.returncode == 0 and "already installed: nothing changed" in again.stdout, again.stdout + again.stderr
    assert node.tls_cert.read_bytes() == first

    # A renewal with the same directories: certbot validates again and runs the deploy hook, which
    # puts the new certificate in place and reloads Postfix and Dovecot.
    env = {**os.environ, "REQUESTS_CA_BUNDLE": str(pebble.ca)}
    try:
        renew = subprocess.run(
            ["certbot", "renew", "--force-renewal", "--no-random-sleep-on-renew", "--non-interactive",
             "--config-dir", str(acme_dir / "config"),
             "--work-dir", str(acme_dir / "work"), "--logs-dir", str(acme_dir / "logs")],
            capture_output=True, text=True, env=env, timeout=180,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail("certbot renew hung:\n" + (acme_dir / "logs/letsencrypt.log").read_text()[-4000:])
    assert renew.returncode == 0, renew.stdout + renew.stderr
    log = (acme_dir / "logs/letsencrypt.log").read_text()
    assert f"Running deploy-hook command: {hook}" in log, log[-3000:]
    renewed = node.tls_cert.read_bytes()
    assert renewed != first and leaf(renewed).serial_number != cert.serial_number and names(leaf(renewed)) == [HOST]
    assert same_key(renewed, node.tls_key.read_bytes())
    deadline = time.monotonic() + 15
    while served(node.imaps_port).serial_number != leaf(renewed).serial_number:
        assert time.monotonic() < deadline, "Dovecot still serves the old certificate after the deploy hook"
        time.sleep(0.2)
    assert served(node.smtps_port).serial_number == leaf(renewed).serial_number  # Postfix reloaded too

    out = node_host.uninstall()
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"certbot delete --cert-name {HOST}" in out.stdout
    assert not acme_dir.exists() and not hook.exists()
    assert (node.tls_cert.read_bytes(), node.tls_key.read_bytes()) == (old_cert, old_key)


def test_without_acme_a_self_signed_certificate_and_it_says_so(node_host: NodeHost) -> None:
    bundle = node_host.bundle()
    r = node_host.install(bundle, "--mail-host", "mx9.example.net")
    assert r.returncode == 0, r.stdout + r.stderr
    cert_path, key_path = node_host.w / "etc/pi-pull/tls/fullchain.pem", node_host.w / "etc/pi-pull/tls/privkey.pem"
    assert f"make a self-signed certificate for mx9.example.net at {cert_path}" in r.stdout
    cert = leaf(cert_path.read_bytes())
    assert cert.issuer == cert.subject and names(cert) == ["mx9.example.net"]
    assert key_path.stat().st_mode & 0o777 == 0o600 and same_key(cert_path.read_bytes(), key_path.read_bytes())
    ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert_path, key_path)  # a TLS server can use it
    main_cf = subprocess.run(["postconf", "-c", str(node_host.w / "etc/postfix"), "-h", "smtpd_tls_cert_file"],
                             capture_output=True, text=True).stdout.strip()  # fmt: skip
    assert main_cf == str(cert_path)
    assert f"ssl_cert = <{cert_path}" in (node_host.w / "etc/dovecot/conf.d/90-mailstate.conf").read_text()
    made = cert_path.read_bytes()
    again = node_host.install(bundle)
    assert "already installed: nothing changed" in again.stdout and cert_path.read_bytes() == made
    out = node_host.uninstall()
    assert out.returncode == 0 and not cert_path.exists() and not cert_path.parent.exists(), out.stdout + out.stderr


def test_a_certificate_already_there_is_kept(node_host: NodeHost) -> None:
    tls = node_host.w / "etc/pi-pull/tls"
    tls.mkdir(parents=True)
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-days", "1", "-subj", "/CN=operator.example", "-keyout", str(tls / "privkey.pem"),
                    "-out", str(tls / "fullchain.pem")], check=True, capture_output=True)  # fmt: skip
    mine = (tls / "fullchain.pem").read_bytes()
    r = node_host.install(node_host.bundle())
    assert r.returncode == 0 and "self-signed" not in r.stdout, r.stdout + r.stderr
    assert (tls / "fullchain.pem").read_bytes() == mine
    assert node_host.uninstall().returncode == 0 and (tls / "fullchain.pem").read_bytes() == mine


def test_bad_options_are_refused_before_anything_changes(node_host: NodeHost, tmp_path: Path) -> None:
    bundle = node_host.bundle()
    cases = [
        (["--acme-email", "a@example.net"], "--acme-email needs --mail-host"),
        (["--acme-email", "not-an-address", "--mail-host", HOST], "is not an email address"),
        (["--acme-email", "a@example.net", "--mail-host", "localhost"], "is not a host name with a domain"),
        (["--acme-email", "a@example.net", "--mail-host", HOST, "--acme-server", "http://x/dir"], "https://"),
        (["--acme-email", "a@example.net", "--mail-host", HOST, "--acme-http-port", "0"], "1-65535"),
        (["--acme-email", "a@example.net", "--mail-host", HOST, "--acme-ca-bundle", "/nonexistent"], "no such file"),
        (["--acme-server", "https://x/dir"], "need --acme-email"),
        (["--acme-http-port", "x"], "invalid int value"),
    ]
    for args, needle in cases:
        r = node_host.install(bundle, *args)
        assert r.returncode == 2 and needle in r.stderr, (args, r.stdout, r.stderr)
    assert not (node_host.w / "etc/pi-pull").exists()
    help_text = node_host.pi_pull("install", "--help").stdout
    for option in (
        "--acme-email",
        "--mail-host",
        "--acme-server",
        "--acme-ca-bundle",
        "--acme-http-port",
        "--acme-webroot",
    ):
        assert option in help_text


def test_a_failing_certbot_says_why_and_leaves_a_self_signed_certificate(node_host: NodeHost, tmp_path: Path) -> None:
    require_binaries("certbot")
    r = node_host.install(node_host.bundle(), "--acme-email", "a@example.net", "--mail-host", HOST, "--acme-server",
                          f"https://127.0.0.1:{free_port()}/dir", "--acme-dir", str(tmp_path / "le"))  # fmt: skip
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"certbot could not get a certificate for {HOST}" in r.stderr
    cert = leaf((node_host.w / "etc/pi-pull/tls/fullchain.pem").read_bytes())
    assert cert.issuer == cert.subject and names(cert) == [HOST]  # the services can start meanwhile
    out = node_host.uninstall()
    assert out.returncode == 0 and not (node_host.w / "etc/pi-pull/tls").exists(), out.stdout + out.stderr
    assert not (tmp_path / "le").exists()
