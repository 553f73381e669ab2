"""The HTTP side of the "try your own text" box (no torch here: the model object is passed in).

``POST /a/{slug}/neuron/L{layer}/{neuron}/live`` with a JSON body ``{"text": "..."}`` answers
``{"tokens": [...], "display": [...], "acts": [...], "site": ..., "truncated": ...}``, or ``{"error": "one line"}`` with status 400 (bad input), 403 (a
client that is not on this machine), 413 (body too large), 415 (not JSON) or 429 (this client
already has a request running). The route exists only when the server was started with a model.

    >>> add_live_route(app, library, live)      # live: neuronatlas.web.live.LiveModel  # doctest: +SKIP
"""

from __future__ import annotations

import json
import threading
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from neuronatlas.errors import NeuronAtlasError
from neuronatlas.web.data import Library, neuron_from_url
from neuronatlas.web.render import display_token

__all__ = ["LiveSource", "add_live_route", "is_loopback_client"]


class LiveSource(Protocol):
    max_chars: int

    def activations(self, text: str, layer: int, neuron: int, slug: str = "") -> dict[str, Any]: ...


def is_loopback_client(host: str | None) -> bool:
    import ipaddress

    if not host:
        return False
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def add_live_route(app: FastAPI, library: Library, live: LiveSource) -> None:
    busy: set[str] = set()
    busy_lock = threading.Lock()

    @app.post("/a/{slug}/neuron/{layer}/{neuron}/live")
    async def live_activations(slug: str, layer: str, neuron: str, request: Request) -> JSONResponse:
        client = request.client.host if request.client else None
        if not is_loopback_client(client):
            return _error(403, "the live box answers only clients on this machine (loopback)")
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            return _error(415, "send the text as JSON: {\"text\": \"...\"} with Content-Type application/json")
        limit = 4 * live.max_chars + 1024
        try:
            declared = int(request.headers.get("content-length") or 0)
        except ValueError:
            declared = 0
        if declared > limit:
            return _error(413, f"the request is {declared} bytes; the limit is {limit}")
        body = await request.body()
        if len(body) > limit:
            return _error(413, f"the request is {len(body)} bytes; the limit is {limit}")
        try:
            payload = json.loads(body)
        except ValueError:
            return _error(400, "the body is not valid JSON; send {\"text\": \"...\"}")
        text = payload.get("text") if isinstance(payload, dict) else None
        if not isinstance(text, str):
            return _error(400, "the JSON body needs a string field \"text\"")
        key = str(client)
        with busy_lock:
            if key in busy:
                return _error(429, "one request at a time: wait for the previous text to finish")
            busy.add(key)
        try:
            view = library.get(slug)
            lay, n = neuron_from_url(layer, neuron).pair
            view.check_neuron(lay, n)
            result = await run_in_threadpool(live.activations, text, lay, n, view.slug)
        except NeuronAtlasError as exc:
            status = 404 if type(exc).__name__ == "NotFound" else 400
            return _error(status, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        finally:
            with busy_lock:
                busy.discard(key)
        result["display"] = [display_token(t) for t in result["tokens"]]
        return JSONResponse(result)
