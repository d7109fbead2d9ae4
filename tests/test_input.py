# ruff: noqa: F811 (the fixtures imported from test_api are arguments of the tests by name)
"""Bad input never gets a 500, and a job too big for the worker is refused at submit.

- Every operator limit (Settings: MAX_EPOCHS, MAX_BATCH_SIZE, ...) refuses a spec one past it with a 422
  naming the field, and appears as that field's ``maximum`` in the OpenAPI document; the torchvision
  allow-list, unreachable targets, oversized batches and generated data sets likewise.
- What only the data tells (images over MAX_IMAGE_SIZE, more than MAX_IMAGES) fails the job in the
  worker, as does running out of memory: ``failed``, not retryable, with what to lower.
- Unchecked input on every route (path ids, cursors, query numbers, headers, JSON with NaN, NUL, lone
  surrogates, deep nesting, huge numbers) is a 4xx problem on SQLite and on PostgreSQL.
- /metrics labels stay bounded; an artifact changed on disk is not served under its old digest; a large
  safetensors header is not parsed in the API.
"""

from __future__ import annotations

import base64
import json
import os
import struct
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from PIL import Image

from pruning_core import spec as spec_module
from pruning_core.errors import DataError
from pruning_core.settings import DEFAULT_TORCHVISION_MODELS, Settings
from pruning_core.spec import LIMITS, parse_spec, submit_problems, synthetic_images
from store import db, repo
from store.files import attempt_dir, relative_to_root, sha256_file
from tests.test_api import DIGITS, PROBLEM, Api, api, assert_problem, make_api  # noqa: F401 (fixtures)

# Small caps, so that one past each is still inside the spec's own hard bounds.
CAPS = {
    "max_epochs": 7,
    "max_batch_size": 32,
    "max_image_size": 64,
    "max_num_classes": 50,
    "max_data_workers": 2,
    "max_images": 1000,
    "max_gpus": 1,  # one past it, 2 processes, still divides the test's batch of 16
}
# The method whose options hold a limited field, by options class.
METHOD_OF = {"S2HOptions": "s2h", "TASOptions": "tas", "PSAPOptions": "psap", "EPIOptions": "epi"}


# DIGITS within CAPS
SMALL = DIGITS | {"schedule": {"epochs": 3, "batch_size": 16, "max_steps_per_epoch": 5}}


def _spec_with(section: str, cls: type, field: str, value: Any) -> dict[str, Any]:
    spec: dict[str, Any] = json.loads(json.dumps(SMALL))
    if section == "method":
        spec["method"] = {"name": METHOD_OF[cls.__name__], field: value}
    elif field == "warmup_epochs":
        spec["schedule"] = {**spec["schedule"], "epochs": 0, field: value}
    elif (section, field) == ("data", "num_classes"):
        spec["data"] = {"name": "synthetic", "num_classes": value, "per_class": 1, "test_per_class": 1}
    else:
        spec[section] = {**spec.get(section, {}), field: value}
    return spec


BOUNDS = [(limit, *where) for limit, fields in LIMITS.items() for where in fields]


@pytest.fixture
def capped(make_api, sqlite_url: str) -> Api:
    return make_api(sqlite_url, **CAPS)


@pytest.mark.parametrize(
    "limit, section, cls, field", BOUNDS, ids=[f"{s}.{c.__name__}.{f}" for _, s, c, f in BOUNDS]
)
def test_each_limit_refused_at_submit(capped: Api, limit: str, section: str, cls: type, field: str) -> None:
    c, cap = capped.client, CAPS[limit]
    # the OpenAPI document shows the cap, on the very field the check reads
    prop = capped.client.get("/openapi.json").json()["components"]["schemas"][cls.__name__]["properties"][
        field
    ]
    assert cap in [b.get("maximum") for b in prop.get("anyOf", [prop])], prop
    # one past it: 422 naming the field, and only that field
    r = c.post("/v1/jobs", json=_spec_with(section, cls, field, cap + 1), headers=capped.a)
    body = assert_problem(r, 422)
    assert [e["field"] for e in body["errors"]] == [f"{section}.{field}"], body
    assert str(cap) in body["errors"][0]["message"] and limit.upper() in body["errors"][0]["message"]
    # at the cap: accepted
    r = c.post("/v1/jobs", json=_spec_with(section, cls, field, cap), headers=capped.a)
    assert r.status_code == 201, r.text


def test_several_limits_one_item_per_field(capped: Api) -> None:
    spec = SMALL | {
        "schedule": {"epochs": 8, "dense_epochs": 9, "batch_size": 33},
        "data": {"name": "digits", "image_size": 65, "num_workers": 3},
        "export": {"formats": ["safetensors"], "latency_batch_size": 33},
    }
    body = assert_problem(capped.client.post("/v1/jobs", json=spec, headers=capped.a), 422)
    fields = [e["field"] for e in body["errors"]]
    assert sorted(fields) == sorted(
        [
            "schedule.epochs",
            "schedule.dense_epochs",
            "schedule.batch_size",
            "data.image_size",
            "data.num_workers",
            "export.latency_batch_size",
        ]
    )
    assert len(set(fields)) == len(fields)
    assert capped.client.get("/v1/jobs", headers=capped.a).json()["items"] == []


def test_torchvision_models_only_from_the_allow_list(make_api, sqlite_url: str) -> None:
    api = make_api(
        sqlite_url, allowed_torchvision_models=("resnet18", "mobilenet_v2"), allowed_timm_models=("resnet18",)
    )
    c = api.client
    for name in ("tv:resnet50", "tv:vit_b_16", "tv:no_such_net", "timm:resnet50"):
        body = assert_problem(c.post("/v1/jobs", json=DIGITS | {"model": {"name": name}}, headers=api.a), 422)
        assert [e["field"] for e in body["errors"]] == ["model.name"] and "/v1/models" in body["errors"][0][
            "message"
        ]
    assert (
        c.post("/v1/jobs", json=DIGITS | {"model": {"name": "tv:resnet18"}}, headers=api.a).status_code == 201
    )
    # syntax the spec itself refuses: still one item on model.name
    body = assert_problem(
        c.post("/v1/jobs", json=DIGITS | {"model": {"name": "tv:Bad Name!"}}, headers=api.a), 422
    )
    assert [e["field"] for e in body["errors"]] == ["model.name"]
    # what the catalog and the schema list is what the check allows
    assert c.get("/v1/models", headers=api.a).json()["torchvision"]["allowed"] == ["resnet18", "mobilenet_v2"]
    enum = c.get("/openapi.json").json()["components"]["schemas"]["ModelSpec"]["properties"]["name"]["enum"]
    assert enum == [*spec_module.CIFAR_MODELS, "tv:resnet18", "tv:mobilenet_v2", "timm:resnet18"]
    assert c.get("/v1/models", headers=api.a).json()["timm"]["allowed"] == ["resnet18"]


def test_default_allow_list_is_vetted_torchvision_cnns() -> None:
    import torchvision

    from tests.test_torchvision_models import REFUSED

    known = set(torchvision.models.list_models(module=torchvision.models))
    assert set(DEFAULT_TORCHVISION_MODELS) <= known
    assert not set(DEFAULT_TORCHVISION_MODELS) & set(REFUSED)
    assert len(set(DEFAULT_TORCHVISION_MODELS)) == len(DEFAULT_TORCHVISION_MODELS)
    assert Settings().allowed_torchvision_models == DEFAULT_TORCHVISION_MODELS


def test_allow_list_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALLOWED_TORCHVISION_MODELS", "resnet18, tv:resnet50,")
    assert Settings().allowed_torchvision_models == ("resnet18", "resnet50")


def test_compose_passes_the_limits_with_their_defaults() -> None:
    import re

    import yaml

    root = Path(__file__).resolve().parents[1]
    env = yaml.safe_load((root / "docker-compose.yml").read_text())["x-app-env"]
    example = (root / "deploy" / "env.example").read_text()
    for name in ("MAX_EPOCHS", "MAX_BATCH_SIZE", "MAX_IMAGE_SIZE", "MAX_IMAGES"):
        default = Settings.model_fields[name.lower()].default
        assert env[name] == f"${{{name}:-{default}}}" and re.search(rf"^{name}={default}$", example, re.M)


def test_unreachable_target_refused_at_submit(api: Api) -> None:
    c = api.client
    spec = DIGITS | {"target": {"macs_ratio": 0.0001}}
    body = assert_problem(c.post("/v1/jobs", json=spec, headers=api.a), 422)
    assert [e["field"] for e in body["errors"]] == ["target.macs_ratio"] and "unreachable" in body[
        "detail"
    ] + str(body)
    assert (
        c.post("/v1/jobs", json=DIGITS | {"target": {"macs_ratio": 0.01}}, headers=api.a).status_code == 201
    )
    # a torchvision model's floor is not known without torch: left to the worker
    assert not submit_problems(
        parse_spec({"model": {"name": "tv:resnet18"}, "target": {"macs_ratio": 1e-6}}), Settings()
    )


def test_zoo_floors_hold(tmp_path: Path) -> None:
    """ZOO_MIN_MACS_RATIO never refuses a reachable target, and is close to the engine's real floor."""
    import torch

    from pruning_core.graph.budget import min_macs
    from pruning_core.graph.groups import PruningGraph
    from pruning_core.models.zoo import build_model

    for name, table in spec_module.ZOO_MIN_MACS_RATIO.items():
        floors = []
        for classes, channels in ((2, 1), (10, 3)):
            model = build_model(name, classes, channels)
            graph = PruningGraph(model, torch.zeros(1, channels, 32, 32), classes, 120)
            floors.append(min_macs(graph) / graph.dense_macs)
        assert table <= min(floors) < table * 1.1, (name, table, floors)


def test_batch_pixels_and_generated_data_refused(make_api, sqlite_url: str) -> None:
    api = make_api(sqlite_url, max_batch_pixels=64 * 32 * 32, max_dataset_bytes=10 * 2**20)
    c = api.client
    # cifar's 32 px images, a batch of 65: over 64 x 32 x 32 pixels
    spec = {
        **DIGITS,
        "data": {"name": "synthetic", "image_size": 32},
        "schedule": {"epochs": 1, "batch_size": 65},
    }
    body = assert_problem(c.post("/v1/jobs", json=spec, headers=api.a), 422)
    assert [e["field"] for e in body["errors"]] == ["schedule.batch_size"]
    assert "MAX_BATCH_PIXELS" in body["errors"][0]["message"]
    # 500 synthetic images of 64 px: 24 MiB as float32, over 10 MiB
    spec = {
        **DIGITS,
        "data": {"name": "synthetic", "image_size": 64},
        "schedule": {"epochs": 1, "batch_size": 8},
    }
    body = assert_problem(c.post("/v1/jobs", json=spec, headers=api.a), 422)
    assert [e["field"] for e in body["errors"]] == ["data.image_size"]
    assert "MAX_DATASET_BYTES" in body["errors"][0]["message"]
    spec["data"]["image_size"] = 32
    assert c.post("/v1/jobs", json=spec, headers=api.a).status_code == 201


@pytest.mark.parametrize(
    "data",
    [{}, {"num_classes": 3, "per_class": 7}, {"num_classes": 50, "test_per_class": 2}, {"num_classes": 400}],
)
def test_synthetic_count_matches_the_loader(tmp_path: Path, data: dict[str, Any]) -> None:
    from pruning_core.data.loaders import load_data

    spec = parse_spec({"data": {"name": "synthetic", "image_size": 8, **data}}).data
    sets = load_data(spec, cache_dir=tmp_path)
    assert synthetic_images(spec) == len(sets.train) + len(sets.test)


def test_every_size_in_the_spec_is_bounded(api: Api) -> None:
    """Every number, string and list a JobSpec takes has an upper bound (or an enum) in the schema."""
    schemas = api.client.get("/openapi.json").json()["components"]["schemas"]
    unbounded: list[str] = []

    def walk(where: str, s: dict[str, Any]) -> None:
        if "anyOf" in s:
            for branch in s["anyOf"]:
                walk(where, branch)
            return
        kind = s.get("type")
        if kind in ("integer", "number") and not {"maximum", "exclusiveMaximum"} & set(s):
            unbounded.append(where)
        if kind == "string" and not {"maxLength", "enum", "const"} & set(s):
            unbounded.append(where)
        if kind == "array":
            if "maxItems" not in s:
                unbounded.append(where)
            for i, item in enumerate(s.get("prefixItems", [])):
                walk(f"{where}[{i}]", item)
            if isinstance(s.get("items"), dict):
                walk(f"{where}[]", s["items"])

    names = ["JobSpec", "ModelSpec", "DataSpec", "TargetSpec", "Schedule", "KDSpec", "ExportSpec"]
    names += ["MagnitudeOptions", "S2HOptions", "TASOptions", "PSAPOptions", "EPIOptions"]
    for name in names:
        for prop, s in schemas[name]["properties"].items():
            if "$ref" not in s and "oneOf" not in s:
                walk(f"{name}.{prop}", s)
    assert not unbounded, unbounded
    assert schemas["DataSpec"]["properties"]["name"]["enum"] == list(spec_module.DATASETS)


# --- what only the worker can tell ---


def _folder(root: Path, side: int, per_class: int) -> Path:
    for split in ("train", "test"):
        for cls in ("a", "b"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (side, side), (i * 20, 0, 0)).save(d / f"{i}.png")
    return root


def test_worker_refuses_images_over_the_caps(tmp_path: Path) -> None:
    from pruning_core.data.loaders import load_data

    folder = _folder(tmp_path / "imgs", side=32, per_class=3)
    data = parse_spec({"data": {"name": "imagefolder", "root": str(folder)}}).data
    with pytest.raises(
        DataError, match=r"larger than this server's 16 px \(MAX_IMAGE_SIZE\); set data.image_size"
    ):
        load_data(data, cache_dir=tmp_path / "c1", settings=Settings(max_image_size=16))
    with pytest.raises(DataError, match=r"12 images, over this server's 10 \(MAX_IMAGES\)"):
        load_data(data, cache_dir=tmp_path / "c2", settings=Settings(max_images=10))
    # with a size given the large images are resized; per_class brings the count under the cap
    small = parse_spec(
        {"data": {"name": "imagefolder", "root": str(folder), "image_size": 16, "per_class": 2}}
    ).data
    sets = load_data(small, cache_dir=tmp_path / "c3", settings=Settings(max_image_size=16, max_images=10))
    assert sets.image_size == 16 and len(sets.train) == 4


@pytest.mark.parametrize("oom", ["host", "gpu", "gpu-old"])
def test_out_of_memory_fails_not_retried(
    sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, oom: str
) -> None:
    import torch

    from pruning_core.jobs import runner
    from store.db import make_engine, migrate
    from worker.execute import execute

    def run_out(*_a: Any, **_k: Any) -> None:
        if oom == "host":
            raise MemoryError()
        if oom == "gpu":  # the class exists in CPU builds too; the worker knows it by name
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        raise RuntimeError("CUDA error: out of memory")  # older builds

    monkeypatch.setattr(runner, "run", run_out)
    migrate(sqlite_url)
    settings = Settings(
        database_url=sqlite_url, state_dir=tmp_path / "state", redis_url=None, heartbeat_s=0.2
    )
    engine = make_engine(sqlite_url)
    with db.session_scope(engine) as s:
        job, _ = repo.create_job(s, "alice", DIGITS, "magnitude", max_attempts=3)
        job_id = job.id
    assert execute(job_id, worker_name="w", settings=settings) == "failed"
    with db.session_scope(engine) as s:
        row = repo.get_job(s, job_id)
        assert (row.status, row.error_code, row.retryable, row.attempt) == (
            "failed",
            "out_of_memory",
            False,
            1,
        )
        message = row.error_message
    assert ("host memory" if oom == "host" else "GPU memory") in message
    assert "batch_size 64" in message and "lower schedule.batch_size" in message
    # not run again: nothing left to claim
    assert execute(job_id, worker_name="w2", settings=settings) is None
    with db.session_scope(engine) as s:
        assert repo.get_job(s, job_id).attempt == 1
    engine.dispose()


# --- unchecked input on every route, on both databases ---


def _cursor(created: str, job_id: str) -> str:
    return base64.urlsafe_b64encode(json.dumps([created, job_id]).encode()).decode().rstrip("=")


@pytest.mark.parametrize("backend", ["sqlite", "pg"])
def test_bad_input_is_a_4xx_problem(make_api, request: pytest.FixtureRequest, backend: str) -> None:
    api = make_api(request.getfixturevalue("sqlite_url" if backend == "sqlite" else "pg_url"))
    c, h = api.client, api.a
    job = api.submit()
    jid = job["id"]
    json_ct = h | {"Content-Type": "application/json"}
    long = "x" * 10_000

    cases: list[tuple[str, str, dict[str, Any], int]] = [
        # path ids: NUL, non-UTF-8, over-long, odd characters: not found, without a query
        ("GET", "/v1/jobs/abc%00def", {}, 404),
        ("GET", "/v1/jobs/%ED%A0%80%FF", {}, 404),
        ("GET", f"/v1/jobs/{long}", {}, 404),
        ("GET", "/v1/jobs/abc%00def/events", {}, 404),
        ("GET", "/v1/jobs/abc%00def/artifacts", {}, 404),
        ("POST", "/v1/jobs/abc%00def/cancel", {}, 404),
        ("GET", "/v1/uploads/abc%00def", {}, 404),
        ("GET", f"/v1/uploads/{long}", {}, 404),
        ("DELETE", "/v1/uploads/abc%00def", {}, 404),
        ("GET", f"/v1/uploads?cursor={_cursor('2020-01-01T00:00:00', 'a' + chr(0) + 'b')}", {}, 400),
        ("GET", f"/v1/uploads?cursor={_cursor('0001-01-01T00:00:00+14:00', jid)}", {}, 400),
        ("GET", f"/v1/jobs/{jid}/artifacts/a%00b", {}, 404),
        ("HEAD", f"/v1/jobs/{jid}/artifacts/{long}", {}, 404),
        # cursors: a NUL or a non-id inside, a time out of range, over-long
        ("GET", f"/v1/jobs?cursor={_cursor('2020-01-01T00:00:00', 'a' + chr(0) + 'b')}", {}, 400),
        ("GET", f"/v1/jobs?cursor={_cursor('99999-01-01T00:00:00', jid)}", {}, 400),
        ("GET", f"/v1/jobs?cursor={_cursor('0001-01-01T00:00:00+14:00', jid)}", {}, 400),
        ("GET", f"/v1/jobs?cursor={_cursor('9999-12-31T23:59:59-14:00', jid)}", {}, 400),
        ("GET", f"/v1/jobs?cursor={_cursor('2020-01-01T00:00:00', 7)}", {}, 400),
        ("GET", f"/v1/jobs?cursor={long}", {}, 422),
        # numbers beyond the columns' range
        ("GET", f"/v1/jobs/{jid}/events?after=2147483648", {}, 422),
        ("GET", f"/v1/jobs/{jid}/events?after=99999999999999999999999", {}, 422),
        ("GET", f"/v1/jobs/{jid}/events?after=-1", {}, 422),
        ("GET", "/v1/jobs?limit=99999999999999999999", {}, 422),
        ("GET", f"/v1/jobs/{jid}/events", {"headers": {"Last-Event-ID": "9" * 30}}, 422),
        ("GET", f"/v1/jobs/{jid}/events", {"headers": {"Last-Event-ID": "x"}}, 422),
        # headers the database would refuse
        ("POST", "/v1/jobs", {"json": DIGITS, "headers": {"Idempotency-Key": "a\x00b"}}, 422),
        ("POST", "/v1/jobs", {"json": DIGITS, "headers": {"Idempotency-Key": "k" * 256}}, 422),
        ("POST", "/v1/uploads?kind=weights", {"content": b"x", "headers": {"Content-Length": "-1"}}, 422),
        ("POST", "/v1/uploads?kind=weights", {"content": b"x", "headers": {"Content-Length": "9" * 30}}, 413),
        ("POST", f"/v1/uploads?kind=weights&filename={long}", {"content": b"x"}, 422),
        # JSON bodies: non-finite numbers, NUL, lone surrogates, deep nesting, huge numbers, not UTF-8
        ("POST", "/v1/jobs", {"content": b'{"seed": NaN}'}, 422),
        ("POST", "/v1/jobs", {"content": b'{"target": {"macs_ratio": Infinity}}'}, 422),
        (
            "POST",
            "/v1/jobs",
            {"content": b'{"method": {"name": "tas", "arch_betas": [NaN, -Infinity]}}'},
            422,
        ),
        (
            "POST",
            "/v1/jobs",
            {"content": b'{"model": {"name": "resnet20", "weights": "upload:a\\u0000b"}}'},
            422,
        ),
        (
            "POST",
            "/v1/jobs",
            {"content": b'{"model": {"name": "resnet20", "weights": "upload:\\ud800"}}'},
            422,
        ),
        ("POST", "/v1/jobs", {"content": b'{"kd": {"enabled": true, "teacher": "\\udfff"}}'}, 422),
        ("POST", "/v1/jobs", {"content": b'{"device": "cuda:\\u00b2"}'}, 422),
        ("POST", "/v1/jobs", {"content": b'{"device": "cuda:99999999999999999999"}'}, 422),
        ("POST", "/v1/jobs", {"content": b'{"model": {"name": "resnet20\\u0000"}}'}, 422),
        (
            "POST",
            "/v1/jobs",
            {"content": b'{"data": {"name": "imagefolder", "root": "upload:' + long.encode() + b'"}}'},
            422,
        ),
        ("POST", "/v1/jobs", {"content": b"[" * 100_000 + b"]" * 100_000}, 400),
        ("POST", "/v1/jobs", {"content": b'{"a":' * 50_000 + b"1" + b"}" * 50_000}, 400),
        ("POST", "/v1/jobs", {"content": b'{"seed": 1' + b"0" * 5000 + b"}"}, 400),
        ("POST", "/v1/jobs", {"content": b'{"seed": 1e400}'}, 422),
        ("POST", "/v1/jobs", {"content": b'{"target": {"min_channels": 100000000000000000000000}}'}, 422),
        ("POST", "/v1/jobs", {"content": b'{"model": {"name": "\xff\xfe"}}'}, 400),
    ]
    for method, path, kw, status in cases:
        headers = (json_ct if "content" in kw and path == "/v1/jobs" else h) | kw.pop("headers", {})
        r = c.request(method, path, headers=headers, **kw)
        assert r.status_code == status, (method, path[:80], r.status_code, r.text[:300])
        if method != "HEAD":
            assert r.headers["content-type"].startswith(PROBLEM), (path[:80], r.headers)
            assert "Traceback" not in r.text and len(r.json()["detail"]) < 500
    # nothing was written by any of them, and the job and the server are as they were
    assert [j["id"] for j in c.get("/v1/jobs", headers=h).json()["items"]] == [jid]
    assert c.get(f"/v1/jobs/{jid}/events?after=2147483647", headers=h).json()["items"] == []
    assert c.get("/healthz").status_code == 200


def test_database_refusal_is_a_400(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    """The backstop: a value the database refuses after all is the request's fault, not a 500."""
    from sqlalchemy.exc import DataError as DBDataError

    def refuse(*_a: Any, **_k: Any) -> None:
        raise DBDataError("SELECT", {}, Exception("integer out of range"))

    monkeypatch.setattr(repo, "list_jobs", refuse)
    body = assert_problem(api.client.get("/v1/jobs", headers=api.a), 400)
    assert body["type"].endswith("invalid-value") and "out of range" not in body["detail"]


# --- metrics, artifacts, uploads ---


def test_metrics_labels_stay_bounded(api: Api) -> None:
    c = api.client
    for i in range(40):
        c.request(f"INVENT{i}", f"/v1/jobs/{i}", headers=api.a)
        c.get(f"/random/path/{i}", headers=api.a)
        c.request(f"X{i}", f"/nowhere/{i}")
    lines = [
        ln
        for ln in c.get("/metrics", headers=api.a).text.splitlines()
        if ln.startswith("http_requests_total{")
    ]
    methods = {ln.split('method="')[1].split('"')[0] for ln in lines}
    routes = {ln.split('route="')[1].split('"')[0] for ln in lines}
    assert methods <= {"GET", "OTHER"} and "OTHER" in methods, methods
    assert routes <= {"/v1/jobs/{job_id}", "<unmatched>", "/metrics"}, routes
    assert len(lines) < 10, lines


def _record_artifact(api: Api, job_id: str, blob: bytes) -> Path:
    folder = attempt_dir(api.settings.artifacts_dir, job_id, 1)
    folder.mkdir(parents=True)
    path = folder / "model.safetensors"
    path.write_bytes(blob)
    with db.session_scope(api.engine) as s:
        rel = relative_to_root(api.settings.artifacts_dir, path)
        repo.add_artifact(
            s, job_id, 1, "model.safetensors", rel, len(blob), sha256_file(path), "application/octet-stream"
        )
    return path


def test_artifact_changed_on_disk_is_not_served(api: Api) -> None:
    c = api.client
    job = api.submit()
    api.run_job(job["id"])
    blob = os.urandom(5000)
    path = _record_artifact(api, job["id"], blob)
    time.sleep(0.05)  # file times are coarse (a clock tick): changes below come later than the record
    url = f"/v1/jobs/{job['id']}/artifacts/model.safetensors"
    assert c.get(url, headers=api.a).content == blob
    # touched, same bytes (a copy back from a backup): re-hashed, still served
    os.utime(path, None)
    path.chmod(0o644)
    r = c.get(url, headers=api.a)
    assert r.status_code == 200 and r.content == blob
    # the same size, other bytes: never served under the recorded digest
    path.write_bytes(bytes(b ^ 0xFF for b in blob))
    for method in ("GET", "HEAD"):
        r = c.request(method, url, headers=api.a)
        assert r.status_code == 410 and r.headers["content-type"].startswith(PROBLEM), method
        assert "etag" not in r.headers and "repr-digest" not in r.headers
    body = c.get(url, headers=api.a | {"Range": "bytes=0-9"}).json()
    assert body["type"].endswith("artifact-corrupt") and "changed" in body["detail"]
    # restored: served again
    path.write_bytes(blob)
    assert c.get(url, headers=api.a).content == blob


def _safetensors(header: bytes, data: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header)) + header + data


def test_large_safetensors_header_is_not_parsed_in_the_api(
    make_api, sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from api import files

    api = make_api(sqlite_url, max_upload_bytes=8 * 2**20)
    c = api.client
    parsed: list[int] = []
    counting = SimpleNamespace(loads=lambda raw: parsed.append(len(raw)) or json.loads(raw))
    monkeypatch.setattr(files, "json", counting)
    # a 3 MiB header of many tiny entries (slow to parse, in the API's process): checked for its braces only
    big = b"{" + b",".join(b'"k%d":{}' % i for i in range(400_000)) + b"}"
    assert len(big) > files.PARSED_SAFETENSORS_HEADER
    r = c.post("/v1/uploads?kind=weights", content=_safetensors(big), headers=api.a)
    assert r.status_code == 201, r.text
    assert parsed == []
    # cut short: refused without parsing; a small header is still parsed and checked
    assert_problem(
        c.post("/v1/uploads?kind=weights", content=_safetensors(big[:-1] + b"x"), headers=api.a), 415
    )
    assert_problem(c.post("/v1/uploads?kind=weights", content=_safetensors(b'{"a": [1,'), headers=api.a), 415)
    assert parsed == [len(b'{"a": [1,')]
    # the worker parses it: a job on those weights fails as bad weights, not retried
    from store.db import make_engine
    from worker.execute import execute

    bad = c.post(
        "/v1/uploads?kind=weights", content=_safetensors(b"{" + b" " * (2 * 2**20) + b"x}"), headers=api.a
    )
    assert bad.status_code == 201
    job = api.submit(DIGITS | {"model": {"name": "resnet20", "weights": bad.json()["ref"]}})
    settings = api.settings.model_copy(update={"heartbeat_s": 0.2})
    assert execute(job["id"], worker_name="w", settings=settings) == "failed"
    engine = make_engine(api.settings.sqlalchemy_url)
    with db.session_scope(engine) as s:
        row = repo.get_job(s, job["id"])
        assert (row.error_code, row.retryable) == ("bad_weights", False)
    engine.dispose()
