"""mailstate: GitOps for mailboxes.

The repository keeps one top-level folder per pipeline stage (`state/`, `compiler/`, `api/`,
`templates/`, `pi-pull/`); the installed distribution maps them under this one namespace
(`mailstate.state`, `mailstate.compiler`, ...) so that no generic top-level name such as
`state` or `api` lands in site-packages.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mailstate")
except PackageNotFoundError:  # running from a checkout that was never installed
    __version__ = "0+unknown"
