"""MCP sessions with the official SDK's client, over streamable HTTP (a live server's /mcp) or
stdio (`mailstate mcp` as a subprocess), and a tool result's JSON body."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx2
from mcp import ClientSession, StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client

from tests.helpers.server import LiveServer, mailstate_cmd


@asynccontextmanager
async def http_session(srv: LiveServer, token: str) -> AsyncIterator[ClientSession]:
    async with (
        httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}) as client,
        streamable_http_client(f"{srv.url}/mcp", http_client=client) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        yield session


@asynccontextmanager
async def stdio_session(srv: LiveServer, token: str) -> AsyncIterator[ClientSession]:
    cmd = mailstate_cmd()
    params = StdioServerParameters(
        command=cmd[0], args=[*cmd[1:], "mcp", "--data", str(srv.data.root), "--token", token], env=srv.env
    )
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        yield session


def body_of(result: Any) -> dict[str, Any]:
    """A tool result's JSON (the text content), checked against its structured content."""
    assert len(result.content) == 1 and result.content[0].type == "text"
    data = json.loads(result.content[0].text)
    assert result.structured_content == data
    return data
