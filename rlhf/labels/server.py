"""The labelling page and its JSON API over a LabelStore: `create_app`, `serve` (uvicorn) and `serving` (a thread).

Everything a client sends is untrusted: the body is capped before it is parsed, every error is a 4xx
with a JSON `{"error": ...}` and writes nothing, and model text reaches the browser only escaped
(Jinja's autoescape and `tojson`, `textContent` in label.js) under a CSP that runs no inline script.
"""

from __future__ import annotations

import contextlib
import json
import random
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from rlhf.labels.store import Annotator, Item, LabelError, LabelStore, Unauthorized

HERE = Path(__file__).parent
MAX_BODY = 16 * 1024  # a judgement with the longest comment is about 8 KiB of JSON
MAX_EXCLUDE = 100  # label.js sends at most its last 50 skips
HEADERS = [
    # no inline script at all: model text that slipped past escaping still could not run
    (b"content-security-policy", b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                                 b"connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),  # the page's URL holds the annotator's token
    (b"cache-control", b"no-store"),
]


class Forbidden(LabelError):
    status = 403


class BadRequest(LabelError):
    pass


class TooLarge(LabelError):
    status = 413


class UnsupportedType(LabelError):
    status = 415


class Invalid(LabelError):
    status = 422


class _Judgement(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    item_id: int = Field(ge=1, le=2**63 - 1)  # past int64 the database would fail with a 500, not a 404
    choice: str
    comment: str | None = None
    ms: int | None = None


def create_app(store: LabelStore, queue: str, gold_rate: float = 0.1, seed: int | None = None) -> FastAPI:
    app = FastAPI(title="rlhf label", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_Guard)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    pages = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=True)
    rng = random.Random(seed)

    def render(template: str, status: int = 200, **values) -> HTMLResponse:
        return HTMLResponse(pages.get_template(template).render(queue=queue, **values), status_code=status)

    def next_for(who: Annotator, exclude: tuple[int, ...] = ()) -> dict:
        item = store.next_item(who.id, queue, gold_rate=gold_rate, exclude=exclude, rng=rng)
        return {"item": _public(item), "progress": store.progress(who.id, queue)}

    @app.exception_handler(LabelError)
    async def label_error(request: Request, exc: LabelError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse({"error": str(exc)}, status_code=exc.status, headers=headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        message = {404: f"no such address: {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path}; use {(exc.headers or {}).get('Allow')}"}
        return JSONResponse({"error": message.get(exc.status_code, str(exc.detail))}, status_code=exc.status_code,
                            headers=exc.headers)

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/", response_class=HTMLResponse)
    def page(request: Request) -> HTMLResponse:
        try:
            who = _by_query(store, request)
        except Unauthorized as exc:
            return render("error.html", 401, message=str(exc))
        return render("label.html", annotator=who, first=next_for(who), stats_link=who.owner)

    @app.get("/stats", response_class=HTMLResponse)
    def stats_page(request: Request) -> HTMLResponse:
        try:
            who = _by_query(store, request)
            _owner(who)
        except LabelError as exc:
            return render("error.html", exc.status, message=str(exc))
        return render("stats.html", stats=store.stats(queue), annotator=who)

    @app.get("/api/next")
    def api_next(request: Request, exclude: str = "") -> dict:
        who = _by_header(store, request)
        return next_for(who, _ids(exclude))

    @app.post("/api/judgements", status_code=201)
    async def api_judge(request: Request) -> dict:
        who = await run_in_threadpool(_by_header, store, request)
        judgement = _judgement(request.headers.get("content-type", ""), await request.body())
        judgement_id = await run_in_threadpool(
            store.judge, who.id, judgement.item_id, judgement.choice, judgement.comment, judgement.ms
        )
        return {"id": judgement_id, "progress": await run_in_threadpool(store.progress, who.id, queue)}

    @app.post("/api/undo")
    def api_undo(request: Request) -> dict:
        who = _by_header(store, request)
        item = store.undo(who.id, queue)
        return {"item": _public(item), "progress": store.progress(who.id, queue)}

    @app.get("/api/stats")
    def api_stats(request: Request) -> dict:
        _owner(_by_header(store, request))
        return store.stats(queue)

    return app


def _public(item: Item | None) -> dict | None:
    """What a client sees of an item: never its purpose, so a gold check looks like any other pair."""
    if item is None:
        return None
    return {"id": item.id, "prompt": item.prompt, "response_a": item.response_a, "response_b": item.response_b}


def _by_header(store: LabelStore, request: Request) -> Annotator:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("missing token: send 'Authorization: Bearer <your token>'")
    return _known(store, token.strip())


def _by_query(store: LabelStore, request: Request) -> Annotator:
    token = request.query_params.get("token", "").strip()
    if not token:
        raise Unauthorized("missing token: open the personal link you were given (it ends in ?token=...)")
    return _known(store, token)


def _known(store: LabelStore, token: str) -> Annotator:
    who = store.authenticate(token)
    if who is None:
        raise Unauthorized("unknown token: ask the owner of this queue for your personal link")
    return who


def _owner(who: Annotator) -> None:
    if not who.owner:
        raise Forbidden(f"{who.name} may judge but not see the queue's statistics: they are for its owners")


def _ids(exclude: str) -> tuple[int, ...]:
    parts = [part.strip() for part in exclude.split(",") if part.strip()]
    if len(parts) > MAX_EXCLUDE:
        raise BadRequest(f"exclude: at most {MAX_EXCLUDE} item ids, got {len(parts)}")
    if not all(part.isascii() and part.isdigit() and len(part) <= 18 for part in parts):
        raise BadRequest("exclude: item ids are positive whole numbers separated by commas, e.g. exclude=4,17")
    return tuple(int(part) for part in parts)


def _judgement(content_type: str, body: bytes) -> _Judgement:
    if content_type.split(";")[0].strip().lower() != "application/json":
        raise UnsupportedType("send the judgement as application/json")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:  # ValueError also covers numbers too long to convert
        raise BadRequest(f"the body is not JSON: {exc}") from None
    try:
        return _Judgement.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors())
        raise Invalid(f"{problems} (a judgement is {{item_id, choice, comment, ms}})") from None


class _Guard:
    """Caps every request body at MAX_BODY before anyone reads it, and adds the security headers to every
    response, static files and errors included."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def secured(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *HEADERS]
            await send(message)

        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > MAX_BODY:
            response = JSONResponse({"error": f"the body is over {MAX_BODY} bytes"}, status_code=413)
            return await response(scope, receive, secured)
        seen = 0

        async def capped():  # a chunked body has no length to check up front
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > MAX_BODY:
                raise TooLarge(f"the body is over {MAX_BODY} bytes")
            return message

        await self.app(scope, capped, secured)


def serve(store: LabelStore, queue: str, host: str = "127.0.0.1", port: int = 8765, gold_rate: float = 0.1,
          seed: int | None = None) -> None:
    """Serve until Ctrl-C or SIGTERM. No access log: the page's URL carries the annotator's token."""
    uvicorn.run(create_app(store, queue, gold_rate, seed), host=host, port=port, access_log=False,
                log_level="warning", timeout_graceful_shutdown=5)


@contextlib.contextmanager
def serving(store: LabelStore, queue: str, gold_rate: float = 0.1, seed: int | None = None,
            host: str = "127.0.0.1") -> Iterator[str]:
    """The app on a free port in a background thread; yields its base URL and stops it on exit."""
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on such sockets, and without it every answer waits
    # about 40 ms for the client's delayed ACK
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    config = uvicorn.Config(create_app(store, queue, gold_rate, seed), access_log=False, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="label-server", daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the label server stopped while starting; see its log above")
            threading.Event().wait(0.02)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
