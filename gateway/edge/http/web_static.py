"""The browser side, served by the gateway: the widget, the agent app, the supervisor's
board, the customer's ticket page, the demo site."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

WEB_CLIENT = Path(__file__).resolve().parents[3] / "web_client"
"""In a checkout: the repository's web_client/. An installed gateway names its copy
(``server.web_client_dir``)."""

log = logging.getLogger(__name__)


def web_client_root(configured: str) -> Path:
    root = Path(configured) if configured else WEB_CLIENT
    if not (root / "widget.js").is_file():
        # Without it the API works but no page does: say so at start, not with 404s.
        log.error(
            "no web client at %s: the widget, agent app and board are not served"
            " (set server.web_client_dir / MEMBRANE_WEB_CLIENT_DIR)",
            root,
        )
    return root


def _file(path: Path, cache: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def serve(request: web.Request) -> web.FileResponse:
        return web.FileResponse(path, headers={"Cache-Control": cache})

    return serve


def add_routes(app: web.Application, root: Path = WEB_CLIENT) -> None:
    if not root.is_dir():
        return
    # The embed line points at /widget.js forever; a short cache lets fixes reach every site.
    app.router.add_get("/widget.js", _file(root / "widget.js", "public, max-age=300"))
    app.router.add_get("/agent/", _file(root / "agent" / "index.html", "no-cache"))
    app.router.add_get("/demo/", _file(root / "demo" / "index.html", "no-cache"))
    app.router.add_get("/board/", _file(root / "board" / "index.html", "no-cache"))
    # The same page for every call: it names none and reads its status token from the URL's
    # fragment, so this answer says nothing about whether a call exists.
    ticket_page = root / "ticket" / "index.html"

    async def ticket(request: web.Request) -> web.FileResponse:
        return web.FileResponse(
            ticket_page, headers={"Cache-Control": "no-cache", "Referrer-Policy": "no-referrer"}
        )

    app.router.add_get("/t/{call_id}", ticket)

    async def redirect_agent(request: web.Request) -> web.Response:
        raise web.HTTPFound("/agent/")

    async def redirect_demo(request: web.Request) -> web.Response:
        raise web.HTTPFound("/demo/")

    async def redirect_board(request: web.Request) -> web.Response:
        raise web.HTTPFound("/board/")

    async def home(request: web.Request) -> web.Response:
        raise web.HTTPFound("/demo/")

    app.router.add_get("/agent", redirect_agent)
    app.router.add_get("/demo", redirect_demo)
    app.router.add_get("/board", redirect_board)
    app.router.add_get("/", home)
    app.router.add_static("/static/", root, show_index=False)
