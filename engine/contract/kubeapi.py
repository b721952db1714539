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

Plug-ins speak plain REST (:meth:`KubeApi.request`, :meth:`KubeApi.request_text`): a
method, a path, a query and a JSON body, answered with the API's JSON as plain data
(``pod["metadata"]["ownerReferences"]``). The request is built and sent by the official
client's ``ApiClient``, so every authentication of its ``Configuration`` (bearer token,
client certificate, in-cluster, refreshing tokens) applies, but neither its generated API
classes nor its pydantic models are loaded: those cost ~100 MB of memory per process
(``CoreV1Api`` alone imports ~200 model modules). The exec stream
(:meth:`KubeApi.open_exec`) is serialized the same way and opened by the client's websocket
code.

The engine's composition root calls :func:`use` with a client built by :func:`connect`
(``kubeConfig`` setting, else in-cluster, else ``~/.kube/config``); :func:`current` hands
it to plug-ins.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Callable, Mapping
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


POD_PATH = "/api/v1/namespaces/{namespace}/pods/{name}"
NODE_PATH = "/api/v1/nodes/{name}"
JSON = "application/json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
"""The default of a PATCH: what the client's generated methods send for a patch given as an
object (so a ``{"metadata": {"labels": ...}}`` patch merges as it always did)."""
MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
"""Its body is a list of operations."""


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


_API_PREFIX_SEGMENTS = {"api": 2, "apis": 3}
"""Segments of ``/api/v1`` and ``/apis/<group>/<version>``, before the resources."""


def span_resource(path: str) -> str:
    """The resource a path names, for low-cardinality span names: ``pods``, ``pods/log``,
    ``nodes``, ``networkpolicies`` (names and namespaces left out)."""
    parts = [p for p in path.split("?", 1)[0].split("/") if p]
    rest = parts[_API_PREFIX_SEGMENTS.get(parts[0], 0) :] if parts else []
    if len(rest) > 2 and rest[0] == "namespaces":
        rest = rest[2:]
    # rest is resource[/name[/subresource]]
    return "/".join(rest[:1] + rest[2:3]) or "/".join(parts[:1]) or "/"


class KubeApi:
    """The shared client: :meth:`request` (:meth:`request_text`) to run one REST request
    safely, :meth:`open_exec` for an exec stream."""

    def __init__(
        self,
        api_client: Any,
        retry: RetryPolicy = API_RETRY,
        threads: int = 16,
        request_timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        self.api_client = api_client
        self.retry = retry
        self.request_timeout = request_timeout
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="kubeapi")

    async def _run(
        self,
        span_name: str,
        what: str,
        fn: Callable[[], T],
        retry_policy: RetryPolicy | None,
    ) -> T:
        """``fn()`` in the pool, in a span named ``span_name`` (low-cardinality: the object
        goes in attributes), retried while the failure is transient; errors classified."""
        loop = asyncio.get_running_loop()
        with child(span_name, k8s__request=what) as span:

            async def once() -> T:
                try:
                    return await loop.run_in_executor(self._pool, fn)
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

    async def request(
        self,
        what: str,
        method: str,
        path: str,
        *,
        path_params: Mapping[str, str] | None = None,
        query: Mapping[str, Any] | None = None,
        body: Any = None,
        content_type: str | None = None,
        retry_policy: RetryPolicy | None = None,
    ) -> dict[str, Any]:
        """One REST request, without the client's generated classes: ``method`` on ``path``
        (``/api/v1/namespaces/{namespace}/pods/{name}``: each ``{key}`` replaced by
        ``path_params[key]``, URL-quoted), with ``query`` and the JSON ``body``
        (``content_type`` defaults to JSON, and to a strategic merge patch for PATCH);
        ``what`` names it in errors; ``retry_policy`` replaces the client's own for this
        call (an eviction is tried once: its 429 is a PodDisruptionBudget's no).

        Returns the answer's JSON as plain data, with the API's own (camelCase) keys; an
        empty dict for an empty answer. Raises :class:`ApiPermanentError` with the API's
        message (404 :class:`NotFound`, 409 :class:`Conflict`), :class:`ApiTemporaryError`
        (429, 5xx, unreachable) once the retries ran out, or the client's own exception
        untouched when it is a bug rather than an API answer."""
        data = await self._request(
            what, method, path, path_params, query, body, content_type, retry_policy
        )
        loaded = orjson.loads(data) if data else {}
        return loaded if isinstance(loaded, dict) else {}

    async def request_text(
        self,
        what: str,
        method: str,
        path: str,
        *,
        path_params: Mapping[str, str] | None = None,
        query: Mapping[str, Any] | None = None,
        retry_policy: RetryPolicy | None = None,
    ) -> str:
        """As :meth:`request`, for an answer that is text (a pod's log): the text."""
        data = await self._request(
            what, method, path, path_params, query, None, None, retry_policy, accept="*/*"
        )
        return data.decode("utf-8", errors="replace")

    async def _request(
        self,
        what: str,
        method: str,
        path: str,
        path_params: Mapping[str, str] | None,
        query: Mapping[str, Any] | None,
        body: Any,
        content_type: str | None,
        retry_policy: RetryPolicy | None,
        accept: str = JSON,
    ) -> bytes:
        method = method.upper()
        headers = {"Accept": accept}
        if body is not None or method in ("POST", "PUT", "PATCH"):
            headers["Content-Type"] = content_type or (
                STRATEGIC_MERGE_PATCH if method == "PATCH" else JSON
            )
        query_params = [(k, v) for k, v in (query or {}).items() if v is not None]

        def send() -> bytes:
            from kubernetes.client.exceptions import ApiException

            client = self.api_client
            # As the generated methods do: the ApiClient adds its default headers and the
            # Configuration's credentials (refreshing a token when it has a hook to).
            serialized = client.param_serialize(
                method=method,
                resource_path=path,
                path_params=dict(path_params or {}),
                query_params=query_params,
                header_params=dict(headers),
                body=body,
                auth_settings=["BearerToken"],
            )
            response = client.call_api(*serialized, _request_timeout=self.request_timeout)
            try:
                data: bytes = response.read() or b""
            finally:
                response.response.release_conn()
            if not 200 <= response.status <= 299:
                raise ApiException.from_response(http_resp=response, body=None, data=None)
            return data

        return await self._run(f"k8s {method} {span_resource(path)}", what, send, retry_policy)

    async def read_pod(self, namespace: str, name: str) -> dict[str, Any]:
        """The pod (its JSON), or :class:`NotFound`."""
        return await self.request(
            f"get pod {namespace}/{name}",
            "GET",
            POD_PATH,
            path_params={"namespace": namespace, "name": name},
        )

    def open_exec(
        self, namespace: str, name: str, container: str, command: list[str], timeout: float
    ) -> Any:
        """Open a ``pods/exec`` stream (stdout and stderr, no stdin, no tty) and return the
        client's websocket (``WSClient``: ``run_forever``, ``read_stdout``, ``returncode``,
        ``close``). Blocking: call it in the pool (:meth:`run_blocking`). ``timeout``: the
        socket's. The request is serialized by the shared ``ApiClient`` as the generated
        ``connect_get_namespaced_pod_exec`` would (same query, auth and headers) and opened
        by the client's own websocket code, without ``CoreV1Api`` and without swapping the
        shared client's transport (what the library's ``stream()`` does while it connects);
        a failure to connect raises the client's ``ApiException`` (status 0), as ``stream()``
        does."""
        from kubernetes.stream import ws_client

        method, url, headers, _, _ = self.api_client.param_serialize(
            method="GET",
            resource_path="/api/v1/namespaces/{namespace}/pods/{name}/exec",
            path_params={"namespace": namespace, "name": name},
            query_params=[
                ("command", command),
                ("container", container),
                ("stderr", True),
                ("stdin", False),
                ("stdout", True),
                ("tty", False),
            ],
            header_params={"Accept": "*/*"},
            auth_settings=["BearerToken"],
            collection_formats={"command": "multi"},
        )
        return ws_client.websocket_call(
            self.api_client.configuration,
            method,
            url,
            headers=headers,
            _request_timeout=timeout,
            _preload_content=False,
        )

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
    configuration.retries = False  # KubeApi retries, with backoff, itself
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
