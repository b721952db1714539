"""The `make run` demo: workloads in namespace `demo` on the local control plane, and a view
of what falco-talon did to them.

    python examples/demo.py setup  --kubeconfig FILE   # (re)create the demo workloads
    python examples/demo.py status --kubeconfig FILE   # pods, labels, NetworkPolicies, Events
    python examples/demo.py send EVENT.json --kubeconfig FILE --url URL
        # POST an example event, as Falcosidekick does, about a live pod of Deployment/ReplicaSet
        # `web` in `demo` (pod names are generated on a real node: the example's is replaced)

Without a controller-manager, pods are created the way a ReplicaSet/DaemonSet/StatefulSet
controller would create them (owner references, bound to a node, marked Ready).
"""

from __future__ import annotations

import argparse
import json
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from kubernetes import client, config

NS = "demo"
NODE = "talon-node-1"


def _api(kubeconfig: str) -> client.ApiClient:
    configuration = client.Configuration()
    config.load_kube_config(kubeconfig, client_configuration=configuration)
    return client.ApiClient(configuration)


def _ensure(create: Any, *args: Any) -> Any:
    try:
        return create(*args)
    except client.exceptions.ApiException as exc:
        if exc.status != 409:
            raise
        return None


def setup(api_client: client.ApiClient) -> None:
    core, apps = client.CoreV1Api(api_client), client.AppsV1Api(api_client)
    _ensure(core.create_namespace, {"metadata": {"name": NS}})
    template = {"spec": {"containers": [{"name": "app", "image": "nginx"}]}}
    workloads = [
        (
            "ReplicaSet",
            "web-7d4b9c7f5d",
            {"app": "web", "pod-template-hash": "7d4b9c7f5d"},
            apps.create_namespaced_replica_set,
            apps.read_namespaced_replica_set,
            ["web-7d4b9c7f5d-x2x8k", "web-7d4b9c7f5d-m9q4z", "web-7d4b9c7f5d-p7d2c"],
            {"replicas": 3},
        ),
        (
            "DaemonSet",
            "node-agent",
            {"app": "node-agent"},
            apps.create_namespaced_daemon_set,
            apps.read_namespaced_daemon_set,
            ["node-agent-q8f3t"],
            {},
        ),
        (
            "StatefulSet",
            "db",
            {"app": "db"},
            apps.create_namespaced_stateful_set,
            apps.read_namespaced_stateful_set,
            ["db-0"],
            {"serviceName": "db", "replicas": 1},
        ),
    ]
    for kind, name, labels, create, read, pods, extra in workloads:
        _ensure(
            create,
            NS,
            {
                "metadata": {"name": name, "labels": labels},
                "spec": {
                    **extra,
                    "selector": {"matchLabels": labels},
                    "template": {"metadata": {"labels": labels}, **template},
                },
            },
        )
        owner = read(name, NS)
        for pod in pods:
            try:
                current = core.read_namespaced_pod(pod, NS)
                if current.metadata.deletion_timestamp is None:
                    continue
                core.delete_namespaced_pod(pod, NS, grace_period_seconds=0)
            except client.exceptions.ApiException as exc:
                if exc.status != 404:
                    raise
            core.create_namespaced_pod(
                NS,
                {
                    "metadata": {
                        "name": pod,
                        "labels": labels,
                        "ownerReferences": [
                            {
                                "apiVersion": "apps/v1",
                                "kind": kind,
                                "name": name,
                                "uid": owner.metadata.uid,
                                "controller": True,
                            }
                        ],
                    },
                    "spec": {"nodeName": NODE, **template["spec"]},
                },
            )
            core.patch_namespaced_pod_status(
                pod,
                NS,
                {
                    "status": {
                        "phase": "Running",
                        "conditions": [{"type": "Ready", "status": "True"}],
                    }
                },
            )
    print(f"demo workloads ready in namespace {NS}")


def status(api_client: client.ApiClient) -> None:
    core, net = client.CoreV1Api(api_client), client.NetworkingV1Api(api_client)
    print(f"Pods in {NS}:")
    for pod in core.list_namespaced_pod(NS).items:
        state = "terminating" if pod.metadata.deletion_timestamp else "running"
        labels = ",".join(f"{k}={v}" for k, v in sorted((pod.metadata.labels or {}).items()))
        print(f"  {pod.metadata.name:28} {state:12} {labels}")
    print("NetworkPolicies:")
    for p in net.list_namespaced_network_policy(NS).items:
        print(
            f"  {p.metadata.name}: selects {p.spec.pod_selector.match_labels}, "
            f"policyTypes {p.spec.policy_types}, egress denied"
        )
    print("Events from falco-talon:")
    for e in sorted(
        core.list_namespaced_event(NS).items, key=lambda e: e.metadata.creation_timestamp
    ):
        print(f"  {e.type:8} {e.reason:28} {e.involved_object.name}: {e.message}")


def send(api_client: client.ApiClient, event_file: str, url: str) -> None:
    core = client.CoreV1Api(api_client)
    pods = [
        p
        for p in core.list_namespaced_pod(NS, label_selector="app=web").items
        if p.metadata.deletion_timestamp is None and p.status.phase == "Running"
    ]
    if not pods:
        raise SystemExit(f"no running pod labelled app=web in namespace {NS}")
    event = json.loads(Path(event_file).read_text())
    event["output_fields"]["k8s.pod.name"] = pods[0].metadata.name
    event["output_fields"]["k8s.ns.name"] = NS
    event["uuid"] = str(uuid.uuid4())
    request = urllib.request.Request(
        url.rstrip("/") + "/",
        data=json.dumps(event).encode(),
        method="POST",
        headers={
            "Content-Type": "application/json; charset=utf-8",
            "User-Agent": "Falcosidekick",
        },
    )
    with urllib.request.urlopen(request, timeout=10) as resp:
        print(f"{resp.status} {resp.read().decode()}  (pod {NS}/{pods[0].metadata.name})")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=["setup", "status", "send"])
    parser.add_argument("event", nargs="?", help="send: the event file")
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--url", default="http://127.0.0.1:2803", help="send: falco-talon's URL")
    args = parser.parse_args()
    with _api(args.kubeconfig) as api_client:
        if args.command == "send":
            if not args.event:
                parser.error("send needs an event file")
            send(api_client, args.event, args.url)
        else:
            (setup if args.command == "setup" else status)(api_client)


if __name__ == "__main__":
    main()
