"""The real kube-apiserver of the test environment accepts everything the chart renders
(server-side apply, strict field validation, dry run first), and the ServiceAccount it
installs may make every call the actionners make and nothing they do not (RBAC is on)."""

from __future__ import annotations

import json
import ssl
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, config
from kubernetes.dynamic import DynamicClient

from tests.chart.conftest import VALUES_ALL, Helm, Rendered, values_file
from tests.chart.sync import CHART
from tests.env.testenv import TestEnv, TestEnvInfo

pytestmark = pytest.mark.kubernetes

FIELD_MANAGER = "falco-talon-chart-test"

# The smallest CRD that lets the apiserver store ServiceMonitors (the Prometheus Operator's
# own CRD validates far more, but the chart only needs the kind to exist).
SERVICEMONITOR_CRD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "servicemonitors.monitoring.coreos.com"},
    "spec": {
        "group": "monitoring.coreos.com",
        "scope": "Namespaced",
        "names": {
            "kind": "ServiceMonitor",
            "listKind": "ServiceMonitorList",
            "plural": "servicemonitors",
            "singular": "servicemonitor",
        },
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {
                                "type": "object",
                                "x-kubernetes-preserve-unknown-fields": True,
                            }
                        },
                    }
                },
            }
        ],
    },
}


class Apiserver:
    """Server-side apply through plain REST (the dynamic client only finds the paths), so
    that fieldValidation=Strict turns a misspelt field in a template into an error."""

    def __init__(self, info: TestEnvInfo, api_client: client.ApiClient) -> None:
        self.info = info
        self.api_client = api_client
        self.ssl = ssl.create_default_context(cafile=str(info.ca_path))
        self._dyn: DynamicClient | None = None

    def dynamic(self, refresh: bool = False) -> DynamicClient:
        if self._dyn is None or refresh:
            self._dyn = DynamicClient(self.api_client)
        return self._dyn

    def path(self, doc: dict[str, Any], namespace: str) -> str:
        res = self.dynamic().resources.get(api_version=doc["apiVersion"], kind=doc["kind"])
        return str(
            res.path(name=doc["metadata"]["name"], namespace=namespace if res.namespaced else None)
        )

    def request(
        self, method: str, path: str, body: Any = None, **query: str
    ) -> tuple[int, dict[str, Any]]:
        url = self.info.server_url + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method)
        req.add_header("Authorization", f"Bearer {self.info.token}")
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", "application/apply-patch+yaml")
        try:
            with urllib.request.urlopen(req, context=self.ssl, timeout=10) as resp:
                return resp.status, json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"{}")

    def apply(self, doc: dict[str, Any], namespace: str, dry_run: bool) -> tuple[int, Any]:
        query = {"fieldManager": FIELD_MANAGER, "fieldValidation": "Strict", "force": "true"}
        if dry_run:
            query["dryRun"] = "All"
        return self.request("PATCH", self.path(doc, namespace), doc, **query)

    def get(self, doc: dict[str, Any], namespace: str) -> tuple[int, Any]:
        return self.request("GET", self.path(doc, namespace))

    def ensure_servicemonitor_crd(self) -> None:
        ext = client.ApiextensionsV1Api(self.api_client)
        try:
            ext.create_custom_resource_definition(SERVICEMONITOR_CRD)
        except client.exceptions.ApiException as exc:
            if exc.status != 409:
                raise
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            crd = ext.read_custom_resource_definition(SERVICEMONITOR_CRD["metadata"]["name"])
            conditions = {c.type: c.status for c in (crd.status.conditions or [])}
            if conditions.get("Established") == "True":
                self.dynamic(refresh=True)
                return
            time.sleep(0.1)
        raise AssertionError("the ServiceMonitor CRD never became Established")


def _admin_client(info: TestEnvInfo) -> client.ApiClient:
    configuration = client.Configuration()
    config.load_kube_config(str(info.kubeconfig), client_configuration=configuration)
    return client.ApiClient(configuration)


@pytest.fixture(scope="module")
def apiserver(control_plane: TestEnv) -> Iterator[Apiserver]:
    info = control_plane.info()
    with _admin_client(info) as api_client:
        server = Apiserver(info, api_client)
        server.ensure_servicemonitor_crd()
        yield server


def fresh_namespace(api: Apiserver) -> str:
    name = f"chart-{uuid.uuid4().hex[:8]}"
    client.CoreV1Api(api.api_client).create_namespace({"metadata": {"name": name}})
    return name


def render_into(helm: Helm, namespace: str, values: tuple[Any, ...]) -> Rendered:
    # A release name of its own: the ClusterRole and its binding are cluster-wide.
    release = f"talon-{namespace}"
    return helm.template(
        values, sets=(f"fullnameOverride={release}",), release=release, namespace=namespace
    )


def delete_cluster_scoped(api: Apiserver, rendered: Rendered) -> None:
    for doc in rendered.docs:
        if doc["kind"] in ("ClusterRole", "ClusterRoleBinding"):
            api.request("DELETE", api.path(doc, ""))


# Two replicas sharing the NATS server the chart runs, with its defaults (a claim of the
# default StorageClass, a PodDisruptionBudget, the anti-affinity).
SCALE_OUT: dict[str, Any] = {"replicaCount": 2, "nats": {"deploy": {"enabled": True}}}


@pytest.mark.parametrize(
    "values", [(), (VALUES_ALL,), SCALE_OUT], ids=["default", "all-options", "scale-out"]
)
def test_the_apiserver_accepts_every_rendered_manifest(
    helm: Helm, apiserver: Apiserver, values: tuple[Any, ...] | dict[str, Any], tmp_path: Path
) -> None:
    ns = fresh_namespace(apiserver)
    if isinstance(values, dict):
        values = (values_file(tmp_path, values),)
    rendered = render_into(helm, ns, values)
    if VALUES_ALL in values:
        assert "ServiceMonitor" in rendered.kinds()  # applied too: its CRD exists here
    if values and VALUES_ALL not in values:
        assert {"StatefulSet", "PodDisruptionBudget"} <= set(rendered.kinds())
    try:
        for doc in rendered.docs:
            status, body = apiserver.apply(doc, ns, dry_run=True)
            assert status in (200, 201), (doc["kind"], status, body.get("message"))
        for doc in rendered.docs:  # a dry run persists nothing
            assert apiserver.get(doc, ns)[0] == 404, doc["kind"]
        for doc in rendered.docs:
            status, body = apiserver.apply(doc, ns, dry_run=False)
            assert status in (200, 201), (doc["kind"], status, body.get("message"))
        for doc in rendered.docs:
            status, stored = apiserver.get(doc, ns)
            assert status == 200, doc["kind"]
            assert stored["metadata"]["labels"] == doc["metadata"]["labels"]
        role = apiserver.get(rendered.one("ClusterRole"), ns)[1]
        assert role["rules"] == rendered.one("ClusterRole")["rules"]
    finally:
        delete_cluster_scoped(apiserver, rendered)


def test_the_apiserver_refuses_a_misspelt_field_so_the_acceptance_above_means_something(
    apiserver: Apiserver, default_render: Rendered
) -> None:
    ns = fresh_namespace(apiserver)
    service = json.loads(json.dumps(default_render.one("Service")))
    service["metadata"]["namespace"] = ns
    service["spec"]["ports"][0]["targetPorts"] = "http"
    status, body = apiserver.apply(service, ns, dry_run=True)
    assert status >= 400  # server-side apply answers 500 "field not declared in schema"
    assert "targetPorts: field not declared in schema" in body["message"]


# ---------------------------------------------------------------- RBAC for real


@pytest.fixture(scope="module")
def installed(helm: Helm, apiserver: Apiserver) -> Iterator[tuple[str, str]]:
    """The default chart applied for real: (namespace, ServiceAccount name)."""
    ns = fresh_namespace(apiserver)
    rendered = render_into(helm, ns, ())
    for doc in rendered.docs:
        status, body = apiserver.apply(doc, ns, dry_run=False)
        assert status in (200, 201), (doc["kind"], status, body.get("message"))
    yield ns, rendered.one("ServiceAccount")["metadata"]["name"]
    delete_cluster_scoped(apiserver, rendered)


def allowed(
    apiserver: Apiserver,
    sa: tuple[str, str],
    verb: str,
    group: str,
    resource: str,
    subresource: str = "",
) -> bool:
    ns, name = sa
    review = client.AuthorizationV1Api(apiserver.api_client).create_subject_access_review(
        {
            "spec": {
                "user": f"system:serviceaccount:{ns}:{name}",
                "groups": ["system:serviceaccounts", f"system:serviceaccounts:{ns}"],
                "resourceAttributes": {
                    # any namespace: falco-talon acts wherever Falco saw the event
                    "namespace": "some-workload-namespace",
                    "verb": verb,
                    "group": group,
                    "resource": resource,
                    "subresource": subresource,
                },
            }
        }
    )
    return bool(review.status.allowed)


ACTIONNER_CALLS = [
    # kubernetes:terminate
    ("get", "", "pods", ""),
    ("list", "", "pods", ""),
    ("delete", "", "pods", ""),
    ("get", "apps", "replicasets", ""),
    # kubernetes:labelize
    ("patch", "", "pods", ""),
    # kubernetes:networkpolicy
    ("get", "networking.k8s.io", "networkpolicies", ""),
    ("create", "networking.k8s.io", "networkpolicies", ""),
    ("update", "networking.k8s.io", "networkpolicies", ""),
    ("get", "apps", "daemonsets", ""),
    ("get", "apps", "statefulsets", ""),
    # kubernetes:exec
    ("create", "", "pods", "exec"),
    # k8sevents (a default notifier)
    ("create", "", "events", ""),
]
NOT_NEEDED = [
    ("get", "", "secrets", ""),
    ("list", "", "secrets", ""),
    ("delete", "apps", "deployments", ""),
    ("create", "", "pods", ""),
    ("update", "", "pods", ""),
    ("get", "", "pods", "log"),
    ("delete", "networking.k8s.io", "networkpolicies", ""),
    ("get", "", "configmaps", ""),
    ("create", "rbac.authorization.k8s.io", "clusterrolebindings", ""),
]


@pytest.mark.parametrize(("verb", "group", "resource", "sub"), ACTIONNER_CALLS)
def test_the_chart_s_service_account_may_make_every_call_of_the_actionners(
    apiserver: Apiserver, installed: tuple[str, str], verb: str, group: str, resource: str, sub: str
) -> None:
    assert allowed(apiserver, installed, verb, group, resource, sub)


@pytest.mark.parametrize(("verb", "group", "resource", "sub"), NOT_NEEDED)
def test_the_chart_s_service_account_may_not_do_what_no_actionner_needs(
    apiserver: Apiserver, installed: tuple[str, str], verb: str, group: str, resource: str, sub: str
) -> None:
    assert not allowed(apiserver, installed, verb, group, resource, sub)


@pytest.mark.parametrize(
    "sets", [(), ("replicaCount=2", "nats.deploy.enabled=true")], ids=["one-replica", "scale-out"]
)
def test_helm_install_into_the_apiserver_succeeds_and_its_notes_say_how_to_send_events(
    helm: Helm, apiserver: Apiserver, sets: tuple[str, ...]
) -> None:
    ns = f"chart-{uuid.uuid4().hex[:8]}"
    release = f"talon-{ns}"
    env = {**helm.env, "KUBECONFIG": str(apiserver.info.kubeconfig)}
    base = [str(helm.binary), "--namespace", ns]
    res = subprocess.run(
        [
            *(*base, "install", release, str(CHART), "--create-namespace"),
            *("--set", "config.dryRun=true", "--timeout", "60s"),
            *(arg for s in sets for arg in ("--set", s)),
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=120,
    )
    try:
        assert res.returncode == 0, res.stderr
        assert "STATUS: deployed" in res.stdout
        url = f"http://{release}-falco-talon.{ns}:2803"
        assert f"address: {url}" in res.stdout  # Falcosidekick's talon output
        assert f"url: {url}/" in res.stdout  # Falco's http_output...
        assert "json_output: true" in res.stdout  # ...which needs JSON
        assert "DRY RUN" in res.stdout
        apps = client.AppsV1Api(apiserver.api_client)
        deploy = apps.read_namespaced_deployment(f"{release}-falco-talon", ns)
        assert deploy.spec.template.spec.service_account_name == f"{release}-falco-talon"
        if not sets:
            assert "One process with an in-memory queue" in res.stdout
        else:
            assert deploy.spec.replicas == 2
            nats = f"{release}-falco-talon-nats"
            assert apps.read_namespaced_stateful_set(nats, ns).spec.replicas == 1
            assert f"NATS JetStream at nats://{nats}.{ns}.svc:4222" in res.stdout
            assert f"store on PVC data-{nats}-0, kept by `helm uninstall`" in res.stdout
    finally:
        subprocess.run(
            [*base, "uninstall", release], capture_output=True, env=env, check=False, timeout=120
        )
