"""End-to-end check of the test kubelet: ``python -m tests.env.kubelet.smoke [--state-dir DIR]``.

Starts a control plane of its own (``TestEnv(DIR)``, default a fresh temp dir; it verifies
the kubelet's certificate with ``--kubelet-certificate-authority``) and a ``TestKubelet``,
creates a namespace and a two-container pod on the node, marks it Running through
``pods/status``, then execs into it with the Python ``kubernetes`` client (websocket, which
kube-apiserver translates to SPDY towards the kubelet). Stops what it started.
Not collected by pytest (needs the binaries; the first build takes minutes).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import uuid
from typing import Any

from tests.env.kubelet import TestKubelet, kubelet_apiserver_args
from tests.env.testenv import TestEnv


def _exec(core: Any, ns: str, pod: str, container: str, command: list[str], **kw: Any) -> Any:
    from kubernetes.stream import stream

    resp = stream(
        core.connect_get_namespaced_pod_exec,
        pod,
        ns,
        container=container,
        command=command,
        stderr=kw.pop("stderr", True),
        stdin=kw.pop("stdin", False),
        stdout=True,
        tty=kw.pop("tty", False),
        _preload_content=False,
    )
    return resp


def _run(core: Any, ns: str, pod: str, container: str, command: list[str]) -> tuple[str, str, int]:
    resp = _exec(core, ns, pod, container, command)
    resp.run_forever(timeout=10)
    out, err, rc = resp.read_stdout(), resp.read_stderr(), resp.returncode
    resp.close()
    return out, err, rc


def check(core: Any, node: str, sandbox_root: str) -> None:
    ns = f"kubelet-smoke-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"metadata": {"name": ns}})
    pod = "web-0"
    core.create_namespaced_pod(
        ns,
        {
            "metadata": {"name": pod},
            "spec": {
                "nodeName": node,
                "containers": [
                    {
                        "name": "app",
                        "image": "busybox",
                        "env": [{"name": "GREETING", "value": "hi"}],
                    },
                    {"name": "sidecar", "image": "busybox"},
                ],
            },
        },
    )
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    core.patch_namespaced_pod_status(
        pod,
        ns,
        {
            "status": {
                "phase": "Running",
                "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": now}],
                "containerStatuses": [
                    {
                        "name": c,
                        "ready": True,
                        "restartCount": 0,
                        "image": "busybox",
                        "imageID": "",
                        "state": {"running": {"startedAt": now}},
                    }
                    for c in ("app", "sidecar")
                ],
            }
        },
    )
    assert core.read_namespaced_pod_status(pod, ns).status.phase == "Running"

    results: dict[str, Any] = {}
    out, err, rc = _run(
        core, ns, pod, "app", ["/bin/sh", "-c", "echo hello; echo oops >&2; exit 3"]
    )
    results["exit3"] = (out, err, rc)
    assert out == "hello\n", out
    assert err == "oops\n", err
    assert rc == 3, rc

    out, err, rc = _run(core, ns, pod, "sidecar", ["id"])
    results["id"] = (out, err, rc)
    assert rc == 0 and out.startswith("uid="), (out, err, rc)

    out, _, rc = _run(core, ns, pod, "app", ["/bin/sh", "-c", 'echo "$HOSTNAME $GREETING $PWD"'])
    results["env"] = out
    assert rc == 0 and out == f"{pod} hi {sandbox_root}/{ns}/{pod}/app\n", out

    out, _, rc = _run(core, ns, pod, "sidecar", ["/bin/sh", "-c", "kill -9 $$"])
    results["killed"] = rc
    assert rc == 137, rc

    # stdin
    resp = _exec(core, ns, pod, "app", ["/bin/sh", "-c", "read x; echo got:$x"], stdin=True)
    resp.write_stdin("ping\n")
    resp.run_forever(timeout=10)
    results["stdin"] = resp.read_stdout()
    assert results["stdin"] == "got:ping\n", results["stdin"]
    assert resp.returncode == 0
    resp.close()

    # tty (stderr is folded into stdout; \r\n line ends)
    resp = _exec(core, ns, pod, "app", ["/bin/sh", "-c", "tty; exit 4"], tty=True, stderr=False)
    resp.run_forever(timeout=10)
    results["tty"] = (resp.read_stdout(), resp.returncode)
    assert results["tty"][0].startswith("/dev/pts/") and results["tty"][1] == 4, results["tty"]
    resp.close()

    # unknown command: an InternalError status (as with a real runtime), no exit code
    resp = _exec(core, ns, pod, "app", ["no-such-command"])
    resp.run_forever(timeout=10)
    err_channel = resp.read_channel(3)
    results["notfound"] = err_channel
    assert "executable file not found" in err_channel, err_channel
    resp.close()

    # container not in the pod: rejected by the apiserver before the kubelet
    from kubernetes.client.exceptions import ApiException

    try:
        _run(core, ns, pod, "nope", ["true"])
    except ApiException as e:
        results["bad container"] = (e.status, str(e.reason)[:120])
    else:
        raise AssertionError("exec into an unknown container succeeded")

    for k, v in results.items():
        print(f"  {k}: {v!r}")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.env.kubelet.smoke")
    parser.add_argument("--state-dir", default=None, help="TestEnv state dir (default: temp)")
    parser.add_argument("--node-name", default="talon-node-1")
    args = parser.parse_args()

    from kubernetes import client, config

    state_dir = args.state_dir or tempfile.mkdtemp(prefix="talon-kubelet-smoke-")
    env = TestEnv(state_dir, extra_apiserver_args=kubelet_apiserver_args(state_dir))
    info = env.start()
    try:
        t0 = time.monotonic()
        kubelet = TestKubelet(info.kubeconfig, args.node_name)
        with kubelet as k:
            print(f"kubelet ready in {time.monotonic() - t0:.1f}s: {k}")
            configuration = client.Configuration()
            load_kube_config: Any = config.load_kube_config  # untyped upstream
            load_kube_config(str(info.kubeconfig), client_configuration=configuration)
            with client.ApiClient(configuration) as api:
                core: Any = client.CoreV1Api(api)
                node: Any = core.read_node(args.node_name)
                ready = [c.status for c in node.status.conditions if c.type == "Ready"]
                print(
                    f"node {node.metadata.name}: Ready={ready} addresses="
                    f"{[(a.type, a.address) for a in node.status.addresses]} "
                    f"port={node.status.daemon_endpoints.kubelet_endpoint.port} "
                    f"taints={node.spec.taints}"
                )
                assert ready == ["True"]
                check(core, args.node_name, str(k.sandbox_root))
        with client.ApiClient(configuration) as api:
            after: Any = client.CoreV1Api(api).read_node(args.node_name)
            ready = [c.status for c in after.status.conditions if c.type == "Ready"]
            print(f"after stop: Ready={ready}")
            assert ready == ["False"]
    finally:
        if info.reused:
            print("control plane was reused; left running")
        env.stop()
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
