"""The gateway's MQTT identity: one stable client id per state folder, one-offs beside it."""

from __future__ import annotations

from contextlib import AsyncExitStack
from pathlib import Path

import pytest

from gateway.app import Gateway
from gateway.config import load_config

pytestmark = pytest.mark.asyncio


async def test_client_id_is_kept_and_a_second_gateway_gets_a_one_off(tmp_path: Path) -> None:
    """The id survives restarts; a concurrent gateway on the same folder gets a one-off id."""
    config = load_config(path=None, environ={}, overrides=[])
    async with AsyncExitStack() as first:
        stable, one_off = Gateway(config, state_dir=tmp_path)._client_id(first)
        assert not one_off
        async with AsyncExitStack() as second:
            other, other_one_off = Gateway(config, state_dir=tmp_path)._client_id(second)
            assert other_one_off
            assert other != stable
    async with AsyncExitStack() as again:
        assert Gateway(config, state_dir=tmp_path)._client_id(again) == (stable, False)


async def test_a_configured_client_id_wins(tmp_path: Path) -> None:
    """mqtt.client_id is used as given, and never written to the state folder."""
    config = load_config(path=None, environ={}, overrides=["mqtt.client_id=gw-east-1"])
    async with AsyncExitStack() as stack:
        assert Gateway(config, state_dir=tmp_path)._client_id(stack) == ("gw-east-1", False)
    assert not (tmp_path / "mqtt_client_id").exists()
