"""``python3 -m pipull`` (from pi-pull/) and the zipapp's entry point."""

from __future__ import annotations

import sys

from pipull.cli import main

if __name__ == "__main__":
    sys.exit(main())
