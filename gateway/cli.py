"""``membrane serve`` runs a gateway node; ``membrane token`` mints a development token;
``membrane xmpp-bridge`` posts agents' XMPP presence to a site's IM presence webhook."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import sys
from pathlib import Path

from aiohttp import web
from redis.exceptions import RedisError

from gateway.edge.auth import TokenService
from gateway.edge.http import appkeys as keys
from gateway.ops.access_log import access_logger_class
from gateway.ops.gc_pacer import PROCESS_PACER
from gateway.ops.log_privacy import use_private_formatter
from gateway.ops.logs import LogFormat, configure_logging
from gateway.settings import ConfigError, Settings, load_settings, with_dev_secret
from gateway.store.redis_url import parse_redis_url


def _settings(args: argparse.Namespace) -> Settings:
    settings = load_settings(
        args.config,
        host=getattr(args, "host", None),
        port=getattr(args, "port", None),
        redis_url=getattr(args, "redis_url", None),
        data_dir=args.data_dir,
        public_url=getattr(args, "public_url", None),
    )
    return with_dev_secret(settings)


def serve(args: argparse.Namespace) -> int:
    from gateway.app import create_app

    settings = _settings(args)
    configure_logging(settings.log_format, settings.node_id)
    app = create_app(settings)

    async def freeze_heap(app: web.Application) -> None:
        # (After the app's cleanup contexts: the pacer, gateway.ops.gc_pacer, runs by now if it
        # is on.) Everything allocated at start-up lives for the whole run: out of the
        # collector's generations from the start, as what survives the pacer's collections.
        if PROCESS_PACER.pacer is not None:
            gc.collect()
            gc.freeze()
        if hasattr(signal, "SIGUSR1"):
            # For an operator looking into memory: collect everything now and log it
            # (SIGUSR1, a pause), or look for garbage among the frozen objects in a forked
            # child (SIGUSR2, no pause; the pacer's hourly check).
            loop = asyncio.get_running_loop()
            loop.add_signal_handler(signal.SIGUSR1, PROCESS_PACER.collect_everything)
            loop.add_signal_handler(signal.SIGUSR2, PROCESS_PACER.check_frozen)

    async def stop_signals(app: web.Application) -> None:
        if hasattr(signal, "SIGUSR1"):
            asyncio.get_running_loop().remove_signal_handler(signal.SIGUSR1)
            asyncio.get_running_loop().remove_signal_handler(signal.SIGUSR2)

    app.on_startup.append(freeze_heap)
    app.on_cleanup.append(stop_signals)
    app.on_startup.append(drain_on_signals)
    store = (
        f"Redis {parse_redis_url(settings.redis_url)}"
        if settings.redis_url
        else f"embedded ({settings.data_dir})"
    )
    where = f"Membrane node {settings.node_id} on http://{settings.host}:{settings.port}"
    if settings.log_format is LogFormat.JSON:
        # A log collector reads every line as JSON: the banner is a log line too.
        logging.getLogger("gateway.cli").info(
            "%s (store: %s); pages at %s/", where, store, settings.public_url
        )
    else:
        print(
            f"{where} (store: {store})\n"
            f"  demo site:  {settings.public_url}/demo/\n"
            f"  agent app:  {settings.public_url}/agent/"
            f"  (token: {_token_command()} --agent <id>)\n"
            f"  board:      {settings.public_url}/board/  (a supervisor's token)",
            flush=True,
        )
    try:
        web.run_app(
            app,
            host=settings.host,
            port=settings.port,
            print=None,
            loop=_new_event_loop(),
            access_log_class=access_logger_class(
                settings.access_log, settings.access_log_sample_every
            ),
            # Requests still open after the drain get this long before their connections close.
            shutdown_timeout=app[keys.DRAIN].reserve_s / 2,
        )
    except RedisError as e:  # at start-up: Redis unreachable, or refusing the password
        logging.getLogger("gateway.cli").error("cannot start: %s", e)
        return 1
    return 0


async def drain_on_signals(app: web.Application) -> None:
    """SIGTERM drains the node, then stops it; a second signal stops it at once.

    After SIGTERM (an orchestrator, a deploy) the node stays up until the end of its grace,
    less the shutdown's reserve: a load balancer that checks ``/readyz`` every few seconds sees
    the 503, rather than a closed port, and a client that it still sends here is told
    ``draining`` and when to retry. SIGINT (someone at a terminal) drains and stops at once,
    and so does a single node (the embedded store): there is no other node to send anyone to,
    and its clients come back sooner to the restarted node.

    aiohttp's own handlers stopped the node at once, and left its sockets to time out (45 s
    with a call connected) and their calls to end as if a party had left."""
    loop = asyncio.get_running_loop()
    drain = app[keys.DRAIN]
    stopping = False

    def stop_now() -> None:
        raise web.GracefulExit()

    def overdue() -> None:
        # The grace is a promise to whoever sent SIGTERM (an orchestrator kills the node
        # soon after anyway): keep it even if something hangs.
        logging.getLogger(__name__).error("not stopped within the drain grace; exiting now")
        os._exit(1)

    async def drain_then_stop(linger: bool) -> None:
        await drain.run()
        if linger:
            await asyncio.sleep(max(0.0, drain.deadline() - app[keys.CLOCK].monotonic()))
        loop.call_soon(stop_now)

    def on_signal(linger: bool) -> None:
        nonlocal stopping
        if stopping:
            stop_now()
        stopping = True
        loop.call_later(drain.grace_s, overdue)
        try:
            app[keys.TASKS].spawn(drain_then_stop(linger), "drain")
        except RuntimeError:  # shutting down already
            stop_now()

    many_nodes = bool(app[keys.SETTINGS].redis_url)
    loop.add_signal_handler(signal.SIGTERM, on_signal, many_nodes)
    loop.add_signal_handler(signal.SIGINT, on_signal, False)


def _token_command() -> str:
    """How to run ``membrane token`` from where the node was started: the script beside this
    interpreter (``.venv/bin/membrane`` after ``./deploy/run-demo``), which is on no PATH."""
    script = Path(sys.executable).parent / "membrane"
    if not script.exists():
        return "membrane token"
    try:
        return f"{script.relative_to(Path.cwd())} token"
    except ValueError:
        return f"{script} token"


def _new_event_loop() -> asyncio.AbstractEventLoop:
    # uvloop spends less CPU than asyncio's own loop on a node's many socket writes and
    # timers (bench/click_to_ring.py); asyncio's loop where uvloop is not installed.
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def token(args: argparse.Namespace) -> int:
    settings = _settings(args)
    site_id = args.site or next(iter(settings.sites))
    site = settings.sites.get(site_id)
    if site is None:
        print(f"no site {site_id!r} in the config", file=sys.stderr)
        return 2
    agent = site.agents.get(args.agent)
    if agent is None:
        known = ", ".join(sorted(site.agents))
        print(f"no agent {args.agent!r} in site {site_id!r} (agents: {known})", file=sys.stderr)
        return 2
    minted, _exp = TokenService(settings.auth).mint(
        agent.agent_id, site_id, agent.role, ttl_s=args.ttl
    )
    print(minted)
    return 0


def xmpp_bridge(args: argparse.Namespace) -> int:
    # Imported here: the bridge is its own process, and a node never loads slixmpp.
    from gateway.integrations.bridge_config import BridgeConfigError, load_config
    from gateway.integrations.xmpp_bridge import serve as run_bridge

    try:
        config = load_config(args.config)
    except BridgeConfigError as e:
        print(e, file=sys.stderr)
        return 2
    log_format = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=logging.INFO, format=log_format)
    use_private_formatter(log_format)
    asyncio.run(run_bridge(config))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="membrane", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", type=Path, help="TOML config (default: the shipped demo)")
        p.add_argument("--data-dir", type=Path, help="embedded store and dev secret directory")

    p_serve = sub.add_parser("serve", help="run a gateway node")
    common(p_serve)
    p_serve.add_argument("--host")
    p_serve.add_argument("--port", type=int)
    p_serve.add_argument("--redis-url", help="share state with other nodes through this Redis")
    p_serve.add_argument("--public-url", help="the URL browsers and Twilio use to reach this node")
    p_serve.set_defaults(run=serve)

    p_token = sub.add_parser("token", help="mint a development token for an agent or supervisor")
    common(p_token)
    p_token.add_argument("--agent", required=True, help="agent id from the config")
    p_token.add_argument("--site", help="site id (default: the first site)")
    p_token.add_argument("--ttl", type=int, default=12 * 3600, help="lifetime in seconds")
    p_token.set_defaults(run=token)

    p_bridge = sub.add_parser(
        "xmpp-bridge", help="post agents' XMPP presence to a site's IM presence webhook"
    )
    p_bridge.add_argument("--config", type=Path, required=True, help="the bridge's TOML file")
    p_bridge.set_defaults(run=xmpp_bridge)

    args = parser.parse_args(argv)
    try:
        return int(args.run(args))
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2


__all__ = ["main"]
