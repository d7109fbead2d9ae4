"""What the Kubernetes manifests (deploy/k8s/, kustomize) promise, checked offline.

They are rendered by `kubectl kustomize` where kubectl is installed (this machine's image has it), else
by a reading of kustomization.yaml's few fields in PyYAML (kept equal to kustomize's output by a test);
every object is validated, strictly (no unknown field), against the Kubernetes OpenAPI schemas that
kubernetes-validate bundles, for the oldest and the newest Kubernetes release we support; and the
objects are checked against the project: the probes hit the API's health routes, every command runs a
module that exists, every setting is a Settings field, the worker asks for a GPU, nothing runs as root.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path

import pytest
import yaml

from pruning_core.settings import Settings
from tests.test_deploy import (
    EXTERNAL_ENV,
    SECRET_NAME,
    argv,
    compose,
    imports_from_project,
    option,
    runtime_uid,
    services,
    simple_commands,
)

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
SECRET_EXAMPLE = K8S / "secret.example.yaml"
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")  # the oldest and the newest release we support
KUSTOMIZATION_KEYS = {"apiVersion", "kind", "namespace", "resources", "images"}  # what render_yaml reads
CLUSTER_SCOPED = {"Namespace"}
WORKLOADS = {"Deployment", "Job"}
HEALTH_ROUTES = ROOT / "api" / "routes" / "health.py"


# ------------------------------------------------------------------------------------------ rendering


def kustomization() -> dict:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def render_yaml() -> list[dict]:
    """kustomization.yaml's resources, with its namespace and images applied (the fields it uses)."""
    k = kustomization()
    images = {i["name"]: i for i in k.get("images", [])}
    out = []
    for resource in k["resources"]:
        for doc in yaml.safe_load_all((K8S / resource).read_text()):
            if not doc:
                continue
            if doc["kind"] not in CLUSTER_SCOPED and "namespace" in k:
                doc["metadata"]["namespace"] = k["namespace"]
            for c in containers(doc):
                name, _, tag = c["image"].partition(":")
                if name in images:
                    new = images[name]
                    c["image"] = f"{new.get('newName', name)}:{new.get('newTag', tag or 'latest')}"
            out.append(doc)
    return out


def kubectl() -> str | None:
    return shutil.which("kubectl")


@cache
def render_kustomize() -> tuple[dict, ...]:
    result = subprocess.run(
        [kubectl(), "kustomize", str(K8S)], capture_output=True, text=True, timeout=60, check=True
    )
    return tuple(d for d in yaml.safe_load_all(result.stdout) if d)


@cache
def rendered() -> tuple[dict, ...]:
    return render_kustomize() if kubectl() else tuple(render_yaml())


def key(doc: dict) -> str:
    return f"{doc['kind']}/{doc['metadata']['name']}"


def objects() -> dict[str, dict]:
    return {key(d): d for d in rendered()}


def pod_spec(doc: dict) -> dict | None:
    return doc["spec"]["template"]["spec"] if doc["kind"] in WORKLOADS else None


def containers(doc: dict) -> list[dict]:
    spec = pod_spec(doc)
    return [] if spec is None else spec.get("initContainers", []) + spec["containers"]


def workload(name: str) -> dict:
    (doc,) = [d for d in rendered() if d["kind"] in WORKLOADS and d["metadata"]["name"] == name]
    return doc


def container(name: str) -> dict:
    return pod_spec(workload(name))["containers"][0]


def env_of(c: dict) -> dict[str, dict | str]:
    return {e["name"]: e.get("valueFrom", e.get("value")) for e in c.get("env", [])}


# ------------------------------------------------------------------------------ rendering: the tests


def test_kustomization_uses_only_what_the_yaml_reading_applies() -> None:
    k = kustomization()
    assert set(k) <= KUSTOMIZATION_KEYS, f"render_yaml would ignore {set(k) - KUSTOMIZATION_KEYS}"
    listed = set(k["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", SECRET_EXAMPLE.name}
    assert listed == on_disk, f"listed {listed ^ on_disk} or not"
    assert SECRET_EXAMPLE.name not in listed, "the real Secret is the operator's, never applied from here"


@pytest.mark.skipif(kubectl() is None, reason="kubectl (its kustomize) is not installed on this machine")
def test_the_yaml_reading_renders_what_kustomize_renders() -> None:
    ours = {key(d): d for d in render_yaml()}
    theirs = {key(d): d for d in render_kustomize()}
    assert ours == theirs


def test_the_expected_objects() -> None:
    kinds = {k for k in objects()}
    expected = {"Namespace/pruning-service", "ConfigMap/pruning-config", "Service/pruning-api"}
    expected |= {"Deployment/pruning-api", "Deployment/pruning-worker", "Deployment/pruning-reaper"}
    expected |= {"Job/pruning-migrate"}
    assert kinds == expected
    namespace = kustomization()["namespace"]
    for doc in rendered():
        if doc["kind"] not in CLUSTER_SCOPED:
            assert doc["metadata"]["namespace"] == namespace, key(doc)


# ----------------------------------------------------------------------------- the Kubernetes schemas


def validate(doc: dict, version: str) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("name", [*(key(d) for d in rendered()), "Secret/pruning-secrets (example)"])
def test_every_object_matches_the_kubernetes_schema(name: str, version: str) -> None:
    doc = objects().get(name) or yaml.safe_load(SECRET_EXAMPLE.read_text())
    validate(doc, version)


def test_the_schema_validation_catches_mistakes() -> None:
    """Strict: a misspelt field and a wrong type are errors, not silently dropped by the cluster."""
    from kubernetes_validate import ValidationError

    api = copy.deepcopy(workload("pruning-api"))
    pod_spec(api)["containers"][0]["livenessProbe"]["httpGett"] = {"path": "/healthz", "port": 8000}
    with pytest.raises(ValidationError):
        validate(api, KUBERNETES_VERSIONS[-1])
    worker = copy.deepcopy(workload("pruning-worker"))
    worker["spec"]["replicas"] = "one"
    with pytest.raises(ValidationError):
        validate(worker, KUBERNETES_VERSIONS[-1])


# ------------------------------------------------------------------------------------- the promises


def health_routes() -> set[str]:
    return set(re.findall(r'@router\.get\("(/[a-z]+)"', HEALTH_ROUTES.read_text()))


def test_the_api_has_probes_on_its_health_routes() -> None:
    """Liveness on /healthz (a database outage must not restart it), readiness on /readyz (no traffic
    until the database and the broker answer), a startup probe for the slow first import."""
    assert {"/healthz", "/readyz"} <= health_routes()
    api = container("pruning-api")
    ports = {p["name"]: p["containerPort"] for p in api["ports"]}
    assert ports == {"http": 8000}
    for probe, path in (
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
        ("startupProbe", "/healthz"),
    ):
        get = api[probe]["httpGet"]
        assert get["path"] == path and get["port"] in ("http", 8000), f"{probe}: {get}"
    assert api["startupProbe"]["periodSeconds"] * api["startupProbe"]["failureThreshold"] >= 60
    service = objects()["Service/pruning-api"]
    assert service["spec"]["selector"] == workload("pruning-api")["spec"]["template"]["metadata"]["labels"]
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]


def test_the_api_serves_without_migrating() -> None:
    """The Job migrates (replicas must not race to upgrade the schema); the API serves like compose's."""
    steps = simple_commands(argv(container("pruning-api")["command"]))
    compose_steps = simple_commands(argv(services()["api"]["command"]))
    assert steps == compose_steps[1:], steps
    job = workload("pruning-migrate")
    (migrate,) = pod_spec(job)["containers"]
    assert argv(migrate["command"]) == compose_steps[0] == ["python", "-m", "store", "migrate"]
    assert pod_spec(job)["restartPolicy"] in ("OnFailure", "Never") and job["spec"]["backoffLimit"] >= 1
    assert job["spec"].get("ttlSecondsAfterFinished"), "re-created and re-run by the next apply"


def test_the_worker_requests_a_gpu_and_runs_like_compose() -> None:
    worker = container("pruning-worker")
    limits = worker["resources"]["limits"]
    assert limits.get("nvidia.com/gpu") == 1, "one GPU per worker pod (one job at a time)"
    args = argv(worker["command"])
    compose_args = argv(services()["worker"]["command"])
    for opt in (("-A", "--app"), ("-Q", "--queues"), ("-c", "--concurrency"), ("--prefetch-multiplier",)):
        assert option(args, *opt) == option(compose_args, *opt), opt
    assert option(args, "--max-tasks-per-child") == "1" and option(args, "-P", "--pool") == "prefork"
    node = option(args, "-n", "--hostname")
    assert node.endswith("@%h"), "one Celery node per pod"
    probe = " ".join(worker["livenessProbe"]["exec"]["command"])
    assert f"--destination {node.split('@')[0]}@$HOSTNAME" in probe
    spec = pod_spec(workload("pruning-worker"))
    assert spec["terminationGracePeriodSeconds"] >= 30, "a stopping worker gets time to end its epoch"
    rolling = workload("pruning-worker")["spec"]["strategy"]["rollingUpdate"]
    assert rolling["maxSurge"] == 0, "a roll must not need a spare GPU"
    shm = [v for v in spec["volumes"] if v["name"] == "shm"]
    assert shm and shm[0]["emptyDir"]["medium"] == "Memory"
    assert any(m["mountPath"] == "/dev/shm" for m in worker["volumeMounts"])
    for name in ("pruning-api", "pruning-reaper", "pruning-migrate"):
        for c in containers(workload(name)):
            assert "nvidia.com/gpu" not in c["resources"].get("limits", {}), f"{name} takes no GPU"


def test_the_reaper_runs_once() -> None:
    reaper = workload("pruning-reaper")
    assert argv(container("pruning-reaper")["command"]) == argv(services()["reaper"]["command"])
    assert reaper["spec"]["replicas"] == 1 and reaper["spec"]["strategy"]["type"] == "Recreate"
    probe = container("pruning-reaper")["livenessProbe"]["exec"]["command"]
    assert probe == argv(services()["reaper"]["healthcheck"]["test"])[1:], "compose's healthcheck"


def test_every_container_has_limits_and_runs_as_non_root() -> None:
    """Requests and limits for CPU and memory; the image's UID, no privilege, no capability, a
    read-only root with a volume at every path the service writes."""
    uid = int(runtime_uid())
    writes = {"/tmp", "/home/prune", compose()["x-app-env"]["STATE_DIR"]}
    for doc in rendered():
        spec = pod_spec(doc)
        if spec is None:
            continue
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] == uid == pod["runAsGroup"], key(doc)
        assert pod["seccompProfile"]["type"] == "RuntimeDefault", key(doc)
        assert spec["automountServiceAccountToken"] is False, f"{key(doc)} does not talk to the cluster"
        for c in containers(doc):
            where = f"{key(doc)}: {c['name']}"
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][kind]), f"{where}: {kind}"
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"], where
            assert sc.get("runAsUser", uid) != 0, where
            assert sc["readOnlyRootFilesystem"] is True, where
            mounted = {m["mountPath"] for m in c.get("volumeMounts", [])}
            needed = writes if doc["kind"] == "Deployment" else {"/tmp"}
            assert needed <= mounted, f"{where}: nothing writable at {needed - mounted}"
            volumes = {v["name"] for v in spec.get("volumes", [])}
            assert {m["name"] for m in c.get("volumeMounts", [])} <= volumes, where


def test_settings_come_from_the_configmap_and_the_secret() -> None:
    """Every name a container gets is a Settings field (or boto3's); the stores' addresses and
    credentials come from the Secret, each pod taking only the keys it needs."""
    fields = set(Settings.model_fields)
    config = objects()["ConfigMap/pruning-config"]["data"]
    secret = yaml.safe_load(SECRET_EXAMPLE.read_text())
    secret_keys = set(secret["stringData"])
    assert secret["metadata"]["namespace"] == kustomization()["namespace"]
    for name in config:
        assert name.lower() in fields or name in EXTERNAL_ENV, f"ConfigMap: {name} is not a Settings field"
        assert not SECRET_NAME.search(name), f"ConfigMap: {name} belongs in the Secret"
    assert re.fullmatch(r"s3://[a-z0-9.-]+/", config["OBJECT_STORE_URL"]), (
        "pods share no disk: the object store"
    )
    # the limits the API and the workers check, as compose passes them by default
    defaults = compose()["x-app-env"]
    for name, value in config.items():
        if name.startswith(("MAX_", "JOB_")):
            assert re.fullmatch(rf"\$\{{{name}:-{value}\}}", defaults[name]), (
                f"{name}: {value} vs {defaults[name]}"
            )
    stores = {"DATABASE_URL", "REDIS_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    for doc in rendered():
        for c in containers(doc):
            where = f"{key(doc)}: {c['name']}"
            env = env_of(c)
            refs = [e["configMapRef"]["name"] for e in c.get("envFrom", [])]
            assert refs in ([], ["pruning-config"]) and not any(
                "secretRef" in e for e in c.get("envFrom", [])
            )
            for name, source in env.items():
                assert name.lower() in fields or name in EXTERNAL_ENV, (
                    f"{where}: {name} is not a Settings field"
                )
                if SECRET_NAME.search(name) or name in stores:
                    assert isinstance(source, dict), f"{where}: {name} is a literal, not from the Secret"
                if isinstance(source, dict) and "secretKeyRef" in source:
                    ref = source["secretKeyRef"]
                    assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret_keys, where
            wants = {"DATABASE_URL"} if doc["kind"] == "Job" else stores
            assert wants <= set(env), f"{where}: missing {wants - set(env)}"
            assert ("BOOTSTRAP_API_KEY" in env) == (key(doc) == "Deployment/pruning-api"), where


def test_one_image_for_every_container() -> None:
    images = {c["image"] for d in rendered() for c in containers(d)}
    (image,) = images
    (entry,) = kustomization()["images"]
    assert image.split(":")[0] == entry.get("newName", entry["name"])


def k8s_module_refs() -> list[tuple[str, str | None, str]]:
    refs = []
    for doc in rendered():
        for c in containers(doc):
            commands = {"command": c.get("command")}
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                commands[probe] = c.get(probe, {}).get("exec", {}).get("command")
            for what, command in commands.items():
                for args in simple_commands(argv(command)):
                    where = f"{key(doc)} {what}"
                    if app := option(args, "-A", "--app"):
                        refs.append((app, "app", where))
                    if args[:1] == ["uvicorn"]:
                        (target,) = [a for a in args[1:] if re.fullmatch(r"[\w.]+:\w+", a)]
                        refs.append((*target.split(":"), where))
                    if args[:2] == ["python", "-m"]:
                        refs.append((args[2], None, where))
                    if args[:2] == ["python", "-c"]:
                        refs.extend((m, a, where) for m, a in imports_from_project(args[2]))
    return refs


def test_the_commands_run_modules_that_exist() -> None:
    """The same modules compose runs (tests/test_deploy.py checks those exist and define what is asked)."""
    from tests.test_deploy import module_refs

    known = {(m, a) for m, a, _ in module_refs()}
    refs = k8s_module_refs()
    assert {
        ("worker.celery_app", "app"),
        ("api.app", "create_app"),
        ("store", None),
        ("worker.reaper", None),
    } <= {(m, a) for m, a, _ in refs}
    for module, attr, where in refs:
        assert (module, attr) in known, f"{where}: {module}:{attr} is run by no compose service"
