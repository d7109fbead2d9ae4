# ruff: noqa: F811 (the fixtures imported from test_api are arguments of the tests by name)
"""Artifacts and uploads in an S3-compatible bucket (OBJECT_STORE_URL), against moto's S3 server over
HTTP on 127.0.0.1 (the ``s3_bucket`` fixture, tests/conftest.py). Two "hosts" share the database and
the bucket but not a state directory: the API's and a worker's. The local-directory default is what
every other test runs on.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest

from pruning_core.errors import WeightsError
from pruning_core.settings import Settings
from store import db, objects, repo
from store.db import make_engine, migrate
from store.objects import LocalStore, S3Store, artifact_store, upload_store
from tests.faultkit import get, submit
from tests.test_api import Api, leftover_files, make_api, safetensors_bytes  # noqa: F401 (fixture)
from tests.test_worker import _Crash, digits_spec, expire_lease, make_settings, messages
from worker.execute import execute, resolve_uploads
from worker.reaper import reap_once
from worker.reporter import StoreReporter


def bucket(cfg: dict[str, str]) -> dict[str, bytes]:
    """Every object under the service's prefix: key (below the prefix) -> content."""
    name, prefix = objects.parse_url(cfg["object_store_url"])
    client = boto3.client("s3", endpoint_url=cfg["s3_endpoint_url"])
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=name, Prefix=prefix + "/"):
        for o in page.get("Contents", ()):
            key = o["Key"].removeprefix(prefix + "/")
            out[key] = client.get_object(Bucket=name, Key=o["Key"])["Body"].read()
    return out


def worker_host(url: str, state: Path, cfg: dict[str, str], **kw: Any) -> Settings:
    """A worker's settings on another "host": its own state directory, the same database and bucket."""
    return make_settings(url, state, **cfg, **kw)


# --- the interface, on the S3 server ---


def test_s3_store_puts_in_parts_reads_ranges_lists_copies_and_deletes(
    s3_bucket: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = artifact_store(Settings(state_dir=tmp_path, **s3_bucket))
    assert isinstance(store, S3Store)
    monkeypatch.setattr(objects, "MULTIPART_BYTES", 5 * 1024**2)  # S3's smallest part
    big = tmp_path / "big.bin"
    big.write_bytes(bytes(range(256)) * (11 * 4096))  # 11 MiB: three parts
    digest = hashlib.sha256(big.read_bytes()).hexdigest()
    store.put_file("j/attempt-1/big.bin", big, sha256=digest)
    name, prefix = objects.parse_url(s3_bucket["object_store_url"])
    head = store.client.head_object(Bucket=name, Key=f"{prefix}/artifacts/j/attempt-1/big.bin")
    assert head["ETag"].strip('"').endswith("-3")  # a multipart upload's ETag counts its parts
    assert store.stat("j/attempt-1/big.bin") == objects.ObjectInfo(big.stat().st_size, digest)
    assert store.stat("j/attempt-1/none") is None
    assert b"".join(store.iter_range("j/attempt-1/big.bin", 1000, 300_000)) == big.read_bytes()[1000:300_000]

    store.put_bytes("j/attempt-1/checkpoints/train.pt", b"ck")
    store.put_bytes("sweep-s/leaderboard.json", b"{}")
    assert store.list("j/") == ["j/attempt-1/big.bin", "j/attempt-1/checkpoints/train.pt"]
    uploads = upload_store(Settings(state_dir=tmp_path, **s3_bucket))
    objects.copy_object(store, "j/attempt-1/checkpoints/train.pt", uploads, "x/train.pt", "0" * 64)
    assert uploads.read_bytes("x/train.pt") == b"ck" and uploads.stat("x/train.pt").sha256 == "0" * 64
    assert store.delete_prefix("j/") == 2
    assert store.list() == ["sweep-s/leaderboard.json"] and uploads.list() == ["x/train.pt"]
    with pytest.raises(FileNotFoundError):
        store.read_bytes("j/attempt-1/big.bin")
    for bad in ("../x", "/etc/passwd", "a//b", "a/../b", ""):
        with pytest.raises(ValueError):
            store.put_bytes(bad, b"x")


def test_the_local_store_keeps_its_files_under_its_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    store = LocalStore(root)
    store.put_bytes("j/attempt-1/a.txt", b"hello")
    assert (root / "j/attempt-1/a.txt").read_bytes() == b"hello" and store.presign(
        "j", 60, filename="a", media_type="x"
    ) is None
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "keep").write_bytes(b"x")
    for bad in ("../outside/", "../outside/keep"):
        with pytest.raises(ValueError):
            store.delete_prefix(bad)
    assert (tmp_path / "outside" / "keep").exists()
    assert store.delete_prefix("j/") == 1 and not (root / "j").exists()


# --- uploads ---


def test_an_upload_lands_in_the_bucket_a_worker_fetches_it_and_delete_removes_it(
    make_api, sqlite_url: str, s3_bucket: dict[str, str], tmp_path: Path
) -> None:
    api = make_api(sqlite_url, max_upload_bytes=16_384, **s3_bucket)
    data = safetensors_bytes(64)
    r = api.client.post("/v1/uploads?kind=weights&filename=w.safetensors", content=data, headers=api.a)
    assert r.status_code == 201, r.text
    up = r.json()
    with db.session_scope(api.engine) as s:
        rel = repo.get_upload(s, up["id"]).path
    assert bucket(s3_bucket) == {f"uploads/{rel}": data}
    assert upload_store(api.settings).stat(rel).sha256 == up["sha256"] == hashlib.sha256(data).hexdigest()
    assert leftover_files(api.settings.uploads_dir) == []  # nothing of it stays on the API's host
    again = api.client.post("/v1/uploads?kind=weights&filename=w.safetensors", content=data, headers=api.a)
    assert again.status_code == 200 and len(bucket(s3_bucket)) == 1

    # A worker on another host downloads it into its cache, checked against the recorded sha256.
    worker = worker_host(sqlite_url, tmp_path / "host-b", s3_bucket)
    spec = {**digits_spec(), "model": {"name": "resnet20", "weights": up["ref"]}}
    out = resolve_uploads(api.engine, spec, "alice", upload_store(worker), worker.uploads_dir)
    path = Path(out["model"]["weights"])
    assert path.is_relative_to(worker.uploads_dir) and path.read_bytes() == data
    upload_store(worker).put_bytes(rel, data[:-1] + b"\x01")  # the object no longer matches its row
    with pytest.raises(WeightsError, match="sha256"):
        resolve_uploads(api.engine, spec, "alice", upload_store(worker), tmp_path / "fresh-cache")

    assert api.client.delete(f"/v1/uploads/{up['id']}", headers=api.a).status_code == 204
    assert bucket(s3_bucket) == {}
    with pytest.raises(WeightsError, match="not found"):
        resolve_uploads(api.engine, spec, "alice", upload_store(worker), tmp_path / "fresh-cache")


# --- a job across hosts ---


def test_a_job_run_on_another_host_is_served_by_the_api(
    make_api, sqlite_url: str, s3_bucket: dict[str, str], tmp_path: Path
) -> None:
    api: Api = make_api(sqlite_url, **s3_bucket)
    job_id = api.submit()["id"]
    worker = worker_host(sqlite_url, tmp_path / "host-b", s3_bucket)
    assert execute(job_id, worker_name="host-b", settings=worker) == "succeeded"

    stored = bucket(s3_bucket)
    arts = api.client.get(f"/v1/jobs/{job_id}/artifacts", headers=api.a).json()["items"]
    assert {a["name"] for a in arts} >= {"model.safetensors", "report.json"}
    # only the artifacts stay in the bucket (no checkpoints), and no host keeps a copy
    assert {k for k in stored if k.startswith(f"artifacts/{job_id}/")} == {
        f"artifacts/{job_id}/attempt-1/{a['name']}" for a in arts
    }
    assert leftover_files(worker.artifacts_dir) == [] and leftover_files(api.settings.artifacts_dir) == []
    for a in arts:
        r = api.client.get(a["url"], headers=api.a)
        assert r.status_code == 200, r.text
        assert r.content == stored[f"artifacts/{job_id}/attempt-1/{a['name']}"]
        assert hashlib.sha256(r.content).hexdigest() == a["sha256"] == r.headers["etag"].strip('"')
        assert int(r.headers["content-length"]) == a["size"]

    url = f"/v1/jobs/{job_id}/artifacts/model.safetensors"
    model = stored[f"artifacts/{job_id}/attempt-1/model.safetensors"]
    r = api.client.get(url, headers=api.a | {"Range": "bytes=10-19"})
    assert r.status_code == 206 and r.content == model[10:20]
    assert r.headers["content-range"] == f"bytes 10-19/{len(model)}"
    r = api.client.get(url, headers=api.a | {"Range": "bytes=-7"})
    assert r.status_code == 206 and r.content == model[-7:]
    r = api.client.get(url, headers=api.a | {"Range": f"bytes={len(model)}-"})
    assert r.status_code == 416 and r.headers["content-range"] == f"bytes */{len(model)}"
    etag = api.client.get(url, headers=api.a | {"Range": "bytes=0-0"}).headers["etag"]
    assert api.client.get(url, headers=api.a | {"If-None-Match": etag}).status_code == 304
    assert api.client.get(url, headers=api.b).status_code == 404  # another owner
    r = api.client.head(url, headers=api.a)
    assert r.status_code == 200 and r.content == b"" and int(r.headers["content-length"]) == len(model)

    # S3_PRESIGN: a 307 to a URL of the bucket that needs no credentials and gives the same bytes
    presigning = make_api(sqlite_url, s3_presign=True, **s3_bucket)
    r = presigning.client.get(url, headers=presigning.a, follow_redirects=False)
    assert r.status_code == 307 and r.headers["etag"] == etag
    assert r.headers["location"].startswith(s3_bucket["s3_endpoint_url"])
    got = httpx.get(r.headers["location"])
    assert got.status_code == 200 and got.content == model
    assert presigning.client.get(url, headers=presigning.a | {"If-None-Match": etag}).status_code == 304
    # S3_PUBLIC_URL: the address clients reach (compose's endpoint is internal) signs the URL
    public = s3_bucket["s3_endpoint_url"].replace("127.0.0.1", "localhost")
    behind = make_api(sqlite_url, s3_presign=True, s3_public_url=public, **s3_bucket)
    r = behind.client.get(url, headers=behind.a, follow_redirects=False)
    assert r.status_code == 307 and r.headers["location"].startswith(public + "/")
    assert httpx.get(r.headers["location"]).content == model

    # a changed object is never served under its recorded digest
    artifact_store(api.settings).put_bytes(f"{job_id}/attempt-1/model.safetensors", model + b"x")
    assert api.client.get(url, headers=api.a).status_code == 410

    assert api.client.delete(f"/v1/jobs/{job_id}", headers=api.a).status_code == 204
    assert not [k for k in bucket(s3_bucket) if k.startswith(f"artifacts/{job_id}/")]


def test_an_attempt_killed_on_one_host_resumes_on_another_from_the_store(
    sqlite_url: str, s3_bucket: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    migrate(sqlite_url)
    host_a = worker_host(sqlite_url, tmp_path / "host-a", s3_bucket)
    host_b = worker_host(sqlite_url, tmp_path / "host-b", s3_bucket)
    engine = make_engine(sqlite_url)
    job_id = submit(engine, digits_spec(epochs=3))
    store = artifact_store(host_a)
    local = host_a.artifacts_dir / job_id / "attempt-1" / "checkpoints"
    real_step = StoreReporter.step

    def uploaded() -> bool:
        """The newest checkpoint on host A's disk is in the bucket, byte for byte."""
        files = sorted(local.glob("*.pt"))
        return bool(files) and all(
            store.stat(f"{job_id}/attempt-1/checkpoints/{f.name}") is not None
            and store.read_bytes(f"{job_id}/attempt-1/checkpoints/{f.name}") == f.read_bytes()
            for f in files
        )

    def dying_step(self: StoreReporter, phase: str, epoch: int, step: int, loss: float) -> None:
        real_step(self, phase, epoch, step, loss)
        if epoch >= 2:  # two epochs done and checkpointed: wait for the sync, then die
            deadline = time.monotonic() + 60
            while not uploaded():
                assert time.monotonic() < deadline, "the checkpoint never reached the store"
                time.sleep(0.1)
            raise _Crash

    monkeypatch.setattr(StoreReporter, "step", dying_step)
    with pytest.raises(_Crash):
        execute(job_id, worker_name="host-a", settings=host_a)
    monkeypatch.setattr(StoreReporter, "step", real_step)

    expire_lease(engine, job_id)
    assert reap_once(engine, lambda _id: None, host_b)["requeued"] == 1
    assert not (host_b.artifacts_dir / job_id).exists()  # host B has nothing of attempt 1 on disk
    assert execute(job_id, worker_name="host-b", settings=host_b) == "succeeded"
    assert get(engine, job_id).attempt == 2
    texts = messages(engine, job_id)
    assert "resuming from the checkpoints of attempt 1" in texts
    assert any("resuming at epoch 3" in t for t in texts)
    keys = store.list(f"{job_id}/")
    assert keys and all(k.startswith(f"{job_id}/attempt-2/") and "checkpoints" not in k for k in keys)
    engine.dispose()


def test_a_workers_upload_cache_keeps_the_recently_used_under_its_cap(
    s3_bucket: dict[str, str], tmp_path: Path
) -> None:
    """Copies downloaded from the bucket stay under ``upload_cache_max_bytes``: the least recently used
    go first (a copy used again counts as recent), never the one just asked for."""
    store = upload_store(Settings(state_dir=tmp_path, **s3_bucket))
    for name in "abc":
        store.put_bytes(f"{name}/{name}.bin", name.encode() * 1000)
    cache = tmp_path / "cache"
    old = time.time() - 3600
    for age, name in enumerate("ab"):
        path = objects.local_copy(store, f"{name}/{name}.bin", cache, cache_max_bytes=2500)
        os.utime(path, (old + age, old + age))  # a before b
    objects.local_copy(store, "a/a.bin", cache, cache_max_bytes=2500)  # a used again: now the newest
    c = objects.local_copy(store, "c/c.bin", cache, cache_max_bytes=2500)
    assert c.read_bytes() == b"c" * 1000
    assert sorted(p.relative_to(cache).as_posix() for p in cache.rglob("*")) == [
        "a",
        "a/a.bin",
        "c",
        "c/c.bin",
    ]
    objects.local_copy(store, "b/b.bin", cache, cache_max_bytes=500)  # over the cap alone: kept, alone
    assert [p.relative_to(cache).as_posix() for p in cache.rglob("*.bin")] == ["b/b.bin"]


# --- the bucket down ---


@pytest.mark.parametrize("broken", ["no such bucket", "no server"])
def test_readyz_checks_the_bucket(make_api, sqlite_url: str, s3_bucket: dict[str, str], broken: str) -> None:
    """Ready with the bucket; 503 naming the object store when the bucket is gone or nothing answers."""
    api = make_api(sqlite_url, **s3_bucket)
    r = api.client.get("/readyz")
    assert r.status_code == 200 and r.json()["checks"]["object_store"] == "ok", r.text
    cfg = dict(s3_bucket)
    if broken == "no such bucket":
        cfg["object_store_url"] = "s3://no-such-bucket-here/svc"
    else:
        cfg["s3_endpoint_url"] = "http://127.0.0.1:9"  # the discard port: nothing listens
    down = make_api(sqlite_url, **cfg)
    r = down.client.get("/readyz")
    assert r.status_code == 503 and r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["checks"]["object_store"].startswith("unreachable"), r.json()
    assert r.json()["checks"]["database"] == "ok"


def test_an_upload_while_the_bucket_is_gone_is_a_503_and_leaves_nothing(
    make_api, sqlite_url: str, s3_bucket: dict[str, str]
) -> None:
    """The store refusing the service is the server's trouble, not the client's: 503 + Retry-After, a
    problem body, and no upload row pointing at an object that is not there."""
    api = make_api(sqlite_url, max_upload_bytes=16_384, **{**s3_bucket, "object_store_url": "s3://gone/svc"})
    r = api.client.post(
        "/v1/uploads?kind=weights&filename=w.safetensors", content=safetensors_bytes(64), headers=api.a
    )
    assert r.status_code == 503, r.text
    assert r.headers["retry-after"] and r.json()["type"].endswith("storage-unavailable")
    assert api.client.get("/v1/uploads", headers=api.a).json()["items"] == []


def test_the_local_default_never_loads_boto3() -> None:
    code = (
        "import sys, api.app, worker.execute, worker.reaper, store.objects; "
        "print(','.join(m for m in ('boto3', 'botocore') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
