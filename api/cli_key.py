"""`mailstate key rotate`: a new server signing key, vouched for by the old one (state/keyrotation.py)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from mailstate.state.datadir import DataDir
from mailstate.state.errors import StoreError
from mailstate.state.keyrotation import rotate_key


def cmd_key_rotate(args: argparse.Namespace) -> int:
    dd = DataDir(Path(args.data))
    if not dd.is_initialised():
        raise StoreError(
            f"{args.data} is not a mailstate data dir; run `mailstate init --data {args.data}`.", code="not_initialised"
        )
    old, new = rotate_key(dd.root)
    print(f"retired (valid-before now in {dd.allowed_signers}): {old}")
    print(f"new server key: {new}")
    print(
        "The old key's endorsement rides in every accepted-head statement from now on: nodes learn the new key at their next tick."
    )
    print(
        "A running `mailstate serve` signs with the new key from its next write or statement refresh; other servers of the"
    )
    print("fleet (upstream mode) learn it from the same endorsement (docs/operator-guide.md, 'Rotating keys').")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("key", help="server signing key")
    ksub = p.add_subparsers(dest="key_command", required=True, metavar="ACTION")
    r = ksub.add_parser(
        "rotate",
        help="make a new signing key; the old one signs an endorsement nodes follow, then retires (valid-before)",
    )
    r.add_argument(
        "--data",
        default=os.environ.get("MAILSTATE_DATA", "./data"),
        help="data directory (default: $MAILSTATE_DATA or ./data)",
    )
    r.set_defaults(func=cmd_key_rotate)
