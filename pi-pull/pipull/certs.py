"""Install's TLS step: the node's certificate, where the bundle's Postfix and Dovecot read it.

With ``--acme-email E --mail-host H`` install gets a certificate for H from an ACME server
(Let's Encrypt unless ``--acme-server``) with Debian's ``certbot``: HTTP-01 on
``--acme-http-port`` (default 80; certbot's own server, "standalone") or, with
``--acme-webroot DIR``, through files a web server already serving H on port 80 hands out.
certbot keeps the certificate in its own directories (Debian's /etc/letsencrypt,
/var/lib/letsencrypt, /var/log/letsencrypt, or ``--acme-dir DIR``'s config/, work/, logs/) and
renews it from there (Debian's certbot.timer runs ``certbot renew`` twice a day). After it got
or renewed one, it runs the deploy hook install puts at ``<lib_dir>/certbot-deploy-hook``
(``--deploy-hook``, kept in certbot's renewal config): the hook copies fullchain.pem and
privkey.pem to the bundle's TLS paths (atomically, the key 0600) and reloads Postfix and
Dovecot with the bundle's own reload commands. During install it reloads nothing
(PI_PULL_NO_RELOAD=1): install (re)starts both itself.

Without ``--acme-email`` install puts a self-signed certificate there (openssl, which Dovecot's
package depends on) when there is none, so that Postfix and Dovecot start, and says so: mail
clients warn about it. A certificate already there (the operator's, or an earlier install's) is
kept.

What install added is in its record (``install.json``): the TLS files (the originals backed
up), the hook, and ``acme``: the certificate's name and certbot's directories, so that
uninstall deletes the certificate from certbot too (``certbot delete``: no renewal runs a hook
that is gone), and removes certbot's directories if install created them.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import socket
from dataclasses import dataclass, field
from typing import Any, Protocol

from .errors import ConfigError, TickError
from .runner import Runner, short

LETS_ENCRYPT = "https://acme-v02.api.letsencrypt.org/directory"
HOOK_NAME = "certbot-deploy-hook"
DEBIAN_DIRS = ("/etc/letsencrypt", "/var/lib/letsencrypt", "/var/log/letsencrypt")
SELF_SIGNED_DAYS = 3650
_HOST = re.compile(r"^(?=.{1,253}$)[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)+$")
_LABELS = re.compile(r"^(?=.{1,253}$)[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*$")
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


class CertError(TickError):
    """The certificate step failed (install exits 1; the steps before it are recorded)."""


@dataclass
class Acme:
    """How to get the certificate from an ACME server (the install options)."""

    email: str
    server: str = LETS_ENCRYPT
    ca_bundle: str = ""
    http_port: int = 80
    webroot: str = ""
    dirs: tuple[str, str, str] = DEBIAN_DIRS  # certbot's config, work and logs directories

    def dir_args(self) -> list[str]:
        config, work, logs = self.dirs
        return ["--config-dir", config, "--work-dir", work, "--logs-dir", logs]


def check_options(
    email: str | None,
    host: str | None,
    server: str | None,
    ca_bundle: str | None,
    http_port: int | None,
    webroot: str | None,
    acme_dir: str | None,
) -> tuple[Acme | None, str]:
    """The install options as (Acme or None, mail host); ConfigError (exit 2) for a bad one."""
    acme_only = {
        "--acme-server": server,
        "--acme-ca-bundle": ca_bundle,
        "--acme-http-port": http_port,
        "--acme-webroot": webroot,
        "--acme-dir": acme_dir,
    }
    if email is None:
        given = [k for k, v in acme_only.items() if v is not None]
        if given:
            raise ConfigError(f"{', '.join(given)} need --acme-email (the ACME account's address)")
        if host:
            return None, _mail_host(host, "--mail-host")
        name = socket.getfqdn().strip().lower().rstrip(".")
        return None, name if _LABELS.match(name) else "localhost"  # only a self-signed certificate's name
    if not host:
        raise ConfigError("--acme-email needs --mail-host: the name the certificate is for (the node's MX/IMAP name)")
    if not _EMAIL.match(email):
        raise ConfigError(f"--acme-email {email!r} is not an email address")
    if server is not None and not server.startswith("https://"):
        raise ConfigError("--acme-server must be an https:// URL (the ACME directory)")
    if ca_bundle is not None and not os.path.isfile(ca_bundle):
        raise ConfigError(f"--acme-ca-bundle {ca_bundle}: no such file")
    if http_port is not None and not 1 <= http_port <= 65535:
        raise ConfigError("--acme-http-port must be 1-65535")
    if webroot is not None and not os.path.isdir(webroot):
        raise ConfigError(f"--acme-webroot {webroot}: no such directory")
    dirs = DEBIAN_DIRS
    if acme_dir is not None:
        base = os.path.abspath(acme_dir)
        dirs = (os.path.join(base, "config"), os.path.join(base, "work"), os.path.join(base, "logs"))
    acme = Acme(
        email=email,
        server=server or LETS_ENCRYPT,
        ca_bundle=os.path.abspath(ca_bundle) if ca_bundle else "",
        http_port=80 if http_port is None else http_port,
        webroot=os.path.abspath(webroot) if webroot else "",
        dirs=dirs,
    )
    return acme, _mail_host(host, "--mail-host")


def _mail_host(value: str, what: str) -> str:
    host = value.strip().lower().rstrip(".")
    if not _HOST.match(host):
        raise ConfigError(f"{what} {value!r} is not a host name with a domain (e.g. mx1.example.net)")
    return host


class Files(Protocol):
    """install.Host, as far as this step uses it."""

    def put_file(self, dest: str, data: bytes, mode: int, label: str = "", secret: bool = False) -> bool: ...

    def make_dir(self, path: str, mode: int = 0o755) -> None: ...

    def keep_original(self, dest: str) -> str | None: ...


class Say(Protocol):
    """install.Steps, as far as this step uses it."""

    dry_run: bool

    def change(self, what: str) -> bool: ...

    def done(self, what: str) -> None: ...

    def note(self, what: str) -> None: ...


def read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        return None


def deploy_hook(cert: str, key: str, postfix_reload: str, dovecot_reload: str) -> bytes:
    """The hook certbot runs after it got or renewed the certificate (``RENEWED_LINEAGE``)."""
    q = shlex.quote
    reloads = ""
    for name, cmd in (("postfix", postfix_reload), ("dovecot", dovecot_reload)):
        if cmd.strip():
            line = " ".join(q(a) for a in shlex.split(cmd))
            reloads += f'{line} || {{ echo "pi-pull deploy hook: {name} reload failed" >&2; status=1; }}\n'
    return f"""#!/bin/sh
# Installed by `pi_pull.py install` (removed by uninstall). certbot runs it after it got or
# renewed this node's certificate: it puts the certificate where Postfix and Dovecot read it,
# then reloads both. PI_PULL_NO_RELOAD=1 (install itself) skips the reloads.
set -eu
lineage="${{RENEWED_LINEAGE:?certbot sets RENEWED_LINEAGE}}"
umask 077
put() {{  # SOURCE DEST MODE: a copy beside DEST, then a rename over it (readers never see half a file)
    cp "$1" "$2.pi-pull-new" && chmod "$3" "$2.pi-pull-new" && mv -f "$2.pi-pull-new" "$2"
}}
put "$lineage/privkey.pem" {q(key)} 0600
put "$lineage/fullchain.pem" {q(cert)} 0644
[ "${{PI_PULL_NO_RELOAD:-}}" = 1 ] && exit 0
status=0
{reloads}exit $status
""".encode()


@dataclass
class TlsStep:
    """Put a certificate at ``cert``/``key``: from ACME (``acme``) or self-signed for ``host``."""

    cert: str
    key: str
    host: str
    acme: Acme | None
    hook_path: str
    hook: bytes
    files: Files
    say: Say
    record: dict[str, Any]
    runner: Runner = field(default_factory=Runner)
    certbot: str = "certbot"
    openssl: str = "openssl"
    # More names a self-signed certificate carries: the node's address in a fleet (docs/fleet.md),
    # which the other nodes' proxies check the certificate against (an IP or a host name).
    alt_names: tuple[str, ...] = ()

    def run(self) -> bool:
        """True when the certificate at the TLS paths changed (Postfix and Dovecot must restart)."""
        self.files.make_dir(os.path.dirname(self.cert))
        if os.path.dirname(self.key) != os.path.dirname(self.cert):
            self.files.make_dir(os.path.dirname(self.key))
        if self.acme is None:
            return self.self_signed()
        return self.from_acme(self.acme)

    # ---- self-signed

    def self_signed(self, why: str = "no --acme-email") -> bool:
        if read(self.cert) is not None and read(self.key) is not None:
            self.say.done(f"certificate {self.cert} (kept: it is there)")
            return False
        what = (
            f"make a self-signed certificate for {self.host} at {self.cert} ({why}): Postfix and Dovecot start "
            "with it, but mail clients warn about it; `pi_pull.py install ... --acme-email YOU --mail-host "
            f"{self.host}` gets a real one"
        )
        if not self.say.change(what):
            return True
        tmp = f"{self.key}.pi-pull-new"
        try:
            r = self.runner.run(
                [self.openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                 "-days", str(SELF_SIGNED_DAYS), "-subj", f"/CN={self.host}", "-addext",
                 f"subjectAltName={self.san()}", "-keyout", tmp, "-out", f"{tmp}.crt"],
                timeout=120,
            )  # fmt: skip
            key, cert = read(tmp), read(f"{tmp}.crt")
        finally:
            for path in (tmp, f"{tmp}.crt"):
                if os.path.exists(path):
                    os.unlink(path)
        if r.returncode != 0 or not key or not cert:
            raise CertError(f"openssl could not make a self-signed certificate: {short(r.stderr + r.stdout)}")
        self.files.put_file(self.key, key, 0o600, " (self-signed, its key)", secret=True)
        self.files.put_file(self.cert, cert, 0o644, " (self-signed)")
        return True

    def san(self) -> str:
        """The self-signed certificate's subjectAltName: the mail host, then the other names."""
        import ipaddress

        out = []
        for name in dict.fromkeys((self.host, *self.alt_names)):
            try:
                ipaddress.ip_address(name)
                out.append(f"IP:{name}")
            except ValueError:
                out.append(f"DNS:{name}")
        return ",".join(out)

    # ---- ACME

    @property
    def lineage(self) -> str:
        assert self.acme is not None
        return os.path.join(self.acme.dirs[0], "live", self.host)

    def from_acme(self, acme: Acme) -> bool:
        if shutil.which(self.certbot) is None and not os.path.isfile(self.certbot):
            raise CertError("certbot is not installed: apt-get install certbot")
        self.files.put_file(self.hook_path, self.hook, 0o755, " (certbot's deploy hook)")
        self.remember(acme)
        live = self.lineage
        if self.certbot_files() is not None and self.certbot_files() == (read(self.cert), read(self.key)):
            self.say.done(f"certificate for {self.host} at {self.cert} (from certbot, which renews it)")
            return False
        if self.certbot_files() is None:
            if not self.say.change(f"get a certificate for {self.host} from {acme.server} (certbot)"):
                return True
            self.claim()
            self.certbot_certonly(acme)  # certbot runs the deploy hook: the files are in place after it
        if self.certbot_files() != (read(self.cert), read(self.key)):
            # certbot had it already (another install, an edit since): the hook puts it in place.
            if self.say.change(f"put certbot's certificate for {self.host} at {self.cert} (the deploy hook)"):
                self.claim()
                env = {"RENEWED_LINEAGE": live, "PI_PULL_NO_RELOAD": "1"}
                r = self.runner.run([self.hook_path], env=env, timeout=60)
                if r.returncode != 0:
                    raise CertError(f"the deploy hook failed: {short(r.stderr + r.stdout)}")
        self.settle()
        return True

    def certbot_files(self) -> tuple[bytes, bytes] | None:
        """certbot's current certificate and key for the host, or None."""
        cert, key = read(os.path.join(self.lineage, "fullchain.pem")), read(os.path.join(self.lineage, "privkey.pem"))
        return (cert, key) if cert is not None and key is not None else None

    def certbot_certonly(self, acme: Acme) -> None:
        argv = [self.certbot, "certonly", "--non-interactive", "--agree-tos", "--no-eff-email", "--email", acme.email,
                "--domains", self.host, "--cert-name", self.host, "--server", acme.server, "--key-type", "ecdsa",
                "--keep-until-expiring", "--deploy-hook", self.hook_path, *acme.dir_args()]  # fmt: skip
        if acme.webroot:
            argv += ["--webroot", "--webroot-path", acme.webroot]
        else:
            argv += ["--standalone", "--http-01-port", str(acme.http_port)]
        env = {"PI_PULL_NO_RELOAD": "1"}
        if acme.ca_bundle:
            env["REQUESTS_CA_BUNDLE"] = acme.ca_bundle  # certbot's HTTP library trusts this CA file
        r = self.runner.run(argv, env=env, timeout=600)
        if r.returncode != 0:
            how = f"port {acme.http_port} of {self.host}" if not acme.webroot else f"{acme.webroot} served on port 80"
            self.fallback()
            raise CertError(
                f"certbot could not get a certificate for {self.host} from {acme.server} (the ACME server must reach "
                f"{how} over HTTP): {short(r.stderr + r.stdout, 600)}"
            )

    def fallback(self) -> None:
        """After a failed ACME request: a self-signed certificate if there is none, so the services start."""
        if read(self.cert) is None or read(self.key) is None:
            self.self_signed(why="certbot failed")

    def claim(self) -> None:
        """Record the TLS files the hook writes as install's (originals backed up), as put_file does."""
        files = self.record.setdefault("files", {})
        for dest in (self.cert, self.key):
            if dest not in files:
                files[dest] = {"backup": self.files.keep_original(dest), "sha256": None}

    def settle(self) -> None:
        """The certificate as it is now goes into the record (the key, like every secret, without a digest)."""
        files = self.record.setdefault("files", {})
        data = read(self.cert)
        if self.cert in files and data is not None:
            files[self.cert]["sha256"] = hashlib.sha256(data).hexdigest()

    def remember(self, acme: Acme) -> None:
        """What uninstall needs to take the certificate out of certbot again."""
        if "acme" in self.record:
            return
        self.record["acme"] = {
            "cert_name": self.host,
            "dirs": list(acme.dirs),
            "created_dirs": sorted({_first_missing(d) for d in acme.dirs if not os.path.exists(d)}),
            "certbot": self.certbot,
        }


def _first_missing(path: str) -> str:
    """The outermost directory of `path` that does not exist yet (certbot creates it with its parents)."""
    while not os.path.exists(os.path.dirname(path)):
        path = os.path.dirname(path)
    return path


def uninstall_acme(record: dict[str, Any], say: Say, runner: Runner) -> None:
    """Undo install's ACME part: ``certbot delete`` the certificate, remove the directories of
    certbot that install created (else say that the ACME account was kept)."""
    acme = record.get("acme")
    if not isinstance(acme, dict):
        return
    name, dirs = str(acme.get("cert_name", "")), [str(d) for d in acme.get("dirs", [])]
    config = dirs[0] if dirs else DEBIAN_DIRS[0]
    certbot = str(acme.get("certbot") or "certbot")
    if (
        name
        and os.path.isdir(os.path.join(config, "renewal"))
        and os.path.exists(os.path.join(config, "renewal", f"{name}.conf"))
    ):
        if say.change(f"certbot delete --cert-name {name} (no renewal runs the removed deploy hook)"):
            args = ["--config-dir", dirs[0], "--work-dir", dirs[1], "--logs-dir", dirs[2]] if len(dirs) == 3 else []
            r = runner.run([certbot, "delete", "--non-interactive", "--cert-name", name, *args], timeout=120)
            if r.returncode != 0:
                say.note(f"warning: certbot delete failed: {short(r.stderr + r.stdout)}")
    created = [str(d) for d in acme.get("created_dirs", [])]
    for path in created:
        if os.path.isdir(path) and say.change(f"remove {path} (certbot's, created by install)"):
            shutil.rmtree(path, ignore_errors=True)
    if not any(config == d or config.startswith(d.rstrip("/") + "/") for d in created):
        say.note(f"kept certbot's ACME account in {config}/accounts (`certbot unregister` removes it)")
