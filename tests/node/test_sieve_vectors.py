"""Sieve: one table, two validators. The server (state/owners.py, the compiler, the check of
incoming commits) and the node (pi-pull/pipull/sieve.py) refuse the same scripts and values.

tests/vectors/sieve_scripts.json (tests/helpers/sieve_vectors.py) holds whole scripts: every hostile one ends a real pi_pull.py
tick in exit 3 with the last release and its scripts still serving, and is refused by
state/sync.validate_incoming in a commit of a real data dir. tests/vectors/sieve_values.json
holds values: the server's answer to each as a request, and the node's verdict on a script that
holds it as a compiler without the server's checks would write it; what the server takes, the
real compiler writes and the node accepts, value for value.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from mailstate.state import owners as ow
from mailstate.state.errors import InvalidInput
from mailstate.state.store import Store
from mailstate.state.sync import validate_incoming
from tests.helpers.common import PROJECT_A
from tests.helpers.sieve_vectors import ADDR, SCRIPTS, VALUES, fragment, script_of, value_of
from tests.helpers.sieve_vectors import SIEVE as FRAGMENT
from tests.helpers.vectors import node_repo

EXIT_OK, EXIT_REFUSED = 0, 3


# --------------------------------------------------------------------------- scripts


def test_the_node_refuses_every_hostile_script_and_takes_the_valid_ones(pipull: ModuleType) -> None:
    from pipull.errors import Refused
    from pipull.sieve import check_script, parse_fragment

    for vec in SCRIPTS["valid"]:
        check_script("example.com", "info", script_of(vec))
        assert parse_fragment("example.com", fragment(script_of(vec))) == {"info": script_of(vec)}
    accepted = []
    for vec in SCRIPTS["hostile"]:
        try:
            check_script("example.com", "info", script_of(vec))
        except Refused:
            continue
        accepted.append(vec["name"])
    assert not accepted, accepted


def test_the_node_refuses_a_broken_container(pipull: ModuleType) -> None:
    from pipull.errors import Refused
    from pipull.sieve import parse_fragment

    good = script_of(SCRIPTS["valid"][0])
    for bad in (
        fragment(good).replace(b"sieve info ", b"sieve ../etc "),  # a path in the name
        fragment(good)[:-5],  # cut short
        fragment(good) + b"trailing",
        fragment(good) + fragment(good),  # listed twice
        fragment(good, "zed") + fragment(good),  # out of order
        b"",
    ):
        with pytest.raises(Refused):
            parse_fragment("example.com", bad)


@pytest.mark.e2e
def test_every_hostile_script_is_refused_by_pi_pull(tmp_path: Path) -> None:
    repo, node = node_repo(tmp_path, 2)
    repo.set_mailbox(ADDR, password_hash="{BLF-CRYPT}$2b$04$" + "a" * 53)
    good_script = script_of(SCRIPTS["valid"][1])
    repo.extra_files[FRAGMENT] = fragment(good_script)
    good = repo.commit("good")
    r = node.tick()
    assert r.returncode == EXIT_OK, r.stderr
    installed = node.root / "sieve" / "example.com" / "info.sieve"
    assert installed.read_bytes() == good_script
    wrong = []
    for vec in SCRIPTS["hostile"]:
        repo.extra_files[FRAGMENT] = fragment(script_of(vec))
        repo.commit(vec["name"])  # signed by the trusted key, stated accepted
        r = node.tick()
        if r.returncode != EXIT_REFUSED or node.current() != good or "sieve_scripts of example.com" not in r.stderr:
            wrong.append(f"{vec['name']}: rc={r.returncode} {r.stderr.strip()[-300:]}")
    assert not wrong, "\n".join(wrong)
    assert installed.read_bytes() == good_script  # the scripts of the last good release keep serving
    assert json.loads((node.root / "state.json").read_text())["applied_commit"] == good


@pytest.mark.e2e
def test_every_hostile_script_is_refused_by_the_server(mail_store: Store, data_dir: Any, tmp_path: Path) -> None:
    mail_store.execute("set-filters", PROJECT_A, {"email": ADDR, "filters": [
        {"name": "n", "field": "subject", "op": "contains", "value": "x", "action": "mark_read"}]})  # fmt: skip
    work = tmp_path / "work"
    subprocess.run(["git", "clone", "-q", str(data_dir.repo), str(work)], check=True)
    git = ["git", "-C", str(work), "-c", "gpg.format=ssh", "-c", f"user.signingkey={data_dir.key}"]
    accepted: list[str] = []
    for i, vec in enumerate(SCRIPTS["hostile"]):
        subprocess.run([*git, "checkout", "-q", "-f", "origin/main"], check=True)
        (work / FRAGMENT).write_bytes(fragment(script_of(vec)))
        subprocess.run([*git, "commit", "-q", "-S", "-am", vec["name"]], check=True)
        subprocess.run([*git, "push", "-q", "origin", f"HEAD:refs/vectors/{i}"], check=True)
        sha = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
        verdict = validate_incoming(mail_store.git, mail_store.snapshot, sha)
        if verdict.ok or not any(FRAGMENT in p for p in verdict.problems):
            accepted.append(f"{vec['name']}: {verdict.problems}")
    assert not accepted, "\n".join(accepted)


# --------------------------------------------------------------------------- values


def _request(vec: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    value, kind = value_of(vec), vec["kind"]
    rule = {"name": "vector", "field": "subject", "op": "contains", "value": "x", "action": "mark_read"}
    if kind == "value":
        return "set-filters", {"email": ADDR, "filters": [{**rule, "value": value}]}
    if kind == "header":
        return "set-filters", {"email": ADDR, "filters": [{**rule, "field": f"header:{value}"}]}
    if kind == "folder":
        return "set-filters", {"email": ADDR, "filters": [{**rule, "action": "fileinto", "target": value}]}
    if kind == "redirect":
        return "set-filters", {"email": ADDR, "filters": [{**rule, "action": "redirect", "target": value}]}
    if kind == "subject":
        return "set-vacation", {"email": ADDR, "enabled": True, "body": "Away.", "subject": value}
    return "set-vacation", {"email": ADDR, "enabled": True, "body": value}


def _naive_script(vec: dict[str, Any]) -> bytes:
    """The script a compiler without the server's checks would write: `"` and `\\` escaped, a
    body dot-stuffed, a folder's levels joined by the nodes' separator `.`, nothing refused."""

    def q(text: str) -> str:
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'

    value, kind = value_of(vec), vec["kind"]
    head = (
        f"# mailstate: the filters and vacation reply of {ADDR} (compiled by the server; do not edit)\n"
        'require ["date", "envelope", "fileinto", "imap4flags", "mailbox", "relational", "vacation"];\n'
    )
    header, test_value, action = "subject", "x", '  addflag "\\\\Seen";'
    if kind == "value":
        test_value = value
    elif kind == "header":
        header = value
    elif kind == "folder":
        action = f"  fileinto :create {q(value.replace('/', '.'))};"
    elif kind == "redirect":
        action = f"  redirect {q(value)};"
    if kind in ("subject", "body"):
        subject = f" :subject {q(value)}" if kind == "subject" else ""
        body = value if kind == "body" else "Away."
        lines = "".join(("." + line if line.startswith(".") else line) + "\n" for line in body.split("\n"))
        guards = (
            'if allof (not exists "list-id", not exists "list-post", not exists "list-unsubscribe", not header :is '
            '"precedence" ["bulk", "junk", "list"], not header :contains "auto-submitted" "auto-", not envelope :all '
            f':is "from" {q(ADDR)}) {{\n'
        )
        return (head + guards + f"  vacation :days 7{subject} text:\n{lines}.\n;\n}}\n").encode(
            "utf-8", "surrogatepass"
        )
    return (head + f"if header :contains {q(header)} {q(test_value)} {{\n{action}\n}}\n").encode("utf-8")


@pytest.mark.parametrize("vec", VALUES, ids=[v["name"] for v in VALUES])
def test_server_and_node_hold_each_value_to_the_same_verdict(
    mail_store: Store, pipull: ModuleType, vec: dict[str, Any]
) -> None:
    from pipull.errors import Refused
    from pipull.sieve import check_script, parse_fragment, unquote

    op, body = _request(vec)
    if vec["server"] == "ok":
        mail_store.execute(op, PROJECT_A, body)
        rendered = mail_store.git.read(mail_store.head, FRAGMENT)
        assert rendered is not None
        script = parse_fragment("example.com", rendered)["info"].decode()  # the real compiler's, accepted
        value = value_of(vec)
        expected = ow.sieve_folder(value) if vec["kind"] == "folder" else value
        if vec["kind"] == "body":
            assert "\n".join(line[1:] if line.startswith(".") else line for line in script.split(" text:\n", 1)[1].split("\n.\n;\n")[0].split("\n")) == expected  # fmt: skip
        else:
            quoted = [unquote(t) for t in __import__("re").findall(r'"(?:[^"\\]|\\.)*"', script)]
            assert expected in quoted, (expected, quoted)
    else:
        with pytest.raises(InvalidInput) as exc:
            mail_store.execute(op, PROJECT_A, body)
        assert exc.value.code == vec["server"], exc.value
    node_ok = True
    try:
        check_script("example.com", "info", _naive_script(vec))
    except Refused:
        node_ok = False
    assert node_ok == (vec["node"] == "ok"), vec["name"]
    assert (vec["server"] == "ok") == (vec["node"] == "ok"), "a vector where server and node disagree"
