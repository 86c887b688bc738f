"""Hand edits of a state repo by an admin with a trusted key: clone, edit, `git commit -S`, push
(what `mailstate serve` must serve or refuse), and the edits the tests make."""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Callable
from pathlib import Path

from mailstate.state.ops import hash_password
from mailstate.state.signing import allowed_signers_line, generate_key
from tests.helpers.common import PASSWORD

# A rendered passwd line the compiler never produces: a {PLAIN} password with nopassword=y.
BAD_LINE = "x@example.com:{PLAIN}pw:5000:5000::/var/vmail/example.com/x::nopassword=y\n"


def run(
    cwd: Path, *args: str, env: dict[str, str] | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """git in `cwd` (raises on failure unless check=False)."""
    return subprocess.run(
        ["git", "-C", str(cwd), *args], capture_output=True, text=True, env=env, check=check, timeout=60
    )


def trust_admin(allowed_signers: Path, tmp: Path) -> Path:
    """An admin key, trusted for commits (principal admin@example.org) in `allowed_signers`."""
    key = tmp / "admin_key"
    if not key.exists():
        generate_key(key, "admin@example.org")
    with allowed_signers.open("a") as fh:
        fh.write(allowed_signers_line(Path(f"{key}.pub").read_text(), "admin@example.org"))
    return key


def admin_push(
    remote: Path | str,
    tmp: Path,
    key: Path,
    edit: Callable[[Path], None],
    *,
    env: dict[str, str] | None = None,
    force: bool = False,
) -> str:
    """Clone `remote`, `edit(worktree)`, commit signed by `key` (git commit -S), push to main."""
    work = tmp / f"admin-work-{len(list(tmp.glob('admin-work-*')))}"
    subprocess.run(["git", "clone", "-q", str(remote), str(work)], check=True, capture_output=True, env=env)
    edit(work)
    run(work, "add", "-A", env=env)
    ident = [
        "-c",
        "user.name=Admin",
        "-c",
        "user.email=admin@example.org",
        "-c",
        "gpg.format=ssh",
        "-c",
        f"user.signingkey={key}",
    ]
    run(work, *ident, "commit", "-q", "-S", "-m", "admin change", env=env)
    run(work, "push", "-q", *(["--force"] if force else []), "origin", "HEAD:main", env=env)
    return run(work, "rev-parse", "HEAD", env=env).stdout.strip()


def plain_password_line(work: Path) -> None:
    """The hostile hand edit: a rendered passwd line the compiler never produces."""
    passwd = next(work.glob("rendered/domains/*/example.com/passwd"))
    passwd.write_text(passwd.read_text() + BAD_LINE)


def add_mailbox_edit(local: str) -> Callable[[Path], None]:
    """An edit (for admin_push) adding mailbox `local` to admin.example by hand, then recompiling."""

    def edit(work: Path) -> None:
        path = work / "domains/ad/admin.example.yaml"
        text = path.read_text().replace("mailboxes: {}", "mailboxes:")
        box_id = "20261201-" + hashlib.sha256(local.encode()).hexdigest()[:6]  # state format 2: every mailbox has an id
        text += f"  {local}:\n    id: {box_id}\n    password: '{hash_password(PASSWORD, 4)}'\n    quota_mb: 100\n    active: true\n"
        path.write_text(text)
        subprocess.run(["mailstate", "compile", str(work)], check=True, capture_output=True)

    return edit
