"""The access log of a real `membrane serve`: every request to the API, one in a hundred to
the hot and public paths (health checks, widgets, sockets, scanners), and every server
error."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest
from conftest import eventually, make_settings, node_process

from gateway.ops.access_log import AccessLogMode
from gateway.settings import ConfigError, demo_config_text, load_settings


def lines(log: Path, needle: str) -> int:
    return sum(needle in line for line in log.read_text().splitlines())


async def test_hot_paths_are_sampled_and_the_api_is_logged_whole(
    tmp_path: Path, redis_url: str, http: aiohttp.ClientSession
) -> None:
    settings = make_settings(tmp_path, redis_url)
    async with node_process(tmp_path, settings, redis_url, demo_config_text(), "node") as (url, _):
        log = tmp_path / "node.log"
        for _ in range(250):
            async with http.get(f"{url}/healthz") as r:
                assert r.status == 200
        for _ in range(3):
            async with http.get(f"{url}/v1/agents/me") as r:
                assert r.status == 401
        for i in range(150):
            async with http.get(f"{url}/wp-login-{i}.php") as r:
                assert r.status == 404

        async def logged() -> bool:
            return lines(log, '"GET /v1/agents/me ') == 3

        await eventually(logged)
        # Requests 1, 101 and 201 of the health checks; 1 and 101 of the made-up paths.
        assert lines(log, '"GET /healthz ') == 3
        assert lines(log, '"GET /wp-login-') == 2


def test_the_mode_is_a_setting_and_its_variable_is_checked(tmp_path: Path) -> None:
    assert load_settings(None, env={}).access_log is AccessLogMode.SAMPLED
    assert load_settings(None, env={"MEMBRANE_ACCESS_LOG": "off"}).access_log is AccessLogMode.OFF
    with pytest.raises(ConfigError) as e:
        load_settings(None, env={"MEMBRANE_ACCESS_LOG": "verbose"})
    assert e.value.key == "server.access_log"
    config = tmp_path / "m.toml"
    config.write_text(
        demo_config_text().replace("[server]", "[server]\naccess_log_sample_every = 0")
    )
    with pytest.raises(ConfigError) as e:
        load_settings(config, env={})
    assert e.value.key == "server.access_log_sample_every"
