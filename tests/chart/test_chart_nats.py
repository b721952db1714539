"""Scaling out in the chart: one replica and its in-memory queue by default; more replicas only
with a shared NATS JetStream queue (a server of the user's, or the StatefulSet the chart runs),
then with a PodDisruptionBudget and a preferred anti-affinity; NATS credentials come from
Secrets mounted as files, and the server accepts the config the chart renders."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from engine.config import load_settings
from engine.plugins import load_plugins
from tests.chart.conftest import VALUES_ALL, Helm, Rendered, values_file
from tests.chart.sync import NATS_CREDENTIAL_KEYS, VALUES_SCHEMA
from tests.env.natsserver import nats_bin_dir

EXTERNAL: dict[str, Any] = {
    "replicaCount": 2,
    "nats": {
        "url": "tls://nats-0.nats.messaging:4222,tls://nats-1.nats.messaging:4222",
        "stream": "TALON",
        "auth": {"tokenSecretName": "nats-token"},
        "tls": {"caSecretName": "nats-ca", "caKey": "ca.pem", "certSecretName": "nats-client"},
    },
}
BUNDLED: dict[str, Any] = {"replicaCount": 2, "nats": {"deploy": {"enabled": True}}}


def pod_spec(rendered: Rendered) -> dict[str, Any]:
    return dict(rendered.one("Deployment")["spec"]["template"]["spec"])


def render(helm: Helm, tmp_path: Path, values: dict[str, Any]) -> Rendered:
    return helm.template((values_file(tmp_path, values),))


def refused(helm: Helm, tmp_path: Path, values: dict[str, Any]) -> str:
    """The reason ``helm template`` (as ``helm install``) gives for refusing ``values``."""
    res = helm.run(*helm.template_args((values_file(tmp_path, values),)), check=False)
    assert res.returncode != 0, "rendered, but should have been refused"
    return " ".join(res.stderr.split())


# ---------------------------------------------------------------- one replica by default


def test_by_default_one_replica_with_its_in_memory_queue_and_no_pdb_or_anti_affinity(
    default_render: Rendered,
) -> None:
    deploy = default_render.one("Deployment")
    assert deploy["spec"]["replicas"] == 1
    assert "affinity" not in deploy["spec"]["template"]["spec"]
    assert default_render.find("PodDisruptionBudget") == []
    assert default_render.find("StatefulSet") == []
    assert "nats" not in default_render.config()


@pytest.mark.parametrize(
    "values",
    [{"replicaCount": 2}, {"replicaCount": 3, "existingSecret": "my-config"}],
    ids=["replicas-2", "existing-secret"],
)
def test_several_replicas_without_nats_are_refused_with_the_reason(
    helm: Helm, tmp_path: Path, values: dict[str, Any]
) -> None:
    reason = refused(helm, tmp_path, values)
    assert f"replicaCount: {values['replicaCount']} needs a queue the replicas share" in reason
    assert "set nats.url" in reason and "nats.deploy.enabled=true" in reason
    assert "each replica would deduplicate and throttle on its own" in reason


# ---------------------------------------------------------------- a NATS server of the user's


@pytest.fixture(scope="module")
def external(helm: Helm, tmp_path_factory: pytest.TempPathFactory) -> Rendered:
    return render(helm, tmp_path_factory.mktemp("v"), EXTERNAL)


def test_with_a_nats_url_the_config_names_it_and_the_secrets_mounted_as_files(
    external: Rendered, tmp_path: Path
) -> None:
    assert external.config()["nats"] == {
        "url": EXTERNAL["nats"]["url"],
        "stream": "TALON",
        "subject": "falco-talon.events",
        "ackWait": 30,
        "maxDeliver": 5,
        "tokenFile": "/etc/falco-talon/nats/auth/token",
        "tls": {
            "caFile": "/etc/falco-talon/nats/ca/ca.pem",
            "certFile": "/etc/falco-talon/nats/tls/tls.crt",
            "keyFile": "/etc/falco-talon/nats/tls/tls.key",
        },
    }
    pod = pod_spec(external)
    secrets = {v["name"]: v["secret"] for v in pod["volumes"] if "secret" in v}
    assert secrets["nats-auth"] == {
        "secretName": "nats-token",
        "items": [{"key": "token", "path": "token"}],
    }
    assert secrets["nats-ca"] == {
        "secretName": "nats-ca",
        "items": [{"key": "ca.pem", "path": "ca.pem"}],
    }
    assert secrets["nats-tls"]["secretName"] == "nats-client"
    assert [i["key"] for i in secrets["nats-tls"]["items"]] == ["tls.crt", "tls.key"]
    (container,) = pod["containers"]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    for name, path in (
        ("nats-auth", "/etc/falco-talon/nats/auth"),
        ("nats-ca", "/etc/falco-talon/nats/ca"),
        ("nats-tls", "/etc/falco-talon/nats/tls"),
    ):
        # a directory, not a subPath: a rotated Secret reaches the pod
        assert mounts[name]["mountPath"] == path and mounts[name]["readOnly"] is True
        assert "subPath" not in mounts[name]
    # The server takes the rendered config as it is, and shows no credential in it.
    config_file, _ = external.write(tmp_path)
    settings = load_settings(str(config_file), load_plugins()[1], env={})
    assert settings.nats.url == EXTERNAL["nats"]["url"]
    assert settings.nats.token == "" and settings.nats.token_file.endswith("/token")


def test_an_nkey_seed_from_a_secret_is_mounted_and_named_in_the_config(
    helm: Helm, tmp_path: Path
) -> None:
    rendered = render(
        helm,
        tmp_path,
        {"nats": {"url": "nats://nats.example:4222", "auth": {"nkeySecretName": "talon-nkey"}}},
    )
    assert rendered.config()["nats"]["nkeySeedFile"] == "/etc/falco-talon/nats/nkey/user.nk"
    assert "tokenFile" not in rendered.config()["nats"]
    pod = pod_spec(rendered)
    secrets = {v["name"]: v["secret"] for v in pod["volumes"] if "secret" in v}
    assert secrets["nats-nkey"] == {
        "secretName": "talon-nkey",
        "items": [{"key": "user.nk", "path": "user.nk"}],
    }
    (container,) = pod["containers"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["nats-nkey"] == "/etc/falco-talon/nats/nkey"


def test_several_replicas_get_a_disruption_budget_and_spread_over_nodes(
    external: Rendered,
) -> None:
    deploy = external.one("Deployment")
    selector = deploy["spec"]["selector"]["matchLabels"]
    assert deploy["spec"]["replicas"] == 2
    pdb = external.one("PodDisruptionBudget")["spec"]
    assert pdb == {"maxUnavailable": 1, "selector": {"matchLabels": selector}}
    affinity = deploy["spec"]["template"]["spec"]["affinity"]
    assert affinity == {
        "podAntiAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {
                    "weight": 100,
                    "podAffinityTerm": {
                        "topologyKey": "kubernetes.io/hostname",
                        "labelSelector": {"matchLabels": selector},
                    },
                }
            ]
        }
    }


def test_the_affinity_of_the_values_replaces_the_default_and_the_budget_can_be_off(
    helm: Helm, tmp_path: Path
) -> None:
    mine = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [
            {"key": "pool", "operator": "In", "values": ["security"]}]}]}}}  # fmt: skip
    rendered = render(
        helm, tmp_path, {**EXTERNAL, "affinity": mine, "podDisruptionBudget": {"enabled": False}}
    )
    assert pod_spec(rendered)["affinity"] == mine
    assert rendered.find("PodDisruptionBudget") == []


def test_the_values_nats_section_covers_the_server_s_but_its_credentials() -> None:
    """Every setting of the server's nats section is a value of the chart's nats section,
    except the credentials, which only come from Secrets (a new setting fails this test)."""
    import json

    schema = json.loads(VALUES_SCHEMA.read_text())
    server_keys = set(schema["$defs"]["nats"]["properties"])
    config_schema = json.loads(
        (VALUES_SCHEMA.parents[2] / "schemas" / "config.schema.json").read_text()
    )
    assert set(config_schema["properties"]["nats"]["properties"]) == server_keys | set(
        NATS_CREDENTIAL_KEYS
    )
    values = schema["properties"]["nats"]["properties"]
    for key in server_keys:
        assert values[key] == {"$ref": f"#/$defs/nats/properties/{key}"}, key


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        (
            {"nats": {"url": "nats://x:4222", "deploy": {"enabled": True}}},
            "nats.url and nats.deploy.enabled are both set",
        ),
        (
            {"nats": {"auth": {"tokenSecretName": "t"}}},
            "no NATS server is configured",
        ),
        (
            {"nats": {"deploy": {"enabled": True}, "tls": {"caSecretName": "ca"}}},
            "the chart's NATS server speaks plain nats://",
        ),
        ({"nats": {"auth": {"token": "s3cret"}}}, "token"),  # never a plain credential
        ({"nats": {"url": "http://nats:4222"}}, "url"),
        (
            {
                "nats": {
                    "url": "nats://x:4222",
                    "auth": {"tokenSecretName": "t", "nkeySecretName": "k"},
                }
            },
            "NATS takes one way to authenticate",
        ),
        (
            {"nats": {"deploy": {"enabled": True}, "auth": {"nkeySecretName": "k"}}},
            "NKEYs are for a NATS server of yours",
        ),
    ],
    ids=[
        "url-and-deploy",
        "secret-without-nats",
        "tls-to-bundled",
        "plain-token",
        "bad-url",
        "token-and-nkey",
        "nkey-to-bundled",
    ],
)
def test_incoherent_nats_values_are_refused(
    helm: Helm, tmp_path: Path, values: dict[str, Any], complaint: str
) -> None:
    assert complaint in refused(helm, tmp_path, values)


# ---------------------------------------------------------------- the NATS server of the chart


@pytest.fixture(scope="module")
def bundled(helm: Helm, tmp_path_factory: pytest.TempPathFactory) -> Rendered:
    return render(helm, tmp_path_factory.mktemp("v"), BUNDLED)


def test_the_bundled_nats_is_a_statefulset_with_its_services_and_falco_talon_points_at_it(
    bundled: Rendered,
) -> None:
    sts = bundled.named("StatefulSet", "falco-talon-nats")
    client_svc = bundled.named("Service", "falco-talon-nats")
    headless = bundled.named("Service", "falco-talon-nats-headless")
    assert sts["spec"]["replicas"] == 1
    assert sts["spec"]["serviceName"] == "falco-talon-nats-headless"
    assert headless["spec"]["clusterIP"] == "None"
    pod_labels = sts["spec"]["template"]["metadata"]["labels"]
    for svc in (client_svc, headless):
        assert svc["spec"]["selector"].items() <= pod_labels.items()
    (port,) = client_svc["spec"]["ports"]
    assert (port["port"], port["targetPort"]) == (4222, "client")
    # falco-talon's config names the client Service by its DNS name, in the release namespace
    assert bundled.config()["nats"]["url"] == "nats://falco-talon-nats.falco.svc:4222"
    # falco-talon's selectors and the NATS pod's do not overlap
    talon = bundled.one("Deployment")["spec"]["selector"]["matchLabels"]
    assert not talon.items() <= pod_labels.items()
    assert (
        not sts["spec"]["selector"]["matchLabels"].items()
        <= bundled.one("Deployment")["spec"]["template"]["metadata"]["labels"].items()
    )
    assert bundled.named("Service", "falco-talon")["spec"]["selector"] == talon
    assert bundled.one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"] == talon


def test_the_bundled_nats_runs_the_project_s_image_non_root_on_a_claim(
    bundled: Rendered,
) -> None:
    sts = bundled.named("StatefulSet", "falco-talon-nats")
    pod = sts["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "falcosecurity/falco-talon-nats:2.15.2"
    assert "command" not in container  # the image's entrypoint: nats-server
    assert container["args"] == ["--config", "/etc/nats/nats.conf"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert pod["automountServiceAccountToken"] is False
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["port"] == "monitor"
        assert container[probe]["httpGet"]["path"].startswith("/healthz")
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts == {"config": "/etc/nats", "data": "/data"}
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "data"
    assert claim["spec"]["resources"]["requests"]["storage"] == "1Gi"
    assert "storageClassName" not in claim["spec"]  # the cluster's default class
    assert "data" not in {v["name"] for v in pod["volumes"]}
    # a new NATS configuration rolls the NATS pod
    assert "checksum/config" in sts["spec"]["template"]["metadata"]["annotations"]


def test_the_bundled_nats_config_is_valid_for_nats_server_and_keeps_the_token_out(
    helm: Helm, tmp_path: Path
) -> None:
    values = {**BUNDLED, "config": {"maxBodySize": 4 << 20}}
    values["nats"] = {"auth": {"tokenSecretName": "nats-token"}, "deploy": {"enabled": True}}
    rendered = render(helm, tmp_path, values)
    conf = rendered.named("ConfigMap", "falco-talon-nats-config")["data"]["nats.conf"]
    assert "token: $NATS_TOKEN" in conf  # from the container's environment, not the ConfigMap
    assert "max_file_store: 768Mi" in conf
    # an event as large as config.maxBodySize fits in one NATS message
    max_payload = int(next(x for x in conf.splitlines() if x.startswith("max_payload:")).split()[1])
    assert max_payload > 4 << 20
    sts = rendered.named("StatefulSet", "falco-talon-nats")
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["NATS_TOKEN"]["valueFrom"] == {
        "secretKeyRef": {"name": "nats-token", "key": "token"}
    }
    assert rendered.config()["nats"]["tokenFile"] == "/etc/falco-talon/nats/auth/token"
    # nats-server itself accepts the file (the store under tmp_path)
    (tmp_path / "nats.conf").write_text(conf.replace("/data", str(tmp_path / "data")))
    res = subprocess.run(
        [str(nats_bin_dir() / "nats-server"), "-c", str(tmp_path / "nats.conf"), "-t"],
        capture_output=True,
        text=True,
        env={**os.environ, "POD_NAME": "falco-talon-nats-0", "NATS_TOKEN": "0123abcd"},
        check=False,
        timeout=60,
    )
    assert res.returncode == 0 and "is valid" in res.stdout + res.stderr, res.stderr


@pytest.mark.parametrize(
    ("persistence", "volume", "claim_class"),
    [
        ({"enabled": False, "size": "2Gi"}, {"emptyDir": {"sizeLimit": "2Gi"}}, None),
        ({"storageClassName": "-"}, None, ""),
        ({"storageClassName": "fast-ssd"}, None, "fast-ssd"),
    ],
    ids=["emptydir", "no-class", "named-class"],
)
def test_the_store_is_a_claim_of_the_chosen_class_or_an_emptydir(
    helm: Helm,
    tmp_path: Path,
    persistence: dict[str, Any],
    volume: dict[str, Any] | None,
    claim_class: str | None,
) -> None:
    values = {**BUNDLED, "nats": {"deploy": {"enabled": True, "persistence": persistence}}}
    sts = render(helm, tmp_path, values).named("StatefulSet", "falco-talon-nats")
    volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
    if volume is not None:
        assert {k: v for k, v in volumes["data"].items() if k != "name"} == volume
        assert "volumeClaimTemplates" not in sts["spec"]
    else:
        assert "data" not in volumes
        (claim,) = sts["spec"]["volumeClaimTemplates"]
        assert claim["spec"]["storageClassName"] == claim_class


def test_a_pinned_cluster_ip_is_what_falco_talon_connects_to(helm: Helm, tmp_path: Path) -> None:
    values = {
        **BUNDLED,
        "nats": {"deploy": {"enabled": True, "service": {"clusterIP": "10.0.0.11", "port": 4333}}},
    }
    rendered = render(helm, tmp_path, values)
    assert rendered.named("Service", "falco-talon-nats")["spec"]["clusterIP"] == "10.0.0.11"
    assert rendered.config()["nats"]["url"] == "nats://10.0.0.11:4333"


def test_with_the_network_policy_only_falco_talon_reaches_the_bundled_nats(
    all_render: Rendered,
) -> None:
    policy = all_render.named("NetworkPolicy", "talon-all-nats")["spec"]
    sts = all_render.named("StatefulSet", "talon-all-nats")
    assert policy["podSelector"] == sts["spec"]["selector"]
    (ingress,) = policy["ingress"]
    assert ingress["from"] == [{"podSelector": all_render.one("Deployment")["spec"]["selector"]}]
    assert ingress["ports"] == [{"protocol": "TCP", "port": "client"}]


def test_every_nats_option_reaches_the_statefulset_and_the_config(all_render: Rendered) -> None:
    values = yaml.safe_load(VALUES_ALL.read_text())["nats"]
    deploy = values["deploy"]
    sts = all_render.named("StatefulSet", "talon-all-nats")
    pod = sts["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == f"{deploy['image']['repository']}:{deploy['image']['tag']}"
    assert container["imagePullPolicy"] == "Always"
    assert container["resources"] == deploy["resources"]
    assert pod["nodeSelector"] == deploy["nodeSelector"]
    assert pod["tolerations"] == deploy["tolerations"]
    assert pod["affinity"] == deploy["affinity"]
    assert pod["imagePullSecrets"] == [{"name": "registry-credentials"}]
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["storageClassName"] == "fast-ssd"
    assert claim["spec"]["resources"]["requests"]["storage"] == "2Gi"
    conf = all_render.named("ConfigMap", "talon-all-nats-config")["data"]["nats.conf"]
    assert "max_file_store: 1536Mi" in conf and "token: $NATS_TOKEN" in conf
    assert all_render.config()["nats"] == {
        "url": "nats://talon-all-nats.falco.svc:4223",
        "stream": "TALON_ALL",
        "subject": "talon-all.events",
        "ackWait": 20,
        "maxDeliver": 3,
        "tokenFile": "/etc/falco-talon/nats/auth/secret",
    }
    assert all_render.one("PodDisruptionBudget")["spec"]["minAvailable"] == 2
    # values.affinity replaces the default anti-affinity
    assert pod_spec(all_render)["affinity"] == yaml.safe_load(VALUES_ALL.read_text())["affinity"]
