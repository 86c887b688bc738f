"""Fixtures of the end-to-end stage: a real `mailstate serve` and a real mail node, provisioned."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.fleet import Fleet, provision_node, start_server_for
from tests.helpers.mailnode import MailNode


@pytest.fixture
def fleet(mailnode: MailNode, tmp_path: Path) -> Iterator[Fleet]:
    server, admin, project = start_server_for(mailnode, tmp_path / "server")
    try:
        cfg = provision_node(mailnode, server, admin, tmp_path / "etc")
        yield Fleet(server=server, node=mailnode, cfg=cfg, admin=admin, project=project, tmp=tmp_path)
    finally:
        admin.close()
        project.close()
        server.stop()
