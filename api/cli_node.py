"""`mailstate node bundle`: write a mail node's provisioning bundle into a folder."""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Any

from mailstate.compiler.node_bundle import (
    DEFAULT_MAP_BUCKETS,
    DEFAULT_ROOT,
    INSTALL_PATHS,
    TLS_CERT,
    TLS_KEY,
    BundleOptions,
    render_node_bundle,
)
from mailstate.compiler.postscreen import DEFAULT_DNSBL_SITES, DEFAULT_DNSBL_THRESHOLD, parse_dnsbl_option
from mailstate.state import validate
from mailstate.state.datadir import DataDir
from mailstate.state.errors import NotFound, StoreError


def cmd_node_bundle(args: argparse.Namespace) -> int:
    name = validate.validate_node_name(args.name)
    dd = DataDir(Path(args.data))
    if not dd.is_initialised():
        raise StoreError(f"{args.data} is not a mailstate data dir; run `mailstate init --data {args.data}`.")
    from mailstate.state.datadir import open_store

    snapshot = open_store(dd.root).snapshot
    if not args.allow_unregistered and snapshot.node(name) is None:
        raise NotFound(
            f"Node {name} is not registered; call add-node first (or pass --allow-unregistered).", code="node_not_found"
        )
    settings = snapshot.settings
    node = snapshot.node(name)
    bundle = render_node_bundle(
        name,
        args.server_url,
        dd.allowed_signers.read_text(),
        BundleOptions(
            root=args.root,
            remote_url=args.remote_url,
            map_type=args.map_type,
            map_buckets=args.map_buckets,
            lmtp_port=args.lmtp_port,
            mail_root=settings.mail_root,
            mail_uid=settings.uid,
            mail_gid=settings.gid,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            address=node.address if node is not None else None,
            dnsbl_sites=DEFAULT_DNSBL_SITES if args.dnsbl is None else parse_dnsbl_option(args.dnsbl),
            dnsbl_threshold=args.dnsbl_threshold,
        ),
    )
    out = Path(args.out)
    try:
        _write_bundle(out, bundle)
    except OSError as exc:
        raise StoreError(f"Cannot write the bundle into {out}: {exc.strerror or exc}.") from exc
    print(
        f"Next, on node {name} as root (paste the sync key from add-node, then Ctrl-D; it is not echoed):\n"
        f"  python3 {out}/pi_pull.py install --bundle {out} --dry-run   # shows every action, changes nothing\n"
        f"  python3 {out}/pi_pull.py install --bundle {out} --sync-key-stdin\n"
        "See docs/node-guide.md."
    )
    return 0


def _write_bundle(out: Path, bundle: dict[str, str | bytes]) -> None:
    for rel, content in sorted(bundle.items()):
        target = out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        with os.fdopen(fd, "wb") as fh:  # pi_pull.py is a zipapp: bytes
            fh.write(content.encode("utf-8") if isinstance(content, str) else content)
        os.chmod(tmp, 0o755 if rel.endswith(".py") else 0o644)
        os.replace(tmp, target)
        print(f"wrote {target}  ->  {INSTALL_PATHS.get(rel, '?')}")


def register(sub: Any) -> None:
    p = sub.add_parser("node", help="mail node provisioning")
    nsub = p.add_subparsers(dest="node_command", required=True, metavar="ACTION")
    b = nsub.add_parser(
        "bundle", help="write a node's bundle: pi-pull config, allowed_signers, systemd units, Postfix/Dovecot snippets"
    )
    b.add_argument(
        "--data",
        default=os.environ.get("MAILSTATE_DATA", "./data"),
        help="data directory (default: $MAILSTATE_DATA or ./data)",
    )
    b.add_argument("--name", required=True, help="node name, as registered with add-node")
    b.add_argument(
        "--server-url",
        required=True,
        help="base URL of `mailstate serve` as the node reaches it, e.g. https://mail-api.example.net",
    )
    b.add_argument(
        "--remote-url", help="fetch the state repo from this git URL instead of the server (e.g. a git host)"
    )
    b.add_argument("--root", default=DEFAULT_ROOT, help=f"release root on the node (default {DEFAULT_ROOT})")
    b.add_argument(
        "--map-type",
        default="hash",
        choices=["hash", "lmdb", "cdb", "texthash"],
        help="Postfix map type (default hash)",
    )
    b.add_argument(
        "--map-buckets",
        type=int,
        default=None,
        metavar="N",
        help=f"N Postfix tables per map and passwd.d/<c>/<bb>/ (pi-pull's bucketed layout: an apply costs what changed); "
        f"0 = one table per map (the layout of bundles from before; cdb and texthash); default {DEFAULT_MAP_BUCKETS} "
        "for hash, btree and lmdb",
    )
    b.add_argument("--lmtp-port", type=int, default=24, help="Dovecot LMTP port Postfix delivers to (default 24)")
    b.add_argument(
        "--tls-cert",
        default=TLS_CERT,
        help=f"TLS certificate (full chain) for Postfix and Dovecot on the node (default {TLS_CERT})",
    )
    b.add_argument("--tls-key", default=TLS_KEY, help=f"its private key on the node (default {TLS_KEY})")
    b.add_argument(
        "--dnsbl",
        default=None,
        metavar="SITES",
        help="the DNS blocklists postscreen asks on port 25, comma-separated domain[=filter][*weight] "
        f'("none": no DNSBL, e.g. a node without DNS access of its own); default {", ".join(DEFAULT_DNSBL_SITES)}',
    )
    b.add_argument(
        "--dnsbl-threshold",
        type=int,
        default=DEFAULT_DNSBL_THRESHOLD,
        metavar="N",
        help=f"the sum of the weights of the lists naming a client from which postscreen refuses it (default {DEFAULT_DNSBL_THRESHOLD})",
    )
    b.add_argument("--out", required=True, help="folder to write the bundle into")
    b.add_argument("--allow-unregistered", action="store_true", help="write a bundle for a node not yet registered")
    b.set_defaults(func=cmd_node_bundle)
