"""The Helm chart renders, lints, and grants exactly the RBAC the code derives (no cluster
needed: ``helm lint``/``helm template`` and the ``falco-talon`` CLI)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.chart.conftest import FALCO_TALON, VALUES_ALL, Helm, Rendered, values_file
from tests.chart.sync import (
    CHART,
    DECLARATIONS,
    VALUES_SCHEMA,
    cli_declarations,
    schema_defs,
    strip_header,
)

Triple = tuple[str, str, str]


def triples(rules: list[dict[str, Any]]) -> set[Triple]:
    """RBAC rules as a set of (apiGroup, resource, verb)."""
    return {
        (g, r, v)
        for rule in rules
        for g in rule.get("apiGroups", [])
        for r in rule.get("resources", [])
        for v in rule.get("verbs", [])
    }


def cli_rbac(rendered: Rendered, tmp_path: Path) -> set[Triple]:
    config, rules = rendered.write(tmp_path)
    out = subprocess.run(
        [str(FALCO_TALON), "rbac", "-c", str(config), "-r", str(rules), "-o", "json"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return triples(json.loads(out)["rules"])


# ---------------------------------------------------------------- generated parts


def test_the_committed_rbac_declarations_are_what_the_code_declares() -> None:
    committed = DECLARATIONS.read_text()
    assert strip_header(committed) == cli_declarations(), (
        "charts/falco-talon/files/rbac-declarations.yaml is out of date: "
        "run `python -m tests.chart.sync`"
    )


def test_the_values_schema_checks_config_and_rules_as_the_server_schemas_do() -> None:
    committed = json.loads(VALUES_SCHEMA.read_text())["$defs"]
    assert committed == schema_defs(), (
        "values.schema.json $defs are out of date: run `python -m tests.chart.sync`"
    )


# ---------------------------------------------------------------- lint and render


@pytest.mark.parametrize("values", [(), (VALUES_ALL,)], ids=["default", "all-options"])
def test_helm_lint_strict_passes(helm: Helm, values: tuple[Path, ...]) -> None:
    args = ["lint", "--strict", str(CHART)]
    for v in values:
        args += ["-f", str(v)]
    res = helm.run(*args)
    assert "0 chart(s) failed" in res.stdout


def test_the_default_values_render_the_core_objects_and_no_optional_ones(
    default_render: Rendered,
) -> None:
    assert sorted(default_render.kinds()) == [
        "ClusterRole",
        "ClusterRoleBinding",
        "ConfigMap",
        "Deployment",
        "Secret",
        "Service",
        "ServiceAccount",
    ]


def test_every_option_renders_the_servicemonitor_networkpolicy_ingress_and_nats(
    all_render: Rendered,
) -> None:
    for kind in ("ServiceMonitor", "Ingress", "PodDisruptionBudget", "StatefulSet"):
        assert len(all_render.find(kind)) == 1, kind
    # falco-talon's and the bundled NATS server's
    assert [p["metadata"]["name"] for p in all_render.find("NetworkPolicy")] == [
        "talon-all",
        "talon-all-nats",
    ]
    monitor = all_render.one("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    assert monitor["spec"]["endpoints"][0]["port"] == "http"


def test_every_object_carries_the_standard_labels(
    default_render: Rendered, all_render: Rendered
) -> None:
    for rendered in (default_render, all_render):
        for doc in rendered.docs:
            labels = doc["metadata"]["labels"]
            for key in (
                "app.kubernetes.io/name",
                "app.kubernetes.io/instance",
                "app.kubernetes.io/version",
                "app.kubernetes.io/managed-by",
                "helm.sh/chart",
            ):
                assert key in labels, (doc["kind"], key)


def test_the_pod_runs_the_server_on_the_rules_directory_locked_down(
    default_render: Rendered,
) -> None:
    deploy = default_render.one("Deployment")
    pod = deploy["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "falcosecurity/falco-talon-py:0.1.0"  # tag = appVersion
    assert [*container["command"], *container["args"]] == [
        "falco-talon",
        "server",
        "-c",
        "/etc/falco-talon/config.yaml",
        "-r",
        "/etc/falco-talon/rules/",
    ]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    # The rules are a directory mount (a subPath would never see the ConfigMap's updates).
    assert "subPath" not in mounts["/etc/falco-talon/rules"]
    assert mounts["/etc/falco-talon/config.yaml"]["subPath"] == "config.yaml"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["rules"]["configMap"]["name"] == "falco-talon-rules"
    assert volumes["config"]["secret"]["secretName"] == "falco-talon"
    assert pod["serviceAccountName"] == "falco-talon"

    sc = container["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert sc["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["securityContext"]["runAsNonRoot"] is True

    assert container["ports"] == [{"name": "http", "containerPort": 2803, "protocol": "TCP"}]
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "http"}
    service = default_render.one("Service")
    assert service["spec"]["ports"][0]["port"] == 2803
    assert service["spec"]["selector"] == deploy["spec"]["selector"]["matchLabels"]


def test_the_rendered_config_leaves_kubeconfig_empty_for_in_cluster_credentials(
    default_render: Rendered, all_render: Rendered
) -> None:
    for rendered in (default_render, all_render):
        config = yaml.safe_load(rendered.config_yaml())
        assert config["kubeConfig"] == ""
        assert config["rulesFile"] == ["/etc/falco-talon/rules/"]
    assert yaml.safe_load(default_render.config_yaml())["listenPort"] == 2803


def test_a_cpu_limit_gives_one_server_process_per_cpu_of_it_unless_processes_is_set(
    helm: Helm, default_render: Rendered
) -> None:
    def processes(rendered: Rendered) -> Any:
        return yaml.safe_load(rendered.config_yaml()).get("processes")

    assert processes(default_render) is None  # no CPU limit: the server's default, one
    limited = helm.template(sets=("resources.limits.cpu=1500m",))
    assert processes(limited) == "auto"  # the server reads the quota: two processes
    chosen = helm.template(sets=("resources.limits.cpu=4", "config.processes=2"))
    assert processes(chosen) == 2


def test_rules_override_comes_after_the_rules_in_the_directory_s_name_order(
    all_render: Rendered,
) -> None:
    files = all_render.rules_files()
    names = [r["name"] for f in sorted(files) for r in yaml.safe_load(files[f])]
    assert names == ["Isolate", "Label", "Forensics", "Terminate"]


def test_changing_the_config_rolls_the_pods_but_changing_the_rules_does_not(
    helm: Helm, default_render: Rendered, tmp_path: Path
) -> None:
    def checksum(rendered: Rendered) -> str:
        meta = rendered.one("Deployment")["spec"]["template"]["metadata"]
        return str(meta["annotations"]["checksum/config"])

    base = checksum(default_render)
    assert checksum(helm.template(sets=("config.dryRun=true",))) != base
    other_rules = values_file(tmp_path, {"rules": LABELIZE_ONLY["rules"]})
    changed = helm.template((other_rules,))
    assert changed.rules_files() != default_render.rules_files()
    assert checksum(changed) == base


def test_an_existing_secret_replaces_the_rendered_one(helm: Helm) -> None:
    rendered = helm.template(sets=("existingSecret=my-talon-config",))
    assert rendered.find("Secret") == []
    pod = rendered.one("Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["config"]["secret"]["secretName"] == "my-talon-config"


def test_the_network_policy_only_admits_the_configured_pods_on_the_listen_port(
    all_render: Rendered,
) -> None:
    (policy,) = [
        p["spec"] for p in all_render.find("NetworkPolicy") if p["metadata"]["name"] == "talon-all"
    ]
    deploy = all_render.one("Deployment")
    assert policy["podSelector"]["matchLabels"] == deploy["spec"]["selector"]["matchLabels"]
    assert policy["policyTypes"] == ["Ingress"]
    (ingress,) = policy["ingress"]
    assert ingress["ports"] == [{"protocol": "TCP", "port": "http"}]
    names = [p["podSelector"]["matchLabels"]["app.kubernetes.io/name"] for p in ingress["from"]]
    assert names == ["falco", "falcosidekick", "prometheus"]
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    assert container["ports"][0] == {"name": "http", "containerPort": 2804, "protocol": "TCP"}


def test_the_termination_grace_period_covers_the_shutdown_timeout(
    default_render: Rendered, all_render: Rendered
) -> None:
    def grace(rendered: Rendered) -> int:
        return int(
            rendered.one("Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        )

    assert grace(default_render) > 30  # the server's default shutdownTimeout
    assert grace(all_render) > 20


# ---------------------------------------------------------------- values schema


@pytest.mark.parametrize(
    ("setting", "complaint"),
    [
        ("config.dryrun=true", "dryrun"),
        ("config.kubeConfig=/root/.kube/config", "kubeConfig"),
        # Falco Talon v0.3 spellings: the chart writes today's (logFormat is in its values),
        # and the server refuses a key given in both spellings.
        ("config.log_format=text", "log_format"),
        ("config.rules_files=/rules", "rules_files"),
        ("config.otel.collector_port=4317", "collector_port"),
        ("config.nats.url=nats://nats:4222", "nats"),  # the chart's: from the values' nats
        ("config.logFormat=xml", "logFormat"),
        ("config.notifiers.slack.webhook=https://x", "webhook"),
        ("rules[0].action.parameter.x=1", "parameter"),
        ("rules[0].match.priority=Critcal", "priority"),
    ],
)
def test_the_values_schema_refuses_what_the_server_would(
    helm: Helm, setting: str, complaint: str
) -> None:
    res = helm.run(*helm.template_args(sets=(setting,)), check=False)
    assert res.returncode != 0
    assert "schema" in res.stderr
    assert complaint in res.stderr


# ---------------------------------------------------------------- RBAC


def test_the_cluster_role_is_bound_to_the_chart_s_service_account(all_render: Rendered) -> None:
    binding = all_render.one("ClusterRoleBinding")
    assert binding["roleRef"]["name"] == all_render.one("ClusterRole")["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "talon-sa", "namespace": "falco"}
    ]
    assert all_render.one("ServiceAccount")["metadata"]["name"] == "talon-sa"


LABELIZE_ONLY: dict[str, Any] = {
    "config": {"defaultNotifiers": []},
    "rules": [
        {
            "name": "mark",
            "match": {"rules": ["Terminal shell in container"]},
            "action": {
                "name": "kubernetes:labelize",
                "parameters": {"labels": {"state": "marked"}},
            },
        }
    ],
}
TERMINATE_WITH_EVENTS_ON_ONE_RULE: dict[str, Any] = {
    "config": {"defaultNotifiers": "slack", "notifiers": {"slack": {"webhookurl": "https://x"}}},
    "rules": [],
    "rulesOverride": [
        {
            "name": "kill",
            "match": {"priority": ">=Critical"},
            "action": {"name": "kubernetes:terminate"},
            "notifiers": ["k8sevents"],
        }
    ],
}
NOTHING: dict[str, Any] = {"config": {"defaultNotifiers": []}, "rules": []}


@pytest.mark.parametrize(
    "values",
    [None, "all", LABELIZE_ONLY, TERMINATE_WITH_EVENTS_ON_ONE_RULE, NOTHING],
    ids=["default", "all-options", "labelize-only", "terminate-in-override", "no-rules"],
)
def test_the_cluster_role_grants_exactly_what_the_code_derives_for_the_rules_in_use(
    helm: Helm, tmp_path: Path, values: Any
) -> None:
    if values is None:
        files: tuple[Path, ...] = ()
    elif values == "all":
        files = (VALUES_ALL,)
    else:
        files = (values_file(tmp_path, values),)
    rendered = helm.template(files)
    granted = triples(rendered.one("ClusterRole")["rules"])
    assert granted == cli_rbac(rendered, tmp_path)
    if values is LABELIZE_ONLY:
        assert granted == {("", "pods", "get"), ("", "pods", "patch")}
    if values is NOTHING:
        assert granted == set()


def test_the_default_cluster_role_grants_nothing_beyond_the_actionners_and_events(
    default_render: Rendered,
) -> None:
    granted = triples(default_render.one("ClusterRole")["rules"])
    assert {g for g, _, _ in granted} == {"", "apps", "networking.k8s.io"}
    assert not {r for _, r, _ in granted} & {"secrets", "deployments", "configmaps", "*"}
    assert not {v for _, _, v in granted} & {
        "*",
        "escalate",
        "bind",
        "impersonate",
        "deletecollection",
    }


def test_an_unknown_actionner_is_refused_by_the_schema_and_by_the_rbac_union(
    helm: Helm, tmp_path: Path
) -> None:
    rule = {
        "name": "x",
        "match": {"priority": "Critical"},
        "action": {"name": "kubernetes:tcpdump"},
    }
    values = values_file(tmp_path, {"rules": [rule]})
    res = helm.run(*helm.template_args((values,)), check=False)
    assert res.returncode != 0
    assert "kubernetes:tcpdump" in res.stderr or "must be one of" in res.stderr
    # Without the schema (e.g. an image with more actionners than the declarations know),
    # the ClusterRole cannot be computed: the render fails rather than grant a guess.
    args = [*helm.template_args((values,)), "--skip-schema-validation"]
    res = helm.run(*args, check=False)
    assert res.returncode != 0
    assert 'rules use actionner "kubernetes:tcpdump"' in res.stderr
