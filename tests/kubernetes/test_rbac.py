"""Least privilege for real: a ServiceAccount bound to exactly the ClusterRole that
``falco-talon rbac`` derives from the declarations can do every actionner's job, and
nothing an actionner does not need (RBAC is on in the test apiserver)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from engine.contract import kubeapi
from engine.contract.kubeapi import ApiPermanentError, KubeApi
from engine.contract.retry import RetryPolicy
from engine.plugins import load_plugins
from engine.rbac import cluster_role, required_rules
from tests.env.testenv import TestEnvInfo
from tests.kubernetes.conftest import Cluster
from tests.kubernetes.harness import event_for, outcomes, start_talon

pytestmark = pytest.mark.kubernetes

RULES = """
- name: isolate
  match: {rules: [Terminal shell in container]}
  action: {name: kubernetes:networkpolicy}
- name: mark
  match: {rules: [Terminal shell in container]}
  action:
    name: kubernetes:labelize
    parameters: {labels: {suspicious: "true"}}
  before: true
- name: kill
  match: {rules: [Terminal shell in container]}
  action:
    name: kubernetes:terminate
    parameters: {minHealthyReplicas: "50%"}
"""


@pytest.fixture
async def as_talon(testenv: TestEnvInfo, cluster: Cluster) -> AsyncIterator[KubeApi]:
    """A KubeApi authenticated as a ServiceAccount bound to the derived ClusterRole."""
    actionners, notifiers = load_plugins()
    role_name = f"falco-talon-{cluster.ns}"
    rbac = client.RbacAuthorizationV1Api(cluster.core.api_client)
    rbac.create_cluster_role(cluster_role(role_name, required_rules(actionners, notifiers)))
    cluster.core.create_namespaced_service_account(cluster.ns, {"metadata": {"name": "talon"}})
    rbac.create_cluster_role_binding(
        {
            "metadata": {"name": role_name},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": role_name,
            },
            "subjects": [{"kind": "ServiceAccount", "name": "talon", "namespace": cluster.ns}],
        }
    )
    token = cluster.core.create_namespaced_service_account_token(
        "talon", cluster.ns, {"spec": {"expirationSeconds": 3600}}
    ).status.token
    configuration = client.Configuration()
    configuration.host = testenv.server_url
    configuration.ssl_ca_cert = str(testenv.ca_path)
    configuration.api_key = {"authorization": f"Bearer {token}"}
    configuration.retries = False
    api = KubeApi(client.ApiClient(configuration), RetryPolicy(attempts=2, backoff=0.05))
    kubeapi.use(api)
    yield api
    kubeapi.use(None)
    api.close()
    rbac.delete_cluster_role_binding(role_name)
    rbac.delete_cluster_role(role_name)


async def test_the_derived_role_is_enough_for_every_actionner_and_the_events_notifier(
    aiohttp_client: Any, tmp_path: Path, as_talon: KubeApi, cluster: Cluster
) -> None:
    rs = cluster.replicaset("web", replicas=2)
    ds = cluster.daemonset("agent")
    sts = cluster.statefulset("db")
    talon = await start_talon(aiohttp_client, tmp_path, RULES, default_notifiers=("k8sevents",))
    for pod in (rs.pods[0], ds.pods[0], sts.pods[0]):
        run = await talon.send(event_for(pod, cluster.ns))
        assert [o[1] for o in outcomes(run)] == ["succeeded", "succeeded", "succeeded"], outcomes(
            run
        )
    events = cluster.core.list_namespaced_event(cluster.ns).items
    assert len(events) == 9  # 3 results x 3 events, created as the ServiceAccount
    assert talon.service.pipeline.dispatcher.stats[("k8sevents", "failed")] == 0  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("what", "method", "path", "body"),
    [
        ("read secrets", "GET", "/api/v1/namespaces/{namespace}/secrets", None),
        (
            "create deployments",
            "POST",
            "/apis/apps/v1/namespaces/{namespace}/deployments",
            {
                "metadata": {"name": "x"},
                "spec": {
                    "selector": {"matchLabels": {"a": "x"}},
                    "template": {
                        "metadata": {"labels": {"a": "x"}},
                        "spec": {"containers": [{"name": "x", "image": "x"}]},
                    },
                },
            },
        ),
        (
            "create pods",
            "POST",
            "/api/v1/namespaces/{namespace}/pods",
            {"metadata": {"name": "x"}, "spec": {"containers": [{"name": "x", "image": "x"}]}},
        ),
        (
            "delete networkpolicies",
            "DELETE",
            "/apis/networking.k8s.io/v1/namespaces/{namespace}/networkpolicies/x",
            None,
        ),
    ],
)
async def test_the_derived_role_forbids_what_no_actionner_needs(
    as_talon: KubeApi, cluster: Cluster, what: str, method: str, path: str, body: Any
) -> None:
    with pytest.raises(ApiPermanentError) as err:
        await as_talon.request(what, method, path, path_params={"namespace": cluster.ns}, body=body)
    assert err.value.status == 403
    assert "forbidden" in str(err.value)


CATALOGUE = """
- name: annotate
  action:
    name: kubernetes:annotation
    parameters: {annotations: {falco.org/seen: "yes"}, level: node}
- name: script
  action: {name: kubernetes:script, parameters: {script: "echo hi >> $HOME/container.log"}}
- name: log
  action: {name: kubernetes:log, parameters: {tail_lines: 1}}
- name: calico
  action: {name: calico:networkpolicy}
- name: cilium
  action: {name: cilium:networkpolicy}
- name: cordon
  action: {name: kubernetes:cordon}
- name: drain
  action: {name: kubernetes:drain}
- name: delete
  action: {name: kubernetes:delete}
  continue: true
"""


async def test_the_derived_role_is_enough_for_the_originals_catalogue(
    aiohttp_client: Any,
    tmp_path: Path,
    as_talon: KubeApi,
    cluster: Cluster,
    node: str,
    crds: None,
) -> None:
    cluster.standalone("shell", {"app": "web"})
    cluster.core.create_namespaced_config_map(cluster.ns, {"metadata": {"name": "leaked"}})
    event = event_for("shell", cluster.ns)
    event["output_fields"].update(
        {
            "k8s.node.name": node,  # cordon, drain and the node annotation use this node
            "fd.rip": "203.0.113.7",
            "ka.target.resource": "configmaps",
            "ka.target.name": "leaked",
            "ka.target.namespace": cluster.ns,
        }
    )
    talon = await start_talon(aiohttp_client, tmp_path, CATALOGUE)
    run = await talon.send(event)
    assert sorted((o[0], o[1]) for o in outcomes(run)) == [
        (name, "succeeded")
        for name in sorted(
            ("annotate", "script", "log", "calico", "cilium", "cordon", "drain", "delete")
        )
    ], outcomes(run)
