"""What docker-compose.yml, Dockerfile.gpu and .dockerignore promise, checked by parsing them.

Docker cannot run where the tests run, so nothing here builds or starts a container: the files are read
as data and checked against the Compose spec's structure, against each other (the volume the worker
writes artifacts to is the one the API serves them from) and against the project (every module a
command runs exists and defines what the command asks for; modules are located and parsed, not imported).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import shlex
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
DOCKERFILE = ROOT / "Dockerfile.gpu"
DOCKERIGNORE = ROOT / ".dockerignore"
ENV_EXAMPLE = ROOT / "deploy" / "env.example"

SERVICES = ("postgres", "redis", "api", "worker", "reaper", "flower")
REQUIRED_SECRETS = ("BOOTSTRAP_API_KEY", "FLOWER_PASSWORD")
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
def compose_text() -> str:
    return COMPOSE_FILE.read_text()


@cache
def compose() -> dict:
    return yaml.safe_load(compose_text())


def services() -> dict[str, dict]:
    return compose()["services"]


@cache
def gpu1_example() -> dict:
    """The commented-out `worker-gpu1` service, uncommented and parsed in place (it uses the anchors)."""
    lines = compose_text().splitlines()
    start = lines.index("  # worker-gpu1:")
    end = start
    while end < len(lines) and lines[end].startswith("  # ") and lines[end].strip() != "#":
        end += 1
    block = ["  " + line.removeprefix("  # ") for line in lines[start:end]]
    return yaml.safe_load("\n".join(lines[:start] + block + lines[end:]))["services"]["worker-gpu1"]


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


def test_compose_is_a_compose_spec_file() -> None:
    doc = compose()
    assert "version" not in doc, "the Compose spec has no `version:` key (it is obsolete)"
    assert set(k for k in doc if not k.startswith("x-")) <= TOP_LEVEL_KEYS
    assert set(SERVICES) <= set(services()), f"missing services: {set(SERVICES) - set(services())}"
    for name, svc in services().items():
        assert set(svc) <= SERVICE_KEYS, f"{name}: unknown keys {set(svc) - SERVICE_KEYS}"
        assert "image" in svc or "build" in svc, name
        assert RESTART.match(svc.get("restart", "no")), f"{name}: restart {svc.get('restart')!r}"
        env = svc.get("environment", {})
        assert isinstance(env, dict), f"{name}: environment as a mapping"
        assert all(isinstance(v, str | int) for v in env.values()), f"{name}: scalar env values"
        assert DURATION.match(svc.get("stop_grace_period", "10s")), f"{name}: stop_grace_period"


def test_interpolation_syntax() -> None:
    for s in [*strings(compose()), *strings(gpu1_example())]:
        leftover = INTERPOLATION.sub("", s)
        assert "$" not in leftover, (
            f"bad or bare interpolation in {s!r} (use ${{VAR}}, or $$ for a literal $)"
        )


def test_every_long_running_service_has_a_healthcheck() -> None:
    for name, svc in {**services(), "worker-gpu1": gpu1_example()}.items():
        hc = svc.get("healthcheck")
        assert hc, f"{name} has no healthcheck"
        assert set(hc) <= HEALTHCHECK_KEYS, f"{name}: unknown healthcheck keys {set(hc) - HEALTHCHECK_KEYS}"
        assert not hc.get("disable"), name
        test = hc["test"]
        if isinstance(test, list):
            assert test[0] in ("CMD", "CMD-SHELL") and len(test) > 1, f"{name}: healthcheck test {test}"
        else:
            assert test.strip(), name
        assert isinstance(hc.get("retries"), int) and hc["retries"] >= 1, f"{name}: retries"
        for key in ("interval", "timeout", "start_period"):
            assert DURATION.match(hc.get(key, "")), f"{name}: healthcheck {key} {hc.get(key)!r}"


def test_every_depends_on_waits_for_a_healthy_service() -> None:
    graph: dict[str, set[str]] = {}
    for name, svc in {**services(), "worker-gpu1": gpu1_example()}.items():
        deps = svc.get("depends_on", {})
        assert isinstance(deps, dict), f"{name}: depends_on in the long form, with a condition"
        for dep, spec in deps.items():
            assert dep in services(), f"{name} depends on unknown service {dep}"
            assert set(spec) <= DEPENDS_ON_KEYS, f"{name} -> {dep}: {set(spec) - DEPENDS_ON_KEYS}"
            assert spec.get("condition") == "service_healthy", f"{name} -> {dep}: {spec}"
            assert "healthcheck" in services()[dep], f"{dep} is waited for but has no healthcheck"
        graph[name] = set(deps)

    def reaches(src: str, dst: str, seen: frozenset = frozenset()) -> bool:
        return any(d == dst or (d not in seen and reaches(d, dst, seen | {d})) for d in graph.get(src, ()))

    assert not any(reaches(n, n) for n in graph), "depends_on has a cycle"
    assert {"postgres", "redis"} <= graph["api"]
    for name in gpu_workers():
        assert reaches(name, "api"), f"{name} must wait for the api (the migrations) to be healthy"
    assert reaches("reaper", "api") and reaches("flower", "redis")


def test_named_volumes_are_declared_and_used() -> None:
    declared = set(compose().get("volumes") or {})
    used = {src for svc in services().values() for src in volume_mounts(svc).values() if is_named(src)}
    assert used <= declared, f"undeclared named volumes: {used - declared}"
    assert declared <= used, f"declared but unused volumes: {declared - used}"
    assert "prune-artifacts" in declared
    pg, redis = volume_mounts(services()["postgres"]), volume_mounts(services()["redis"])
    assert is_named(pg.get("/var/lib/postgresql/data", "")), "postgres data on a named volume"
    assert is_named(redis.get("/data", "")), "redis AOF on a named volume"


def test_ports() -> None:
    def container_ports(svc: dict) -> set[int]:
        out = set()
        for p in svc.get("ports", []):
            spec = INTERPOLATION.sub("x", str(p)).split("/")[0]
            assert re.fullmatch(r"((x|[\d.]+):)?((x|\d+):)?\d+", spec), f"port {p!r}"
            out.add(int(spec.rsplit(":", 1)[-1]))
        return out

    assert container_ports(services()["api"]) == {8000}
    assert container_ports(services()["flower"]) == {5555}
    for name in ("postgres", "redis", "worker", "reaper"):
        assert not services()[name].get("ports"), f"{name} should not publish a port"


# ------------------------------------------------------------------------------ compose: the promises


def test_images_and_datastores() -> None:
    pg, redis = services()["postgres"], services()["redis"]
    assert pg["image"].startswith("postgres:16")
    assert redis["image"].startswith("redis:7")
    assert "pg_isready" in " ".join(argv(pg["healthcheck"]["test"]))
    assert "redis-cli ping" in " ".join(argv(redis["healthcheck"]["test"]))
    env = pg["environment"]
    assert env["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD")


def test_redis_keeps_every_task() -> None:
    args = argv(services()["redis"]["command"])
    assert args[0] == "redis-server"
    assert option(args, "--appendonly") == "yes", "AOF on"
    assert option(args, "--maxmemory-policy") == "noeviction", "never evict a queued task"


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
        for key in ("DATABASE_URL", "REDIS_URL", "ARTIFACT_ROOT", "UPLOAD_ROOT"):
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
    assert re.fullmatch(r"redis://redis:6379/\d+", api_env["REDIS_URL"])


def test_environment_names_are_settings_fields() -> None:
    """A typo (ARTIFACTS_ROOT) would silently fall back to a default inside the container."""
    fields = set(Settings.model_fields)
    for name, svc in services().items():
        if not uses_project_image(svc):
            continue
        for key in svc.get("environment", {}):
            if key != "NVIDIA_VISIBLE_DEVICES":
                assert key.lower() in fields, f"{name}: {key} is not a Settings field"


def test_workers_reserve_one_gpu_each() -> None:
    seen_ids: set[str] = set()
    seen_names: set[str] = set()
    for name, worker in gpu_workers().items():
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
    for name, svc in services().items():
        if is_celery_worker(svc):
            continue
        assert not devices(svc) and "gpus" not in svc and "runtime" not in svc, name
        if uses_project_image(svc):
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


def test_required_secrets_have_no_default() -> None:
    text = compose_text()
    for name in REQUIRED_SECRETS:
        refs = re.findall(r"\$\{" + name + r"([^}]*)\}", text)
        assert refs, f"{name} is never used"
        assert all(r.startswith(":?") for r in refs), f"{name} must be ${{{name}:?...}}: {refs}"
    assert "BOOTSTRAP_API_KEY" in services()["api"]["environment"]
    for name, svc in services().items():
        for key, value in svc.get("environment", {}).items():
            if SECRET_NAME.search(key):
                assert str(value).startswith("${"), f"{name}: {key} is a literal, not from the environment"
        if name != "api":
            assert "BOOTSTRAP_API_KEY" not in svc.get("environment", {}), f"{name} does not need the key"


def test_env_example_lists_every_variable() -> None:
    listed = dict(
        line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines() if line and line[0] != "#"
    )
    used = {m["name"] for m in INTERPOLATION.finditer(compose_text()) if m["name"]}
    assert used <= set(listed), f"not in {ENV_EXAMPLE.name}: {used - set(listed)}"
    for name in REQUIRED_SECRETS:
        assert listed[name] == "", f"{name} must not have a value in the example"


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


def base_image() -> str:
    args = {}
    for instr, rest in dockerfile():
        if instr == "ARG" and "=" in rest:
            key, value = rest.split("=", 1)
            args[key] = value.strip("\"'")
    image = final_stage()[0][1].split()[0]
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args[m[1]], image)


def test_dockerfile_base_is_a_pytorch_cuda_runtime_in_range() -> None:
    image = base_image()
    m = re.fullmatch(
        r"pytorch/pytorch:(?P<torch>\d+\.\d+\.\d+)-cuda(?P<cuda>\d+\.\d+)-cudnn\d+-runtime(@sha256:[0-9a-f]{64})?",
        image,
    )
    assert m, f"not a PyTorch CUDA runtime image: {image}"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (torch_req,) = [Requirement(d) for d in project["dependencies"] if Requirement(d).name == "torch"]
    assert Version(m["torch"]) in torch_req.specifier, f"torch {m['torch']} outside {torch_req}"


def test_dockerfile_installs_the_project_without_replacing_torch() -> None:
    runs = dockerfile_instruction("RUN")
    (install,) = [r for r in runs if "pip install" in r]
    (pip,) = [c for c in shell_steps(install) if c[:2] == ["pip", "install"]]
    (target,) = [a for a in pip if a.startswith(".[")]
    extras = set(target.removeprefix(".[").removesuffix("]").split(","))
    assert {"flower", "timm"} <= extras, "installs the project with the flower and timm extras"
    constraint = option(pip, "-c", "--constraint")
    assert constraint or "--no-deps" in pip, "pip must be kept from replacing the base's CUDA build of torch"
    if constraint:
        writes = [c for c in shell_steps(install) if c[-2:] == [">", constraint]]
        assert writes and "torch==" in " ".join(writes[0]), "the constraint file pins the installed torch"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert {"flower", "timm"} <= set(project["optional-dependencies"])

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
    steps = final_stage()
    install_at = next(i for i, (instr, rest) in enumerate(steps) if instr == "RUN" and "pip install" in rest)
    last_copy = max(i for i, (instr, _) in enumerate(steps) if instr == "COPY")
    assert last_copy < install_at, "the install runs after the sources are copied"
    assert dockerfile_instruction("WORKDIR")[-1] == "/app"


def test_dockerfile_runs_as_a_non_root_user() -> None:
    steps = final_stage()
    run_at = max(i for i, (instr, _) in enumerate(steps) if instr in ("CMD", "ENTRYPOINT"))
    users = [rest for instr, rest in steps[:run_at] if instr == "USER"]
    assert users, "no USER before CMD"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"runs as {user}"
    (useradd,) = [r for r in dockerfile_instruction("RUN") if "useradd" in r]
    assert re.search(r"(-u|--uid)\s+10001\b", useradd) and useradd.split()[-1] == user


def test_dockerfile_prepares_the_volume_mount_points() -> None:
    """A fresh named volume takes the mount point's owner: it must exist and belong to the user."""
    user = dockerfile_instruction("USER")[-1].split(":")[0]
    steps = [c for r in dockerfile_instruction("RUN") for c in shell_steps(r)]
    made = {a for step in steps if step[:2] == ["mkdir", "-p"] for a in step[2:]}
    owned = {a for step in steps if step[:3] == ["chown", "-R", f"{user}:{user}"] for a in step[3:]}
    targets = {t for s in services().values() if uses_project_image(s) for t in volume_mounts(s)}
    assert targets
    for target in targets:
        assert target in made, f"{target} is not created in the image"
        assert any(target == o or target.startswith(o.rstrip("/") + "/") for o in owned), (
            f"{target} not chowned"
        )


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
