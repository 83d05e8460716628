"""Passing an HTTP request on to another gateway as it came, and its answer back as it was given.

The front of a multi-process gateway uses it to reach its processes (:mod:`webrtc_gateway.front`), and a gateway of a
fleet to reach the gateway that holds a session (:func:`webrtc_gateway.api.at_owner`).
"""

from __future__ import annotations

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

# headers that belong to one connection, not to the request or response passed on
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                        "transfer-encoding", "upgrade", "content-length"})
FORWARDED_BY = "X-Microturn-Forwarded-By"  # the gateway that passed the request on: it is not passed on again


async def forward(http: aiohttp.ClientSession, base_url: str, request: web.Request, body: bytes,
                  by: str | None = None) -> web.Response:
    """``request`` (its ``body`` already read) sent to ``base_url``; raises :class:`aiohttp.ClientError` or
    :class:`TimeoutError` when that gateway does not answer."""
    headers = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP)
    headers.add("X-Forwarded-For", request.remote or "")
    if by is not None:
        headers[FORWARDED_BY] = by
    url = URL(base_url.rstrip("/") + request.raw_path, encoded=True)
    async with http.request(request.method, url, headers=headers, data=body, allow_redirects=False) as resp:
        payload = await resp.read()
        answer = CIMultiDict((k, v) for k, v in resp.headers.items() if k.lower() not in HOP_BY_HOP)
        return web.Response(status=resp.status, body=payload, headers=answer)
