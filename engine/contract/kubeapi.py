"""Kubernetes API access for plug-ins: one shared client, typed errors, retries, off the loop.

Part of the engine's contract with plug-ins (like ``engine.contract.event``): actionners and the
``k8sevents`` notifier call the API through :class:`KubeApi`, never through a client of
their own, so that every call

* runs in a thread pool (the official client is synchronous: the event loop never blocks),
* is retried with capped exponential backoff when the failure is transient (429, 5xx,
  connection errors, timeouts) and then reported as :class:`ApiTemporaryError`,
* fails at once on a permanent error (400, 401, 403, 404, 409, 422) as
  :class:`ApiPermanentError` carrying the API's own message (:class:`NotFound`,
  :class:`Conflict` for the cases actionners handle).

The engine's composition root calls :func:`use` with a client built by :func:`connect`
(``kubeConfig`` setting, else in-cluster, else ``~/.kube/config``); :func:`current` hands
it to plug-ins.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson

from engine.contract.errors import PermanentError, TemporaryError
from engine.contract.retry import TRANSIENT_HTTP_STATUSES, Retried, RetryPolicy, retry
from observability.tracing import child

log = logging.getLogger("falco_talon.kubeapi")

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RbacRule:
    """One Kubernetes RBAC policy rule a plug-in needs (as in a ClusterRole)."""

    api_groups: tuple[str, ...]
    resources: tuple[str, ...]
    verbs: tuple[str, ...]

    def as_dict(self) -> dict[str, list[str]]:
        return {
            "apiGroups": list(self.api_groups),
            "resources": list(self.resources),
            "verbs": list(self.verbs),
        }


class ApiPermanentError(PermanentError):
    """The API refused for good; ``status`` is the HTTP status, the message the API's."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class NotFound(ApiPermanentError):
    """404: the object does not exist (any more)."""


class Conflict(ApiPermanentError):
    """409: the object already exists, or changed under us."""


class ApiTemporaryError(TemporaryError):
    """The API could not be reached or answered a transient error, every retry included."""

    def __init__(self, message: str, status: int | None = None, *, attempts: int = 1) -> None:
        super().__init__(message, attempts=attempts)
        self.status = status


class NotConfigured(PermanentError):
    """No Kubernetes configuration could be found."""


API_RETRY = RetryPolicy(attempts=5, backoff=0.2, max_backoff=3.0, jitter=True)
"""Calls per request (the first included) and the backoff between them."""
REQUEST_TIMEOUT = 10.0
"""Seconds one HTTP request may take (connect and read)."""


def _api_message(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if body:
        try:
            data = json.loads(body)
            if isinstance(data, dict) and data.get("message"):
                return str(data["message"])
        except (ValueError, TypeError):
            pass
    return str(getattr(exc, "reason", "") or exc)


def classify(exc: BaseException, what: str) -> Exception:
    """Turn a client exception into :class:`ApiPermanentError` or :class:`ApiTemporaryError`."""
    from kubernetes.client.exceptions import ApiException

    if isinstance(exc, ApiException):
        status = int(exc.status or 0)
        message = f"{what}: {_api_message(exc)} (HTTP {status})"
        if status in TRANSIENT_HTTP_STATUSES or status == 0:
            return ApiTemporaryError(message, status)
        if status == 404:
            return NotFound(message, status)
        if status == 409:
            return Conflict(message, status)
        return ApiPermanentError(message, status)
    if isinstance(exc, _network_errors()):
        reason = str(exc) or type(exc).__name__
        return ApiTemporaryError(
            f"{what}: Kubernetes API unreachable ({type(exc).__name__}: {reason[:200]})"
        )
    # Anything else is a bug, not an outage: hand it back untouched so it is not retried.
    return exc if isinstance(exc, Exception) else RuntimeError(str(exc))


def _network_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean the API could not be reached: connection, TLS, timeouts."""
    import urllib3
    import websocket

    return (urllib3.exceptions.HTTPError, OSError, TimeoutError, websocket.WebSocketException)


class KubeApi:
    """The shared client: typed API groups plus :meth:`call` to run one request safely."""

    def __init__(
        self,
        api_client: Any,
        retry: RetryPolicy = API_RETRY,
        threads: int = 16,
        request_timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        from kubernetes import client

        self.api_client = api_client
        self.retry = retry
        self.request_timeout = request_timeout
        self.core = client.CoreV1Api(api_client)
        self.apps = client.AppsV1Api(api_client)
        self.networking = client.NetworkingV1Api(api_client)
        self.rbac = client.RbacAuthorizationV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="kubeapi")

    async def call(
        self,
        what: str,
        fn: Callable[..., Any],
        *args: Any,
        retry_policy: RetryPolicy | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run ``fn(*args, **kwargs)`` in the pool with retries; ``what`` names it in errors.
        ``retry_policy`` replaces the client's own for this call (an eviction is tried once:
        its 429 is a PodDisruptionBudget's no, not throttling).

        Returns the client's model object (typed ``Any``: the client's models are loosely
        typed, and every field of them may be None). Raises :class:`ApiPermanentError` (or
        a subclass), :class:`ApiTemporaryError` once the retries ran out, or the client's
        own exception untouched when it is a bug rather than an API answer."""
        kwargs.setdefault("_request_timeout", self.request_timeout)
        loop = asyncio.get_running_loop()
        # Span names stay low-cardinality (the client method); the object goes in attributes.
        with child(f"k8s {getattr(fn, '__name__', 'call')}", k8s__request=what) as span:

            async def once() -> Any:
                try:
                    return await loop.run_in_executor(self._pool, lambda: fn(*args, **kwargs))
                except Exception as exc:
                    error = classify(exc, what)
                    if error is exc:
                        raise
                    span.set(http__response__status_code=getattr(error, "status", None))
                    raise error from exc

            def on_retry(attempt: int, error: BaseException, wait: float) -> None:
                span.event("retry", talon__attempt=attempt, talon__reason=str(error))
                log.warning("%s failed (%s), retry %d in %.2fs", what, error, attempt, wait)

            try:
                return await retry(
                    retry_policy or self.retry,
                    once,
                    lambda e: isinstance(e, ApiTemporaryError),
                    on_retry,
                )
            except Retried as failed:
                error = failed.error
                if isinstance(error, ApiTemporaryError):
                    message = f"{error} after {failed.attempts} attempt(s)"
                    raise ApiTemporaryError(
                        message, error.status, attempts=failed.attempts
                    ) from error.__cause__
                raise error from error.__cause__

    async def call_json(
        self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> dict[str, Any]:
        """As :meth:`call`, but the answer's JSON as plain data rather than the client's
        model objects: building those costs milliseconds per pod, on the path from an event
        to its action (errors are raised the same way)."""

        @functools.wraps(fn)
        def fetch(*a: Any, **kw: Any) -> dict[str, Any]:
            response = fn(*a, _preload_content=False, **kw)
            try:
                data = response.data
            finally:
                response.release_conn()
            loaded = orjson.loads(data) if data else {}
            return loaded if isinstance(loaded, dict) else {}

        result: dict[str, Any] = await self.call(what, fetch, *args, **kwargs)
        return result

    async def read_pod(self, namespace: str, name: str) -> Any:
        """The pod, or :class:`NotFound`."""
        return await self.call(
            f"get pod {namespace}/{name}", self.core.read_namespaced_pod, name, namespace
        )

    @contextlib.contextmanager
    def stream_core(self) -> Iterator[Any]:
        """A CoreV1Api on an ApiClient of its own (same configuration), for one exec stream.
        The client library's ``stream()`` swaps the transport of the ApiClient it is given
        for a websocket while it connects: on the shared client, the other threads' calls
        would go over a websocket meanwhile, and two streams starting together leave it
        swapped for good (every later call fails with "Handshake status 200 OK")."""
        from kubernetes import client

        api_client = client.ApiClient(self.api_client.configuration)
        try:
            yield client.CoreV1Api(api_client)
        finally:
            api_client.close()

    async def run_blocking(self, fn: Callable[[], T]) -> T:
        """Run a long blocking client operation (an exec stream) in the pool, no retries."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.api_client.close()


def connect(kubeconfig: str = "", retry: RetryPolicy = API_RETRY) -> KubeApi:
    """A client from ``kubeconfig``; when empty: in-cluster inside a pod, else the default
    kubeconfig (``$KUBECONFIG`` or ``~/.kube/config``)."""
    from kubernetes import client, config

    configuration = client.Configuration()
    try:
        if kubeconfig:
            config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
        elif os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config(client_configuration=configuration)
        else:
            config.load_kube_config(client_configuration=configuration)
    except (config.ConfigException, OSError, TypeError) as exc:
        where = kubeconfig or "in-cluster or ~/.kube/config"
        raise NotConfigured(f"no usable Kubernetes configuration ({where}): {exc}") from None
    configuration.retries = False  # KubeApi.call retries, with backoff, itself
    return KubeApi(client.ApiClient(configuration), retry)


_current: KubeApi | None = None
_default_kubeconfig = ""


def use(api: KubeApi | None, kubeconfig: str = "") -> None:
    """Make ``api`` the client plug-ins get (None: connect lazily from ``kubeconfig``)."""
    global _current, _default_kubeconfig  # noqa: PLW0603 - one API client per process
    _current = api
    _default_kubeconfig = kubeconfig


def close() -> None:
    """Close the shared client, if one was made (at shutdown, after the last action)."""
    global _current
    api, _current = _current, None
    if api is not None:
        api.close()


def current() -> KubeApi:
    """The shared client, connecting on first use; raises :class:`NotConfigured`."""
    global _current  # noqa: PLW0603
    if _current is None:
        _current = connect(_default_kubeconfig)
    return _current
