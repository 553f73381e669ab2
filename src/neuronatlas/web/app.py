"""The read-only viewer app (FastAPI): every page of every served atlas, GET only.

Routes (``slug`` names one served atlas; see docs/viewer.md)::

    /                                     the served atlases
    /a/{slug}                             model, provenance, records, tables, studies, concepts
    /a/{slug}/heatmap?study=&method=&page=         selected neurons per concept x layer
    /a/{slug}/concept/{key}?layer=&study=&method=&page=
    /a/{slug}/neuron/L{layer}/{neuron}    statistics, decoded tokens, exemplars, explanation, selections
    /a/{slug}/features?layer=             SNMF features: per-layer FVU and L0, a layer's features
    /a/{slug}/feature/L{layer}/{feature}  one SNMF feature: statistics, decoded tokens, exemplars, neurons
    /a/{slug}/search?q=&kind=token|explanation|concept&match=&side=&direction=&page=
    /a/{slug}/study/{study}               a study's key numbers and plots
    /a/{slug}/study/{study}/files/{name}  a study's .png/.svg/.jpg/.html/.json file
    POST /a/{slug}/neuron/L{layer}/{neuron}/live   per-token activations of a typed text (serve --model only)
    /static/{name}                        the viewer's CSS and JavaScript

Bad parameters answer 400, unknown atlases/neurons/concepts/files 404, other methods 405; every
error is an HTML page. Nothing here imports torch or writes to the atlas.

    >>> from neuronatlas.web import Library, create_app
    >>> app = create_app(Library(["my-atlas"]))
    >>> import uvicorn; uvicorn.run(app, host="127.0.0.1", port=8765)  # serves until stopped  # doctest: +SKIP
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from neuronatlas.errors import NeuronAtlasError
from neuronatlas.web.data import (
    MAX_PAGE,
    MAX_QUERY_CHARS,
    STUDY_FILE_EXTS,
    AtlasView,
    BadRequest,
    Library,
    NotFound,
    neuron_from_url,
)
from neuronatlas.web.features import feature_context, features_context
from neuronatlas.web.neuron import neuron_context
from neuronatlas.web.pages import (
    atlas_context,
    concept_context,
    heatmap_context,
    home_context,
    search_context,
    study_context,
)
from neuronatlas.web.render import STATIC, ServerLinker, render

__all__ = ["create_app", "serve", "is_loopback", "LOOPBACK_HOSTS"]

LOOPBACK_HOSTS = ["127.0.0.1", "localhost", "::1", "[::1]"]
_PAGE_CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; script-src 'self'; "
             "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
_FILE_CSP = "sandbox allow-scripts; default-src 'self' data: 'unsafe-inline'; frame-ancestors 'none'"
_REASONS = {400: "bad request", 404: "not found", 405: "method not allowed", 500: "internal error"}
_log = logging.getLogger("neuronatlas.web")

PageQ = Annotated[int, Query(ge=1, le=MAX_PAGE, description="1-based page number")]
TextQ = Annotated[str, Query(max_length=MAX_QUERY_CHARS)]
NameQ = Annotated[str | None, Query(max_length=100)]
LayerQ = Annotated[int | None, Query(ge=0, le=9999)]


def is_loopback(host: str) -> bool:
    """True when ``host`` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class _SecurityHeaders:
    """Pure ASGI middleware: CSP, nosniff, no referrer, no framing on every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {k.lower() for k, _ in headers}
                for k, v in ((b"content-security-policy", _PAGE_CSP.encode()), (b"x-content-type-options", b"nosniff"),
                             (b"referrer-policy", b"no-referrer"), (b"x-frame-options", b"DENY")):
                    if k not in names:
                        headers.append((k, v))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _check_study_inside(view: AtlasView, study: str) -> None:
    """404 for a study folder that is (or passes through) a symlink leading out of the atlas."""
    folder = view.study_dir(study)
    root = view.atlas.path.resolve()
    if folder.exists() and root not in folder.resolve().parents:
        raise NotFound(f"study {study!r} is not in atlas {view.slug!r}")


def _html(template: str, context: dict[str, Any], status: int = 200) -> HTMLResponse:
    return HTMLResponse(render(template, context, ServerLinker()), status_code=status)


def _cached(view: AtlasView, key: tuple[Any, ...], build: Callable[[], tuple[str, dict[str, Any]]]) -> HTMLResponse:
    """Render through the atlas's page cache (errors are raised, never cached)."""
    return HTMLResponse(view.page(key, lambda: render(*build(), ServerLinker())))


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> HTMLResponse:
    ctx = {"title": f"{status} {_REASONS.get(status, 'error')}", "status": status,
           "reason": _REASONS.get(status, "error"), "message": message}
    return HTMLResponse(render("error.html", ctx, ServerLinker()), status_code=status, headers=headers)


def create_app(library: Library, *, allowed_hosts: Sequence[str] | None = None, live: Any = None) -> FastAPI:
    """The viewer for ``library``; ``allowed_hosts`` rejects other Host headers (DNS-rebinding guard).

    ``live`` (a :class:`neuronatlas.web.live.LiveModel`, only with ``serve --model``) adds the neuron
    page's "try your own text" box and its POST route (``web/live_api.py``)."""
    app = FastAPI(title="Neuron Atlas", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.library = library

    @app.exception_handler(NotFound)
    async def _not_found(request: Request, exc: NotFound) -> Response:
        return _error(404, str(exc))

    @app.exception_handler(BadRequest)
    async def _bad_request(request: Request, exc: BadRequest) -> Response:
        return _error(400, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        problems = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ())[1:]) or 'request'}: {e.get('msg', 'invalid')}"
                             for e in exc.errors())
        return _error(400, f"invalid parameters: {problems}")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        detail = exc.detail if exc.status_code != 404 else f"there is no page at {request.url.path!r}"
        return _error(exc.status_code, str(detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(NeuronAtlasError)
    async def _atlas_error(request: Request, exc: NeuronAtlasError) -> Response:
        _log.error("error while serving %s: %s", request.url.path, exc)
        return _error(500, f"the atlas could not be read: {exc}")

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> Response:
        _log.exception("unexpected error while serving %s", request.url.path)
        return _error(500, "unexpected error; the server log has the details")

    @app.get("/", response_class=HTMLResponse)
    def home() -> Response:
        return _html("home.html", home_context(library))

    @app.get("/a/{slug}", response_class=HTMLResponse)
    def atlas(slug: str) -> Response:
        view = library.get(slug)
        return _cached(view, ("atlas",), lambda: ("atlas.html", atlas_context(view)))

    @app.get("/a/{slug}/heatmap", response_class=HTMLResponse)
    def heatmap(slug: str, page: PageQ = 1, study: NameQ = None, method: NameQ = None) -> Response:
        view = library.get(slug)
        return _cached(view, ("heatmap", page, study, method),
                       lambda: ("heatmap.html", heatmap_context(view, page=page, study=study, method=method)))

    @app.get("/a/{slug}/concept/{key}", response_class=HTMLResponse)
    def concept(slug: str, key: str, page: PageQ = 1, layer: LayerQ = None, study: NameQ = None,
                method: NameQ = None) -> Response:
        view = library.get(slug)
        return _cached(view, ("concept", key, page, layer, study, method), lambda: (
            "concept.html", concept_context(view, key, page=page, layer=layer, study=study, method=method,
                                            linker=ServerLinker())))

    @app.get("/a/{slug}/neuron/{layer}/{neuron}", response_class=HTMLResponse)
    def neuron(slug: str, layer: str, neuron: str) -> Response:
        view = library.get(slug)
        lay, n = neuron_from_url(layer, neuron).pair
        return _cached(view, ("neuron", lay, n), lambda: ("neuron.html",
                                                          neuron_context(view, lay, n, live=live is not None)))

    @app.get("/a/{slug}/features", response_class=HTMLResponse)
    def features(slug: str, layer: LayerQ = None) -> Response:
        view = library.get(slug)
        return _cached(view, ("features", layer), lambda: ("features.html", features_context(view, layer)))

    @app.get("/a/{slug}/feature/{layer}/{feature}", response_class=HTMLResponse)
    def feature(slug: str, layer: str, feature: int) -> Response:
        view = library.get(slug)
        if not (layer[:1] in ("L", "l") and layer[1:].isdigit()) or feature < 0:
            raise BadRequest(f"bad feature address {layer}/{feature}; use /feature/L12/3")
        lay = int(layer[1:])
        return _cached(view, ("feature", lay, feature), lambda: ("feature.html", feature_context(view, lay, feature)))

    @app.get("/a/{slug}/search", response_class=HTMLResponse)
    def search(slug: str, q: TextQ = "", kind: Annotated[str, Query(max_length=20)] = "token", page: PageQ = 1,
               side: NameQ = None, direction: NameQ = None,
               match: Annotated[str, Query(max_length=20)] = "exact") -> Response:
        view = library.get(slug)
        return _cached(view, ("search", q, kind, page, side, direction, match), lambda: (
            "search.html", search_context(view, q=q, kind=kind, page=page, side=side, direction=direction,
                                          match=match)))

    @app.get("/a/{slug}/study/{study}", response_class=HTMLResponse)
    def study(slug: str, study: str) -> Response:
        view = library.get(slug)
        _check_study_inside(view, study)
        return _cached(view, ("study", study), lambda: ("study.html", study_context(view, study)))

    @app.get("/a/{slug}/study/{study}/files/{name}")
    def study_file(slug: str, study: str, name: str) -> Response:
        view = library.get(slug)
        _check_study_inside(view, study)
        path = view.study_file(study, name)
        ext = Path(name).suffix.lower()
        headers = {"Content-Security-Policy": _FILE_CSP} if ext in (".html", ".svg") else {}
        return FileResponse(path, media_type=STUDY_FILE_EXTS[ext], headers=headers)

    if live is not None:
        from neuronatlas.web.live_api import add_live_route

        add_live_route(app, library, live)
    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    app.add_middleware(_SecurityHeaders)
    if allowed_hosts:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))
    return app


def serve(atlases: Library | Sequence[str | Path], *, host: str = "127.0.0.1", port: int = 8765,
          log_level: str = "warning", live: Any = None) -> None:
    """Serve ``atlases`` (a Library or atlas paths) until interrupted (blocking).

    Loopback hosts get a Host-header guard against DNS rebinding.
    """
    import uvicorn

    library = atlases if isinstance(atlases, Library) else Library(atlases)
    for view in library:
        view.warm()  # copy tables into memory before the first request, not during it
    app = create_app(library, allowed_hosts=LOOPBACK_HOSTS if is_loopback(host) else None, live=live)
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False)
