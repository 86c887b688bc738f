"""pipull.verify.feed: a whole blob (a first apply's fast path) gets the verdicts of the same bytes streamed."""

from __future__ import annotations

from types import ModuleType

HASH = "{BLF-CRYPT}$2b$04$" + "a" * 53


def verdict(pipull: ModuleType, fname: str, data: bytes, chunks: object) -> str:
    cfg = pipull.config.Config(remote_url="/x", root="/x", mail_root="/var/vmail", mail_uid=5000, mail_gid=5000)
    check = pipull.verify.DomainCheck("example.com", cfg, format2=False)
    try:
        pipull.verify.feed(check, fname, chunks)
        return f"ok {check.passwd.count} {check.maps.count} {check.vmd_lines}"
    except pipull.errors.Refused as e:
        return f"refused: {e}"


def test_whole_and_chunked_agree(pipull: ModuleType) -> None:
    good_pw = f"a@example.com:{HASH}:5000:5000::/var/vmail/example.com/a::userdb_quota_rule=*:storage=1M\n".encode()
    cases = [
        ("passwd", good_pw),
        ("passwd", good_pw * 2),  # listed twice
        ("passwd", good_pw[:-1]),  # no final newline
        ("passwd", b"x" * 9000 + b"\n"),  # over-long line
        ("passwd", b"nonsense\n" + b"y" * 9000),  # a bad line, then an over-long unterminated rest
        ("passwd", b"nonsense"),  # a bad unterminated line: the newline check comes last
        ("passwd", b""),
        ("virtual_mailbox_maps", b"a@example.com example.com/a/\n"),
        ("virtual_mailbox_maps", b"a@example.com example.com/../\n"),
        ("virtual_mailbox_domains", b"example.com OK\n"),
        ("virtual_mailbox_domains", b"example.com OK\nexample.com OK\n"),
    ]
    seen = set()
    for fname, data in cases:
        whole = verdict(pipull, fname, data, (data,))
        assert verdict(pipull, fname, data, [data]) == whole, (fname, data[:40])  # the same message, too
        for cut in (
            1,
            len(data) // 2,
            max(0, len(data) - 1),
        ):  # (which error of several comes first follows the chunks)
            assert verdict(pipull, fname, data, [data[:cut], data[cut:]]).split(":")[0] == whole.split(":")[0], (
                fname,
                data[:40],
                cut,
            )
        seen.add(whole.split(":")[0])
    assert seen == {"ok 1 0 0", "refused", "ok 0 1 0", "ok 0 0 1", "ok 0 0 0"}
