"""The compiler: golden cases, determinism, `mailstate compile [--check]` and `mailstate check`.

Each `tests/golden/<case>/` holds `state/` (a checkout's mailstate.yaml and domains/...) and
`expected/` (what `rendered/` must hold, written by hand).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mailstate.api.cli import main
from mailstate.compiler.render import compile_state, diff_rendered, render_domain
from mailstate.compiler.write import write_rendered
from mailstate.state.errors import CompileError
from mailstate.state.load import check_checkout, load_checkout, read_rendered
from mailstate.state.models import DomainFile, Mailbox, Settings

GOLDEN = Path(__file__).parents[1] / "golden"
CASES = sorted(p.name for p in GOLDEN.iterdir() if (p / "state").is_dir())
HASH = "{BLF-CRYPT}$2b$04$" + "a" * 53


def expected_of(case: str) -> dict[str, bytes]:
    base = GOLDEN / case / "expected"
    return {
        "rendered/" + p.relative_to(base).as_posix(): p.read_bytes() for p in sorted(base.rglob("*")) if p.is_file()
    }


def checkout(tmp_path: Path, case: str, with_rendered: bool = True) -> Path:
    """A copy of a golden state as a checkout (optionally with its rendered/ in place)."""
    root = tmp_path / case
    shutil.copytree(GOLDEN / case / "state", root)
    if with_rendered:
        shutil.copytree(GOLDEN / case / "expected", root / "rendered")
    return root


def test_the_golden_cases_exist() -> None:
    assert {
        "one_domain_two_mailboxes",
        "inactive_mailbox_left_out",
        "disabled_domain_left_out",
        "idn_domain",
        "custom_settings",
        "empty_enabled_domain",
        "aliases_and_forwarding",
        "catch_all_beside_mailboxes",
        "alias_domain",
        "sender_ownership",
    } <= set(CASES)


@pytest.mark.parametrize("case", CASES)
def test_golden(case: str) -> None:
    loaded = load_checkout(GOLDEN / case / "state")
    assert loaded.problems == []
    assert loaded.settings is not None
    got = compile_state(loaded.settings, loaded.domains.values())
    want = expected_of(case)
    assert sorted(got) == sorted(want)
    for path in want:
        assert got[path] == want[path], path


@pytest.mark.parametrize("case", CASES)
def test_golden_cli_compile_writes_expected_and_check_passes(
    tmp_path: Path, case: str, capsys: pytest.CaptureFixture[str]
) -> None:
    root = checkout(tmp_path, case, with_rendered=False)
    assert main(["compile", str(root)]) == 0
    assert read_rendered(root) == expected_of(case)
    assert main(["compile", "--check", str(root)]) == 0
    assert main(["check", str(root)]) == 0
    assert "ok" in capsys.readouterr().out
    # compiling again changes nothing
    assert main(["compile", str(root)]) == 0
    assert capsys.readouterr().out.strip().endswith("0 file(s) changed")


@pytest.mark.parametrize("case", CASES)
def test_compiled_files_are_well_formed(case: str) -> None:
    for path, data in expected_of(case).items():
        text = data.decode("ascii")
        assert text == "" or text.endswith("\n")
        for line in text.splitlines():
            if path.endswith("/passwd"):
                # Dovecot passwd-file: user:password:uid:gid:gecos:home:shell:extra_fields
                # (the extra field `userdb_quota_rule=*:storage=NM` has a `:` of its own)
                user, password, uid, gid, gecos, home, shell, extra = line.split(":", 7)
                assert user.count("@") == 1
                assert password.startswith("{BLF-CRYPT}$2")
                assert uid.isdigit() and gid.isdigit()
                assert gecos == "" and shell == ""
                assert home.startswith("/")
                local, domain = user.split("@")
                tail = home.split(f"/{domain}/", 1)[1]  # format 2 adds ~<id>
                assert tail == local or re.fullmatch(re.escape(local) + r"~[0-9]{8}-[0-9a-f]{6}", tail)
                assert extra.startswith("userdb_quota_rule=*:storage=") and extra.endswith("M")
            elif path.endswith("/mailboxes"):
                local, box_id, state = line.split(" ")
                assert re.fullmatch(r"[0-9]{8}-[0-9a-f]{6}", box_id) and state in ("active", "inactive")
            elif path == "rendered/settings":
                assert re.fullmatch(r"(format|purge_after_days) [0-9]+", line)
            else:
                assert len(line.split()) == 2, line


def test_disabled_domains_and_inactive_mailboxes_get_nothing() -> None:
    settings = Settings(format=1)
    off = DomainFile(domain="off.example", email_enabled=False, mailboxes={"info": Mailbox(password=HASH, quota_mb=1)})
    assert render_domain(off, settings) == {}
    asleep = DomainFile(
        domain="on.example", email_enabled=True, mailboxes={"info": Mailbox(password=HASH, quota_mb=1, active=False)}
    )
    out = render_domain(asleep, settings)
    assert out["rendered/domains/on/on.example/passwd"] == b""
    assert out["rendered/domains/on/on.example/virtual_mailbox_maps"] == b""
    assert out["rendered/domains/on/on.example/virtual_mailbox_domains"] == b"on.example OK\n"


def test_render_is_deterministic_in_process() -> None:
    loaded = load_checkout(GOLDEN / "many_domains" / "state")
    assert loaded.settings is not None
    first = compile_state(loaded.settings, loaded.domains.values())
    second = compile_state(loaded.settings, list(reversed(list(loaded.domains.values()))))
    assert first == second
    assert list(first) == sorted(first)


@pytest.mark.e2e
def test_render_is_deterministic_across_processes(tmp_path: Path) -> None:
    """Different hash seeds (set/dict iteration) must not change a byte."""
    outputs = []
    for seed in ["1", "2", "12345"]:
        root = checkout(tmp_path / seed, "many_domains", with_rendered=False)
        env = {**os.environ, "PYTHONHASHSEED": seed}
        subprocess.run(
            [sys.executable, "-m", "mailstate.api.cli", "compile", str(root)], check=True, env=env, capture_output=True
        )
        outputs.append(read_rendered(root))
    assert outputs[0] == outputs[1] == outputs[2] == expected_of("many_domains")


def test_compile_error_guards_against_values_that_break_lines() -> None:
    """The last guard: a value validation somehow let through is refused, not rendered."""
    bad = DomainFile.model_construct(
        domain="example.com", project_id=1, email_enabled=True, mailboxes={"a:b": Mailbox(password=HASH, quota_mb=1)}
    )
    with pytest.raises(CompileError):
        render_domain(bad, Settings())
    bad = DomainFile.model_construct(
        domain="example.com", project_id=1, email_enabled=True, mailboxes={"x\ny": Mailbox(password=HASH, quota_mb=1)}
    )
    with pytest.raises(CompileError):
        render_domain(bad, Settings())


# --- compile --check and stale rendered/ -------------------------------------------------------


@pytest.mark.parametrize("stale", ["edited", "missing", "extra", "no_rendered_dir"])
def test_compile_check_fails_on_stale_rendered_and_compile_fixes_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], stale: str
) -> None:
    root = checkout(tmp_path, "one_domain_two_mailboxes")
    assert main(["compile", "--check", str(root)]) == 0
    capsys.readouterr()
    passwd = root / "rendered/domains/ex/example.com/passwd"
    if stale == "edited":
        passwd.write_text(passwd.read_text() + "evil@example.com:{PLAIN}x:0:0::/root::\n")
        culprit = "rendered/domains/ex/example.com/passwd"
    elif stale == "missing":
        passwd.unlink()
        culprit = "rendered/domains/ex/example.com/passwd"
    elif stale == "extra":
        extra = root / "rendered/domains/ol/old.example/passwd"
        extra.parent.mkdir(parents=True)
        extra.write_text("someone@old.example:x\n")
        culprit = "rendered/domains/ol/old.example/passwd"
    else:
        shutil.rmtree(root / "rendered")
        culprit = "rendered/domains/ex/example.com/virtual_mailbox_maps"
    assert main(["compile", "--check", str(root)]) == 1
    out = capsys.readouterr()
    assert culprit in out.out
    assert "stale" in out.err
    # `mailstate check` reports the same
    assert main(["check", str(root)]) == 1
    assert culprit in capsys.readouterr().out
    # compile fixes it, and only what was wrong
    assert main(["compile", str(root)]) == 0
    assert culprit in capsys.readouterr().out
    assert read_rendered(root) == expected_of("one_domain_two_mailboxes")
    assert not (root / "rendered/domains/ol").exists()
    assert main(["compile", "--check", str(root)]) == 0


def test_state_change_makes_rendered_stale(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An admin's PR that edits state but forgets to re-render is caught."""
    root = checkout(tmp_path, "inactive_mailbox_left_out")
    f = root / "domains/sh/shop.example.org.yaml"
    f.write_text(f.read_text().replace("    active: false\n", "    active: true\n"))
    assert main(["compile", "--check", str(root)]) == 1
    assert "rendered/domains/sh/shop.example.org/passwd" in capsys.readouterr().out
    assert main(["compile", str(root)]) == 0
    assert b"bob@shop.example.org:" in (root / "rendered/domains/sh/shop.example.org/passwd").read_bytes()


def test_write_rendered_is_minimal(tmp_path: Path) -> None:
    root = checkout(tmp_path, "many_domains", with_rendered=False)
    expected = expected_of("many_domains")
    assert write_rendered(root, expected) == sorted(expected)
    assert write_rendered(root, expected) == []
    smaller = {k: v for k, v in expected.items() if "/zz/" not in k}
    assert write_rendered(root, smaller) == sorted(k for k in expected if "/zz/" in k)
    assert not (root / "rendered/domains/zz").exists()
    assert diff_rendered(smaller, read_rendered(root)) == []


# --- mailstate check: schema problems, one clear line each --------------------------------------


def _break(root: Path, kind: str) -> tuple[str, str]:
    """Introduce one problem into a checkout; return (file, a word the report must name)."""
    dom = root / "domains/ex/example.com.yaml"
    text = dom.read_text()
    if kind == "bad_hash":
        dom.write_text(text.replace("$2b$12$abcdefghij", "$2b$12$abc", 1))
        return "domains/ex/example.com.yaml", "bcrypt"
    if kind == "plain_text_password":
        dom.write_text(
            text.replace(
                "'{BLF-CRYPT}$2b$12$abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0'", "hunter2hunter2", 1
            )
        )
        return "domains/ex/example.com.yaml", "plain text"
    if kind == "unknown_key":
        dom.write_text(text.replace("project_id: 101\n", "project_id: 101\nowner: alice\n"))
        return "domains/ex/example.com.yaml", "owner"
    if kind == "unknown_mailbox_key":
        dom.write_text(text.replace("    quota_mb: 250\n", "    quota_mb: 250\n    forward: x@y.z\n"))
        return "domains/ex/example.com.yaml", "forward"
    if kind == "file_name_mismatch":
        wrong = root / "domains/ex/example.org.yaml"
        dom.rename(wrong)
        return "domains/ex/example.org.yaml", "domains/ex/example.com.yaml"
    if kind == "wrong_bucket":
        wrong = root / "domains/zz/example.com.yaml"
        wrong.parent.mkdir()
        dom.rename(wrong)
        return "domains/zz/example.com.yaml", "domains/ex/example.com.yaml"
    if kind == "duplicate_mailbox":
        dom.write_text(text + "  info:\n    password: '" + HASH + "'\n    quota_mb: 1\n    active: true\n")
        return "domains/ex/example.com.yaml", "duplicate"
    if kind == "duplicate_domain_key":
        dom.write_text("domain: example.com\n" + text)
        return "domains/ex/example.com.yaml", "duplicate"
    if kind == "uppercase_local":
        dom.write_text(text.replace("  sales:\n", "  Sales:\n"))
        return "domains/ex/example.com.yaml", "Sales"
    if kind == "bad_local":
        dom.write_text(text.replace("  sales:\n", "  'sa:les':\n"))
        return "domains/ex/example.com.yaml", "sa:les"
    if kind == "bad_quota":
        dom.write_text(text.replace("quota_mb: 250", "quota_mb: -1"))
        return "domains/ex/example.com.yaml", "quota_mb"
    if kind == "uppercase_domain":
        dom.write_text(text.replace("domain: example.com", "domain: Example.com"))
        return "domains/ex/example.com.yaml", "domain"
    if kind == "not_yaml":
        dom.write_text("domain: [example.com\n")
        return "domains/ex/example.com.yaml", "not valid YAML"
    if kind == "stray_file":
        (root / "domains/ex/notes.txt").write_text("hi\n")
        return "domains/ex/notes.txt", "unexpected"
    if kind == "bad_settings":
        (root / "mailstate.yaml").write_text("format: 3\nuid: 0\n")
        return "mailstate.yaml", "format"
    if kind == "bad_node":
        (root / "nodes.yaml").write_text(
            "nodes:\n  mpi02:\n    ip_address: not-an-ip\n    sync_key_sha256: 'abc'\n    created_at: '2026-01-01T00:00:00Z'\n"
        )
        return "nodes.yaml", "ip_address"
    if kind == "missing_settings":
        (root / "mailstate.yaml").unlink()
        return "mailstate.yaml", "missing"
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    [
        "bad_hash",
        "plain_text_password",
        "unknown_key",
        "unknown_mailbox_key",
        "file_name_mismatch",
        "wrong_bucket",
        "duplicate_mailbox",
        "duplicate_domain_key",
        "uppercase_local",
        "bad_local",
        "bad_quota",
        "uppercase_domain",
        "not_yaml",
        "stray_file",
        "bad_settings",
        "bad_node",
        "missing_settings",
    ],
)
def test_check_reports_schema_problems(tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str) -> None:
    root = checkout(tmp_path, "one_domain_two_mailboxes")
    assert main(["check", str(root)]) == 0
    capsys.readouterr()
    path, word = _break(root, kind)
    assert main(["check", str(root)]) == 1
    out = capsys.readouterr()
    lines = [ln for ln in out.out.splitlines() if ln.strip()]
    assert lines, out
    assert any(ln.startswith(path + ":") for ln in lines), lines
    assert word in out.out
    assert "check failed" in out.err
    # the library function says the same
    assert any(p.startswith(path) for p in check_checkout(root))
    # and compile refuses to render an invalid state
    assert main(["compile", str(root)]) == 1
    capsys.readouterr()


def test_check_reports_every_problem_not_just_the_first(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = checkout(tmp_path, "disabled_domain_left_out")
    old = root / "domains/ol/old.example.yaml"
    old.write_text(old.read_text().replace("project_id: 7", "project_id: 7\nowner: x"))
    new = root / "domains/ne/new.example.yaml"
    new.write_text(new.read_text().replace("$2b$12$", "$9z$12$"))
    assert main(["check", str(root)]) == 1
    out = capsys.readouterr().out
    assert "domains/ol/old.example.yaml" in out
    assert "domains/ne/new.example.yaml" in out


def test_a_valid_hash_that_contains_slash_dot_dot_still_renders() -> None:
    """bcrypt's alphabet has '.' and '/', so '/../' can appear in a real hash; only paths are checked for it."""
    from mailstate.compiler.render import render_domain
    from mailstate.state.models import DomainFile, Mailbox, Settings

    pw = "{BLF-CRYPT}$2b$04$" + "abc/../" + "a" * 46
    dom = DomainFile(domain="example.com", email_enabled=True, mailboxes={"x": Mailbox(password=pw, quota_mb=5)})
    passwd = render_domain(dom, Settings(format=1))["rendered/domains/ex/example.com/passwd"].decode()
    assert passwd.split(":")[1] == pw
