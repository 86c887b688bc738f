"""Port 25's postscreen in the bundle: the DNSBL rules (compiler/postscreen.py) held to the node's
(tests/vectors/dnsbl_sites.json), the lines and master.cf entries the bundle writes, what the real
postconf makes of them, and `mailstate node bundle --dnsbl/--dnsbl-threshold`."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from mailstate.compiler.node_bundle import BundleOptions, postfix_master_snippet, render_node_bundle
from mailstate.compiler.postscreen import (
    DEFAULT_DNSBL_SITES,
    check_dnsbl_site,
    check_dnsbl_sites,
    check_dnsbl_threshold,
    parse_dnsbl_option,
)
from mailstate.state.errors import InvalidInput
from tests.helpers.mailnode import age_file, require_binaries
from tests.helpers.vectors import VECTORS as VECTOR_DIR

VECTORS = json.loads((VECTOR_DIR / "dnsbl_sites.json").read_text())
SIGNERS = 'mailstate namespaces="git" ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHcQ0gX0m8c4n3dK5u6a0b2c3d4e5f6a7b8c9d0e1f2a3b4 mailstate\n'


def bundle(**options: Any) -> dict[str, Any]:
    return render_node_bundle("pi-01", "https://mail.example.net", SIGNERS, BundleOptions(**options))


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith("#")]


@pytest.mark.parametrize("case", VECTORS["sites"]["valid"], ids=lambda c: c["written"][:40])
def test_the_server_takes_and_writes_valid_sites(case: dict[str, str]) -> None:
    assert check_dnsbl_site(case["value"]) == case["written"]


@pytest.mark.parametrize("site", VECTORS["sites"]["hostile"], ids=lambda s: repr(s[:30]))
def test_the_server_refuses_every_hostile_site(site: str) -> None:
    with pytest.raises(InvalidInput) as exc:
        check_dnsbl_site(site)
    assert exc.value.code == "invalid_dnsbl" and exc.value.field == "dnsbl_sites"
    assert site[81:] == "" or site[81:] not in str(exc.value)  # a long hostile value is never echoed whole


@pytest.mark.parametrize("case", VECTORS["lists"], ids=lambda c: f"{len(c['sites'])}-{c['ok']}")
def test_the_server_judges_whole_lists(case: dict[str, Any]) -> None:
    if case["ok"]:
        assert check_dnsbl_sites(case["sites"]) == tuple(case["sites"])
    else:
        with pytest.raises(InvalidInput, match=r"At most 20|twice|is not a DNSBL site"):
            check_dnsbl_sites(case["sites"])


def test_the_server_judges_thresholds() -> None:
    for value in VECTORS["thresholds"]["valid"]:
        assert check_dnsbl_threshold(value) == value
    for bad in [*VECTORS["thresholds"]["hostile"], 3.5, True, "3", None]:
        with pytest.raises(InvalidInput, match="from 1 to 1000"):
            check_dnsbl_threshold(bad)
    with pytest.raises(InvalidInput, match="must be a string"):
        check_dnsbl_site(3)


def test_the_bundle_puts_port_25_behind_postscreen_with_the_default_lists() -> None:
    b = bundle()
    master = lines(b["postfix/master.cf.mailstate"])
    assert master[:4] == [
        "smtp/inet = smtp inet n - n - 1 postscreen",
        "smtpd/pass = smtpd pass - - n - - smtpd -o cleanup_service_name=cleanup-inbound",
        "dnsblog/unix = dnsblog unix - - n - 0 dnsblog",
        "tlsproxy/unix = tlsproxy unix - - n - 0 tlsproxy",
    ]
    main = lines(b["postfix/main.cf.mailstate"])
    assert "postscreen_dnsbl_sites = zen.spamhaus.org=127.0.0.[2..11]*3, bl.spamcop.net=127.0.0.2*2" in main
    assert {
        "postscreen_dnsbl_threshold = 3",
        "postscreen_dnsbl_action = drop",
        "postscreen_greet_action = enforce",
    } <= set(main)
    assert "[postscreen]\n" in b["pi-pull.ini"] and "\nlog = auto\n" in b["pi-pull.ini"]
    # no list (a node without DNS of its own): postscreen still meets every client
    empty = bundle(dnsbl_sites=(), dnsbl_threshold=1)
    assert "postscreen_dnsbl_sites =" in lines(empty["postfix/main.cf.mailstate"])
    assert lines(empty["postfix/master.cf.mailstate"])[0] == "smtp/inet = smtp inet n - n - 1 postscreen"


def test_the_bundle_refuses_hostile_lists() -> None:
    with pytest.raises(InvalidInput, match="is not a DNSBL site"):
        bundle(dnsbl_sites=("zen.spamhaus.org\nsmtpd_milters = inet:evil:1",))
    with pytest.raises(InvalidInput, match="from 1 to 1000"):
        bundle(dnsbl_threshold=0)
    with pytest.raises(InvalidInput, match="smtp_listen"):
        postfix_master_snippet(smtp_listen="smtp inet")


@pytest.mark.e2e
@pytest.mark.parametrize("sites", [DEFAULT_DNSBL_SITES, ()], ids=["default", "none"])
def test_postconf_reads_the_postscreen_lines_as_written(tmp_path: Path, sites: tuple[str, ...]) -> None:
    """The real postconf over Postfix's own master.cf: port 25 is postscreen, its pass service smtpd, and
    the DNSBL settings read back as written."""
    require_binaries("postconf")
    b = bundle(dnsbl_sites=sites)
    (tmp_path / "main.cf").write_text("compatibility_level = 3.6\n" + b["postfix/main.cf.mailstate"])
    (tmp_path / "master.cf").write_bytes(Path("/usr/share/postfix/master.cf.dist").read_bytes())
    r = subprocess.run(
        ["postconf", "-c", str(tmp_path), "-M", "-e", *lines(b["postfix/master.cf.mailstate"])],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    for name in ("main.cf", "master.cf"):
        age_file(tmp_path / name)
    m = subprocess.run(["postconf", "-c", str(tmp_path), "-M"], capture_output=True, text=True)
    assert m.returncode == 0 and "warning" not in m.stderr, m.stderr
    services = {tuple(line.split()[:2]): line.split()[7] for line in m.stdout.splitlines()}
    assert services[("smtp", "inet")] == "postscreen" and services[("smtpd", "pass")] == "smtpd"
    assert services[("dnsblog", "unix")] == "dnsblog" and services[("tlsproxy", "unix")] == "tlsproxy"
    keys = [
        "postscreen_dnsbl_sites",
        "postscreen_dnsbl_threshold",
        "postscreen_dnsbl_action",
        "postscreen_greet_action",
    ]
    r = subprocess.run(["postconf", "-c", str(tmp_path), "-h", *keys], capture_output=True, text=True)
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr
    assert r.stdout.splitlines() == [", ".join(sites), "3", "drop", "enforce"]


@pytest.mark.e2e
def test_cli_bundle_takes_dnsbl_options_and_refuses_hostile_ones(
    data_dir: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mailstate.api.cli import main

    def run(*extra: str, out: Path) -> int:
        base = ["node", "bundle", "--data", str(data_dir.root), "--name", "pi-09", "--allow-unregistered"]
        return main([*base, "--server-url", "https://mail.example.net", *extra, "--out", str(out)])

    assert (
        run("--dnsbl", "ZEN.spamhaus.org*2, dnsbl.test=127.0.0.2*2", "--dnsbl-threshold", "4", out=tmp_path / "a") == 0
    )
    main_cf = (tmp_path / "a" / "postfix/main.cf.mailstate").read_text()
    assert "postscreen_dnsbl_sites = zen.spamhaus.org*2, dnsbl.test=127.0.0.2*2\n" in main_cf
    assert "postscreen_dnsbl_threshold = 4\n" in main_cf
    assert run("--dnsbl", "none", out=tmp_path / "b") == 0
    assert "postscreen_dnsbl_sites =\n" in (tmp_path / "b" / "postfix/main.cf.mailstate").read_text()
    capsys.readouterr()
    assert run("--dnsbl", "zen.spamhaus.org*500", out=tmp_path / "c") == 2
    err = capsys.readouterr().err
    assert "weight" in err and "invalid_dnsbl" in err and "Traceback" not in err, err
    assert not (tmp_path / "c").exists()  # nothing written
    assert run("--dnsbl-threshold", "0", out=tmp_path / "d") == 2 and not (tmp_path / "d").exists()
    assert parse_dnsbl_option(" a.example,b.example  c.example ") == ("a.example", "b.example", "c.example")
