"""The deployment files, checked offline: the Kubernetes manifests against the API's own
schemas (kubernetes-validate ships them) and checkov's policies; the properties the
manifests and Compose files promise (probes, hardening, limits, what is exposed).

Self-contained on purpose: pytest, the standard library and the validation packages only.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml  # type: ignore[import-untyped]

pytestmark = pytest.mark.deploy

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "deploy" / "kubernetes"
HAPROXY_CFG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
# The oldest Kubernetes whose schemas the package ships that is still run widely, and the
# newest it knows.
KUBERNETES_VERSIONS = ("1.27.0", kubernetes_validate.latest_version())
# The checks the manifests skip, each with its reason written beside it in the manifest.
# Adding one here should take a reason as good.
JUSTIFIED_SKIPS = {"CKV_K8S_43"}
# The service's limits (SPEC: MAX_BODY_BYTES; README: WHATSAPP_MAX_BODY_BYTES) and its
# drain after SIGTERM (app/cli.py: timeout_graceful_shutdown).
MAX_BODY_BYTES = 65536
WHATSAPP_MAX_BODY_BYTES = 3 * 1024 * 1024
DRAIN_SECONDS = 20
# The feed's stream sends a keep-alive comment this often, and a long poll waits at most
# this long (app/api/feed.py: KEEPALIVE_SECONDS, WAIT_MAX_SECONDS).
FEED_KEEPALIVE_SECONDS = 15
FEED_WAIT_MAX_SECONDS = 8
# PostgreSQL's default max_connections less superuser_reserved_connections, less room
# for migrations and an operator's psql (docs/postgres.md, Connection budget).
CONNECTION_BUDGET = 100 - 3 - 10


def load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def resources() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text("utf-8"))
    return [
        doc for name in kustomization["resources"] for doc in load_yaml_documents(MANIFESTS / name)
    ]


def one(kind: str) -> dict[str, Any]:
    found = [doc for doc in resources() if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def pod() -> dict[str, Any]:
    spec: dict[str, Any] = one("Deployment")["spec"]["template"]["spec"]
    return spec


def container() -> dict[str, Any]:
    containers: list[dict[str, Any]] = one("Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


class ComposeLoader(yaml.SafeLoader):  # type: ignore[misc]
    """Reads Compose's `!reset` tag (an override that empties a value)."""


ComposeLoader.add_constructor("!reset", lambda loader, node: None)


def compose_services() -> dict[str, dict[str, Any]]:
    """docker-compose.yml with docker-compose.postgres.yml over it, merged one level down."""
    services: dict[str, dict[str, Any]] = {}
    for name in ("docker-compose.yml", "docker-compose.postgres.yml"):
        document = yaml.load((ROOT / name).read_text("utf-8"), Loader=ComposeLoader)  # noqa: S506
        for service, settings in document["services"].items():
            services.setdefault(service, {}).update(settings)
    return services


def test_every_manifest_is_applied_by_the_kustomization() -> None:
    kustomization = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text("utf-8"))
    files = {path.name for path in MANIFESTS.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_manifests_match_the_kubernetes_schemas(version: str) -> None:
    problems = []
    for resource in resources():
        name = f"{resource['kind']}/{resource['metadata']['name']}"
        try:
            kubernetes_validate.validate(resource, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(part) for part in exc.path)
            problems.append(f"{name}: {path}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            problems.append(f"{name}: {exc.message}")
    assert not problems


def checkov_command() -> str:
    configured = os.environ.get("CHECKOV")
    if configured:
        # `make test` says where it built checkov: missing then is an error, not a skip.
        return configured
    local = ROOT / ".venv" / "checkov" / "bin" / "checkov"
    found = str(local) if local.exists() else shutil.which("checkov")
    if found is None:
        pytest.skip("checkov is not installed (`make test` builds it in .venv/checkov)")
    return found


def test_checkov_finds_nothing_unjustified() -> None:
    # --skip-download: offline, so no severities either (they come from the vendor's
    # platform): the bar is no failed check at all.
    done = subprocess.run(
        [
            checkov_command(),
            *("--directory", str(MANIFESTS), "--framework", "kubernetes"),
            *("--skip-download", "--output", "json"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.stdout.strip(), done.stderr[-2000:]
    report = json.loads(done.stdout)
    failed = [
        f"{check['check_id']} {check['resource']}: {check['check_name']}"
        for check in report["results"].get("failed_checks", [])
    ]
    assert failed == []
    assert report["summary"]["parsing_errors"] == 0
    assert report["summary"]["resource_count"] >= len(resources())
    skipped = {check["check_id"] for check in report["results"].get("skipped_checks", [])}
    assert skipped == JUSTIFIED_SKIPS


def test_pods_are_probed_and_drain_before_they_stop() -> None:
    api = container()
    assert api["livenessProbe"]["httpGet"]["path"] == "/health/live"
    assert api["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert api["startupProbe"]["httpGet"]["path"] == "/health/live"
    readiness = api["readinessProbe"]
    # Out of the Service within about 2 s of readiness failing.
    assert readiness["periodSeconds"] * readiness["failureThreshold"] <= 2
    pre_stop = api["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    grace = one("Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= int(pre_stop[1]) + DRAIN_SECONDS


def test_pods_are_hardened() -> None:
    pod = one("Deployment")["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    security = container()["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert "add" not in security["capabilities"]
    resources_ = container()["resources"]
    assert {"cpu", "memory"} <= resources_["requests"].keys()
    assert {"cpu", "memory"} <= resources_["limits"].keys()
    labels = one("Namespace")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


def test_secrets_come_from_the_secret_as_files_and_the_image_is_this_version() -> None:
    env = {item["name"]: item for item in container()["env"]}
    # Files, not environment variables: nothing secret in the pod's environment.
    assert not [item for item in env.values() if "valueFrom" in item]
    mounts = {mount["name"]: mount for mount in container()["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in pod()["volumes"]}
    (secret_volume,) = [name for name, volume in volumes.items() if "secret" in volume]
    assert volumes[secret_volume]["secret"]["secretName"] == "webhook-receiver"
    assert mounts[secret_volume]["readOnly"] is True
    directory = mounts[secret_volume]["mountPath"]
    for name, key in (("WEBHOOK_SECRET", "webhook-secret"), ("DATABASE_URL", "database-url")):
        assert name not in env
        assert env[f"{name}_FILE"]["value"] == f"{directory}/{key}"
    # Readable by the app's group only (fsGroup), not by everyone.
    assert volumes[secret_volume]["secret"]["defaultMode"] == 0o440
    assert pod()["securityContext"]["fsGroup"] == pod()["securityContext"]["runAsGroup"]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))["project"]
    assert container()["image"] == f"webhook-receiver:{project['version']}"


def test_the_pieces_point_at_each_other() -> None:
    labels = one("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert one("Deployment")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert one("Service")["spec"]["selector"].items() <= labels.items()
    assert one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert one("NetworkPolicy")["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    target = one("HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", one("Deployment")["metadata"]["name"])
    assert (
        one("Deployment")["spec"]["template"]["spec"]["serviceAccountName"]
        == (one("ServiceAccount")["metadata"]["name"])
    )
    service = one("Service")
    ports = {port["name"] for port in service["spec"]["ports"]}
    for ingress in (doc for doc in resources() if doc["kind"] == "Ingress"):
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                assert backend["name"] == service["metadata"]["name"]
                assert backend["port"]["name"] in ports


def test_only_the_ingress_reaches_the_pods_and_only_public_paths_are_routed() -> None:
    policy = one("NetworkPolicy")["spec"]
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    (rule,) = policy["ingress"]
    assert all(set(peer) == {"namespaceSelector"} for peer in rule["from"])
    assert [port["port"] for port in rule["ports"]] == [8000]
    routed = {
        path["path"]: ingress["metadata"].get("annotations", {})
        for ingress in resources()
        if ingress["kind"] == "Ingress"
        for rule in ingress["spec"]["rules"]
        for path in rule["http"]["paths"]
    }
    assert set(routed) == {"/webhook", "/webhook/whatsapp", "/health/live", "/health/ready"}
    sizes = {"k": 1024, "m": 1024 * 1024}

    def body_size(path: str) -> int:
        value = routed[path]["nginx.ingress.kubernetes.io/proxy-body-size"]
        return int(value[:-1]) * sizes[value[-1]]

    assert body_size("/webhook") == MAX_BODY_BYTES
    assert body_size("/webhook/whatsapp") == WHATSAPP_MAX_BODY_BYTES


def test_replicas_times_pool_fit_the_database() -> None:
    env = {item["name"]: item.get("value") for item in container()["env"]}
    max_replicas = one("HorizontalPodAutoscaler")["spec"]["maxReplicas"]
    assert one("HorizontalPodAutoscaler")["spec"]["minReplicas"] >= 2
    surge = int(one("Deployment")["spec"]["strategy"]["rollingUpdate"]["maxSurge"])
    # Each replica: its pool, and the feed's LISTEN connection.
    per_replica = int(env["DATABASE_POOL_SIZE"]) + 1
    assert (max_replicas + surge) * per_replica <= CONNECTION_BUDGET


def test_compose_services_are_hardened_and_bounded() -> None:
    services = compose_services()
    assert set(services) == {"api", "postgres", "lb"}
    for name, service in services.items():
        assert service["read_only"] is True, name
        assert service["cap_drop"] == ["ALL"], name
        assert "cap_add" not in service, name
        assert "no-new-privileges:true" in service["security_opt"], name
        assert {"mem_limit", "pids_limit"} <= service.keys(), name
        assert service["ulimits"]["nofile"]["hard"] <= 16384, name
        # A path inside the container, sized, not a temporary file of ours.
        (tmp,) = [mount for mount in service["tmpfs"] if mount.split(":")[0] == "/tmp"]  # noqa: S108
        assert "size=" in tmp, name
    # The images' own non-root users (the api image sets its own in the Dockerfile).
    assert services["postgres"]["user"] == "postgres"
    assert services["lb"]["user"] == "haproxy"


def test_compose_pins_the_official_tags_and_answers_senders_in_time() -> None:
    services = compose_services()
    assert re.fullmatch(r"postgres:15(\.\d+)?-bookworm", services["postgres"]["image"])
    assert re.fullmatch(r"haproxy:2\.6(\.\d+)?", services["lb"]["image"])
    # The sender's 5 s include the balancer's hop (docker-compose.postgres.yml).
    timeout = services["api"]["environment"]["WRITE_TIMEOUT_SECONDS"]
    assert float(re.sub(r"\$\{WRITE_TIMEOUT_SECONDS:-(.+)\}", r"\1", timeout)) < 5


def test_the_balancer_exposes_public_paths_with_the_services_limits() -> None:
    services = compose_services()
    published = services["lb"]["ports"]
    operator = [port for port in published if port.endswith(":8001")]
    assert operator
    assert all(port.startswith("127.0.0.1:") for port in operator)
    config = HAPROXY_CFG.read_text("utf-8")
    assert re.search(r"^\s*bind 127\.0\.0\.1:8404$", config, re.MULTILINE), "stats on loopback"
    assert "acl webhook path /webhook\n" in config
    assert "acl whatsapp path /webhook/whatsapp\n" in config
    assert re.search(r"return status 404 .* unless webhook \|\| whatsapp \|\| probe$", config, re.M)
    limits = re.findall(r"if (\w+) \{ req\.hdr_val\(content-length\) gt (\d+) \}", config)
    assert {path: int(size) for path, size in limits} == {
        "webhook": MAX_BODY_BYTES,
        "whatsapp": WHATSAPP_MAX_BODY_BYTES,
    }
    # The whole /webhook request fits in one buffer: HAProxy can size-check and retry it.
    bufsize = int(re.findall(r"tune\.bufsize (\d+)", config)[0])
    assert "option http-buffer-request" in config
    assert bufsize > MAX_BODY_BYTES + 16 * 1024


def haproxy_section(config: str, name: str) -> str:
    match = re.search(rf"^{name}\n(.*?)(?=^\S|\Z)", config, re.MULTILINE | re.DOTALL)
    assert match, name
    return match.group(1)


def test_the_feeds_long_reads_get_a_longer_server_timeout_than_the_rest() -> None:
    config = HAPROXY_CFG.read_text("utf-8")
    (default,) = re.findall(
        r"^\s*timeout server (\d+)s$", haproxy_section(config, "defaults"), re.M
    )
    services = compose_services()
    write_timeout = services["api"]["environment"]["WRITE_TIMEOUT_SECONDS"]
    deadline = float(re.sub(r"\$\{WRITE_TIMEOUT_SECONDS:-(.+)\}", r"\1", write_timeout))
    # Short elsewhere: it only cuts off a replica that stopped answering.
    assert deadline < int(default) < FEED_KEEPALIVE_SECONDS
    backend = haproxy_section(config, "backend api")
    assert "acl feed_stream path /feed/stream\n" in backend
    assert "acl long_poll path /feed\n" in backend
    assert "acl waits url_param(wait) -m found\n" in backend
    (longer,) = re.findall(
        r"^\s*http-request set-timeout server (\d+)s if feed_stream \|\| long_poll waits$",
        backend,
        re.M,
    )
    # A quiet stream outlives several keep-alives; a long poll, its wait and a last read.
    assert int(longer) >= 3 * FEED_KEEPALIVE_SECONDS
    assert int(longer) > FEED_WAIT_MAX_SECONDS + deadline


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="Debian's haproxy is not installed")
def test_haproxy_accepts_the_configuration() -> None:
    # The version the Compose stack runs (2.6: the official image and the Debian stand-in).
    version = subprocess.run(
        ["haproxy", "-v"], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    if not re.search(r"version 2\.6\.", version):
        pytest.skip(f"this haproxy is not 2.6: {version.splitlines()[0]}")
    checked = subprocess.run(
        ["haproxy", "-c", "-f", str(HAPROXY_CFG)],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
        env={**os.environ, "LB_CONN_PER_CLIENT": "100"},
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
