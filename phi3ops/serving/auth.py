"""Optional API keys for `phi3ops serve`: ``Authorization: Bearer <key>``, as OpenAI's clients
send their ``api_key``.

The key comes from an environment variable the operator names (``phi3ops serve --api-key-env
NAME``) or from a Prefect Secret block named by ``PHI3OPS_SERVE_API_KEY_SECRET``
(`resolve_api_key`, run once by the command before the server starts). The command hands it to
the server's workers in their environment (`API_KEY_ENV`), never on a command line, and each
worker takes it out of its environment when it builds its app (`take_api_key`).

`ApiKeyGuard` compares what a request presents with the key in constant time
(`hmac.compare_digest`) and answers a request without the right key with a 401 in OpenAI's error
shape and ``WWW-Authenticate: Bearer``, for every path but the open ones (by default the probes
and ``/metrics``: ``PHI3OPS_SERVE_OPEN_PATHS``). Neither the key nor what a request presented is
ever logged, recorded or put in an answer.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Coroutine, Iterable

from phi3ops.errors import InvalidInputError

#: The variable `phi3ops serve` passes the key to its workers in (taken out by `take_api_key`).
API_KEY_ENV = "PHI3OPS_SERVE_API_KEY"
#: Routes that may be left open (`Settings.serve_open_paths`); every other path needs the key.
OPERATION_PATHS = ("/ping", "/health", "/ready", "/metrics")
#: The body of a 401: OpenAI's error shape, as ``openai.AuthenticationError`` reads it.
_MISSING = "Missing API key: send it as 'Authorization: Bearer <key>'."
_WRONG = "Incorrect API key provided."


class ApiKeyGuard:
    """Decides whether a request may pass: the right bearer key, or an open path.

    Args:
        key: The API key requests must present.
        open_paths: Paths answered without the key (a subset of `OPERATION_PATHS`).
    """

    def __init__(self, key: str, *, open_paths: Iterable[str] = OPERATION_PATHS) -> None:
        if not key:
            raise InvalidInputError("The API key is empty: give a key of at least one character.")
        self._key = key.encode()
        self.open_paths = frozenset(open_paths)

    def __repr__(self) -> str:  # never the key
        return f"ApiKeyGuard(open_paths={sorted(self.open_paths)})"

    def refusal(self, path: str, headers: Iterable[tuple[bytes, bytes]]) -> str | None:
        """Why a request to ``path`` with ``headers`` is refused (a 401), or None."""
        if path in self.open_paths:
            return None
        presented = None
        for name, value in headers:
            if name.lower() == b"authorization":
                presented = value
                break
        if presented is None:
            return _MISSING
        scheme, _, token = presented.strip().partition(b" ")
        if scheme.lower() != b"bearer" or not token.strip():
            return _MISSING
        if not hmac.compare_digest(token.strip(), self._key):
            return _WRONG
        return None


def unauthorized_body(message: str) -> dict:
    """A 401's body in OpenAI's shape (``openai.AuthenticationError``)."""
    return {
        "error": {
            "message": message,
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key",
        }
    }


#: The headers of every 401.
UNAUTHORIZED_HEADERS = [(b"www-authenticate", b"Bearer")]


def resolve_api_key(*, env_name: str | None = None, secret_block: str | None = None) -> str | None:
    """The key `phi3ops serve` requires: the variable ``env_name`` when given, else the Prefect
    Secret block ``secret_block`` when given, else None (no key: the server is open).

    Raises:
        InvalidInputError: The variable is unset or empty, or the block does not exist or is
            empty.
    """
    if env_name:
        key = os.environ.get(env_name, "")
        if not key.strip():
            raise InvalidInputError(
                f"--api-key-env {env_name}: the environment variable {env_name} is "
                f"{'empty' if env_name in os.environ else 'not set'}. Set it to the key clients "
                f"must send, or leave --api-key-env out to serve without a key."
            )
        return key.strip()
    if not secret_block:
        return None
    from prefect.blocks.system import Secret

    try:
        secret = Secret.load(secret_block)
    except ValueError as exc:
        raise InvalidInputError(
            f"Prefect Secret block {secret_block!r} (PHI3OPS_SERVE_API_KEY_SECRET) does not "
            f"exist. Create it (`prefect block create secret`, or Secret(value=...).save(name)) "
            f"or unset the setting to serve without a key."
        ) from exc
    if isinstance(secret, Coroutine):  # Block.load in a running event loop: cannot wait here
        secret.close()
        raise RuntimeError(
            f"Prefect Secret block {secret_block!r} cannot be loaded while an event loop runs; "
            f"use --api-key-env instead."
        )
    value = secret.get()
    key = value if isinstance(value, str) else ""
    if not key.strip():
        raise InvalidInputError(
            f"Prefect Secret block {secret_block!r} (PHI3OPS_SERVE_API_KEY_SECRET) holds no "
            f"key (a non-empty string): save one in it, or unset the setting."
        )
    return key.strip()


def take_api_key() -> str | None:
    """The key handed to this worker in `API_KEY_ENV`, removed from its environment so that
    nothing it starts inherits it; None when the server is open.
    """
    key = os.environ.pop(API_KEY_ENV, "")
    return key or None
