"""Every request to the hub is bounded: ``PHI3OPS_HUB_TIMEOUT_S`` to connect, per read, per write.

Why huggingface_hub 2.4 alone is not bounded: its shared client has no timeout
(``httpx2.Client(timeout=None)``) and ``model_info`` and ``list_repo_tree`` pass none, so a hub
that accepts the connection and never answers hangs them forever. Where it does pass timeouts
(``HF_HUB_ETAG_TIMEOUT``, ``HF_HUB_DOWNLOAD_TIMEOUT``, 10 s each) it retries on them: a file's
metadata ``HEAD`` once more with 60 s and up to 5 retries with backoff, a tree page up to 5
retries, a body ``GET`` up to 5 resumes; minutes on a silent hub.

`install_hub_timeouts` makes huggingface_hub build its shared client with every transport
wrapped. The wrapper sets each request's timeouts to ``PHI3OPS_HUB_TIMEOUT_S`` (read at each
request, so a changed setting applies at once) and turns a timeout, while connecting, sending,
waiting for the answer or between two chunks of a body, into `HubTimeoutError` naming the
endpoint. That error is no httpx2 error, so none of huggingface_hub's retry loops catch it: a
silent hub fails the fetch within about ``PHI3OPS_HUB_TIMEOUT_S``. A slow download that keeps
sending bytes never times out. The client is otherwise huggingface_hub's own (its event hooks,
redirects, proxies from the environment); it serves every huggingface_hub call in the process.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import httpx2

from phi3ops.errors import HubTimeoutError
from phi3ops.settings import get_settings

_PHASES = {
    httpx2.ConnectTimeout: "connecting",
    httpx2.WriteTimeout: "sending the request",
    httpx2.PoolTimeout: "waiting for a free connection",
}
_lock = threading.Lock()
_installed = False


def install_hub_timeouts() -> None:
    """Makes huggingface_hub's shared HTTP client bound every request (idempotent).

    The client in use, if any, is closed; the next request builds a bounded one.
    """
    global _installed
    with _lock:
        if _installed:
            return
        from huggingface_hub import set_client_factory

        set_client_factory(_bounded_client)
        _installed = True


def timed_out_connecting(exc: BaseException) -> bool:
    """Whether ``exc`` is a `HubTimeoutError` raised before any connection opened."""
    return isinstance(exc, HubTimeoutError) and isinstance(exc.__cause__, httpx2.ConnectTimeout)


def _bounded_client() -> httpx2.Client:
    """huggingface_hub's default client, each of its transports wrapped in `_BoundedTransport`."""
    from huggingface_hub.utils._http import default_client_factory

    client = default_client_factory()
    # httpx2 keeps the default transport and the proxy mounts (from the environment) here; no
    # public hook wraps them without losing the proxies.
    client._transport = _BoundedTransport(client._transport)
    client._mounts = {
        pattern: None if transport is None else _BoundedTransport(transport)
        for pattern, transport in client._mounts.items()
    }
    return client


class _BoundedTransport(httpx2.BaseTransport):
    """Sets each request's timeouts and turns timeouts into `HubTimeoutError`."""

    def __init__(self, inner: httpx2.BaseTransport) -> None:
        self._inner = inner

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        seconds = get_settings().hub_timeout_s
        bound = {"connect": seconds, "read": seconds, "write": seconds, "pool": seconds}
        request.extensions = {**request.extensions, "timeout": bound}
        try:
            response = self._inner.handle_request(request)
        except httpx2.TimeoutException as exc:
            raise _timeout_error(request, exc, seconds) from exc
        return httpx2.Response(
            status_code=response.status_code,
            headers=response.headers,
            stream=_BoundedStream(response.stream, request, seconds),
            extensions=response.extensions,
        )

    def close(self) -> None:
        self._inner.close()

    def __enter__(self) -> _BoundedTransport:
        self._inner.__enter__()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._inner.__exit__(*exc_info)


class _BoundedStream(httpx2.SyncByteStream):
    """A response body whose read timeouts become `HubTimeoutError`."""

    def __init__(self, inner: Any, request: httpx2.Request, seconds: float) -> None:
        self._inner = inner
        self._request = request
        self._seconds = seconds

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self._inner
        except httpx2.TimeoutException as exc:
            raise _timeout_error(self._request, exc, self._seconds) from exc

    def close(self) -> None:
        if hasattr(self._inner, "close"):
            self._inner.close()


def _timeout_error(
    request: httpx2.Request, exc: httpx2.TimeoutException, seconds: float
) -> HubTimeoutError:
    url = request.url
    endpoint = f"{url.scheme}://{url.host}" + (f":{url.port}" if url.port else "")
    phase = _PHASES.get(type(exc), "waiting for an answer")
    return HubTimeoutError(
        f"The hub at {endpoint} did not answer {request.method} {url.path} for {seconds:g} s "
        f"({phase}). Check that the endpoint (PHI3OPS_HF_ENDPOINT, HF_ENDPOINT) is a working "
        f"hub and reachable from here, or raise PHI3OPS_HUB_TIMEOUT_S on a slow link."
    )
