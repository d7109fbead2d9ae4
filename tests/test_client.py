"""The SDK and the `prune` CLI against an httpx.MockTransport fake of the HTTP contract (retries with one
idempotency key, cursors, SSE resume, verified and resumed downloads, problem+json), plus `prune keys`
on a real SQLite database, and the rule that the client side never imports torch."""

from __future__ import annotations

import base64
import functools
import hashlib
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import pruning_client.cli as cli
import pruning_client.sdk as sdk
from pruning_client.models import EpochData, EventData, PrunedData
from pruning_client.sdk import ApiError, Client, IntegrityError

BLOB = bytes(range(256)) * 64  # a 16 KiB "model.safetensors"
SHA = hashlib.sha256(BLOB).hexdigest()
PROBLEM = "application/problem+json"


def problem(status: int, title: str, detail: str, errors: list | None = None) -> httpx.Response:
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail, "instance": "/x"}
    if errors is not None:
        body["errors"] = errors
    return httpx.Response(status, content=json.dumps(body), headers={"content-type": PROBLEM})


class Dropped(httpx.SyncByteStream):
    """A body that sends some bytes and then loses the connection."""

    def __init__(self, chunks: list[bytes]):
        self.chunks = chunks

    def __iter__(self):
        yield from self.chunks
        raise httpx.ReadError("connection reset by peer")


def sse(seq: int, kind: str, data: dict) -> bytes:
    return f"id: {seq}\nevent: {kind}\ndata: {json.dumps(data)}\n\n".encode()


PRUNED_LINE = "pruned: MACs 40.55M -> 20.30M (0.501), params 270,000 -> 140,000 (0.519)"
EPOCH_LINE = "finetune epoch 1: loss 0.5000, top-1 91.50%, MACs 20.30M"
EVENTS = [
    (1, "status", {"status": "queued"}),
    (2, "status", {"status": "running"}),
    (3, "pruned", {"macs_before": 40_550_000, "macs_after": 20_300_000, "params_before": 270_000,
                   "params_after": 140_000, "macs_ratio": 0.5006, "params_ratio": 0.5185, "text": PRUNED_LINE}),
    (4, "phase", {"name": "finetune", "epochs": 1, "steps_per_epoch": 5}),
    (5, "progress", {"progress": 0.6, "phase": "finetune", "epoch": 1, "step": 3}),
    (6, "epoch", {"phase": "finetune", "epoch": 1, "train_loss": 0.5, "top1": 91.5, "macs": 20_300_000,
                  "text": EPOCH_LINE, "lr": 0.01}),
    (7, "status", {"status": "succeeded"}),
]  # fmt: skip
RESULT = {
    "dense": {"macs": 40_550_000, "params": 270_000, "top1": 95.0},
    "pruned": {"macs": 20_300_000, "params": 140_000, "top1": 91.5},
    "achieved_macs_ratio": 0.5006,
}


class FakeService:
    """Just enough of api/ for the client: jobs, cursors, SSE, artifacts with ETag/Repr-Digest/Range."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.jobs: dict[str, dict] = {}
        self.by_key: dict[str, str] = {}
        self.fail_next: list[int] = []  # statuses to answer before serving normally
        self.drop_events_after = 0  # first SSE connection drops after this many events (0: never)
        self.blob, self.announced_sha = BLOB, SHA
        self.uploads: list[bytes] = []
        self.ignore_sha256_filter = False  # as a server from before GET /v1/uploads?sha256= would
        self.drop_download_after: int | None = None  # the next full download drops after this many bytes

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.fail_next:
            return problem(self.fail_next.pop(0), "Service Unavailable", "try again")
        path, method = request.url.path, request.method
        routes = [
            ("POST", r"/v1/jobs", self.create),
            ("GET", r"/v1/jobs", self.list),
            ("GET", r"/v1/jobs/(\w+)", self.get),
            ("POST", r"/v1/jobs/(\w+)/cancel", self.cancel),
            ("GET", r"/v1/jobs/(\w+)/events", self.events),
            ("GET", r"/v1/jobs/(\w+)/artifacts", self.artifacts),
            ("GET", r"/v1/jobs/(\w+)/artifacts/(.+)", self.artifact),
            ("POST", r"/v1/uploads", self.upload),
            ("GET", r"/v1/uploads", self.list_uploads),
            ("GET", r"/v1/models/(.+)", self.model_keys),
        ]
        for m, pattern, handler in routes:
            match = re.fullmatch(pattern, path)
            if m == method and match:
                return handler(request, *match.groups())
        return problem(404, "Not Found", f"no route {method} {path}")

    def job(self, job_id: str, status: str = "queued") -> dict:
        return {
            "id": job_id,
            "status": status,
            "method": "magnitude",
            "spec": {
                "model": {"name": "resnet20"},
                "data": {"name": "digits"},
                "target": {"macs_ratio": 0.5},
            },
            "progress": 0.0,
            "phase": None,
            "attempt": 0,
            "max_attempts": 3,
            "cancel_requested": False,
            "error": None,
            "result": RESULT if status == "succeeded" else None,
            "created_at": f"2025-01-01T00:00:{len(self.jobs):02d}+00:00",
        }

    def create(self, request: httpx.Request) -> httpx.Response:
        key = request.headers.get("idempotency-key")
        if key not in self.by_key:
            job_id = f"j{len(self.jobs) + 1}"
            self.jobs[job_id] = self.job(job_id) | {"spec": json.loads(request.content)}
            self.by_key[key] = job_id
        return httpx.Response(201, json=self.jobs[self.by_key[key]])

    def list(self, request: httpx.Request) -> httpx.Response:
        limit = int(request.url.params["limit"])
        start = int(request.url.params.get("cursor", 0))
        wanted = request.url.params.get("status")
        ids = sorted((i for i in self.jobs if wanted in (None, self.jobs[i]["status"])), reverse=True)
        nxt = str(start + limit) if start + limit < len(ids) else None
        return httpx.Response(
            200, json={"items": [self.jobs[i] for i in ids[start : start + limit]], "next_cursor": nxt}
        )

    def get(self, request: httpx.Request, job_id: str) -> httpx.Response:
        if job_id not in self.jobs:
            return problem(404, "Not Found", f"job {job_id} not found")
        return httpx.Response(200, json=self.jobs[job_id])

    def cancel(self, request: httpx.Request, job_id: str) -> httpx.Response:
        self.jobs[job_id] |= {"cancel_requested": True}
        return httpx.Response(202, json=self.jobs[job_id])

    def events(self, request: httpx.Request, job_id: str) -> httpx.Response:
        after = int(request.headers.get("last-event-id") or request.url.params.get("after") or 0)
        body = [b": ping\n\n"] + [sse(*e) for e in EVENTS if e[0] > after]
        headers = {"content-type": "text/event-stream"}
        if self.drop_events_after:
            n, self.drop_events_after = self.drop_events_after, 0
            return httpx.Response(200, headers=headers, stream=Dropped([*body[: n + 1], b"id: 99\ndata: {"]))
        if job_id in self.jobs:  # the stream ends when the job does
            self.jobs[job_id] |= {"status": "succeeded", "result": RESULT}
        return httpx.Response(200, headers=headers, content=b"".join(body))

    def artifacts(self, request: httpx.Request, job_id: str) -> httpx.Response:
        if self.jobs and job_id not in self.jobs:  # (the SDK tests download without creating a job)
            return problem(404, "Not Found", f"job {job_id} not found")
        if self.jobs.get(job_id, {}).get("status") in ("queued", "running"):
            return httpx.Response(200, json={"items": []})
        art = {"name": "model.safetensors", "size": len(self.blob), "sha256": SHA, "media_type": "x"}
        return httpx.Response(200, json={"items": [art]})

    def artifact(self, request: httpx.Request, job_id: str, name: str) -> httpx.Response:
        if name != "model.safetensors":
            return problem(404, "Not Found", f"no artifact {name}")
        b64 = base64.b64encode(bytes.fromhex(self.announced_sha)).decode()
        headers = {"etag": f'"{self.announced_sha}"', "repr-digest": f"sha-256=:{b64}:"}
        rng = request.headers.get("range")
        if rng:
            start = int(rng.removeprefix("bytes=").removesuffix("-"))
            headers["content-range"] = f"bytes {start}-{len(self.blob) - 1}/{len(self.blob)}"
            return httpx.Response(206, headers=headers, content=self.blob[start:])
        if self.drop_download_after is not None:
            n, self.drop_download_after = self.drop_download_after, None
            return httpx.Response(200, headers=headers, stream=Dropped([self.blob[:n]]))
        return httpx.Response(200, headers=headers, content=self.blob)

    def upload(self, request: httpx.Request) -> httpx.Response:
        self.uploads.append(request.read())
        return httpx.Response(201, json=self._upload(len(self.uploads) - 1, request.url.params["kind"]))

    def _upload(self, i: int, kind: str) -> dict:
        digest = hashlib.sha256(self.uploads[i]).hexdigest()
        return {
            "id": f"u{i + 1}",
            "ref": f"upload:u{i + 1}",
            "kind": kind,
            "sha256": digest,
            "source_sha256": digest,
        }

    def list_uploads(self, request: httpx.Request) -> httpx.Response:
        ups = [self._upload(i, "weights") for i in range(len(self.uploads))][::-1]
        if (want := request.url.params.get("sha256")) and not self.ignore_sha256_filter:
            ups = [u for u in ups if u["source_sha256"] == want]
        return httpx.Response(200, json={"items": ups, "next_cursor": None})

    def model_keys(self, request: httpx.Request, name: str) -> httpx.Response:
        if name != "resnet20":
            return problem(404, "Not Found", f"Model {name} is not one this server offers (GET /v1/models).")
        classes = int(request.url.params["num_classes"])
        keys = [
            {
                "key": "conv1.weight",
                "shape": [16, int(request.url.params["in_channels"]), 3, 3],
                "dtype": "float32",
            },
            {"key": "bn1.num_batches_tracked", "shape": [], "dtype": "int64"},
            {"key": "linear.weight", "shape": [classes, 64], "dtype": "float32"},
        ]
        return httpx.Response(
            200, json={"name": name, "num_classes": classes, "in_channels": 1, "keys": keys}
        )


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeService:
    monkeypatch.setattr(sdk, "_sleep", lambda s: None)  # backoff without waiting
    return FakeService()


@pytest.fixture
def api(fake: FakeService) -> Client:
    with Client("http://svc", api_key="pk_test", transport=httpx.MockTransport(fake)) as c:
        yield c


# --- SDK ---


def test_submit_retried_after_503_reuses_its_idempotency_key(api: Client, fake: FakeService) -> None:
    fake.fail_next = [503, 502]
    job = api.submit({"model": {"name": "resnet20"}})
    keys = [r.headers["idempotency-key"] for r in fake.requests]
    assert len(keys) == 3 and len(set(keys)) == 1 and keys[0]
    assert job.id == "j1" and len(fake.jobs) == 1
    assert all(r.headers["authorization"] == "Bearer pk_test" for r in fake.requests)
    api.submit({"model": {"name": "resnet20"}})
    assert fake.requests[-1].headers["idempotency-key"] != keys[0], "a new call is a new job"
    assert api.submit({}, idempotency_key="mine").id == api.submit({}, idempotency_key="mine").id


def test_retries_give_up_with_the_last_problem(api: Client, fake: FakeService) -> None:
    fake.fail_next = [503] * 10
    with pytest.raises(ApiError) as err:
        api.get("j1")
    assert err.value.status == 503 and len(fake.requests) == api.retries + 1


def test_list_follows_cursors(api: Client, fake: FakeService) -> None:
    for i in range(5):
        fake.jobs[f"j{i}"] = fake.job(f"j{i}")
    assert [j.id for j in api.list(limit=2)] == ["j4", "j3", "j2", "j1", "j0"]
    cursors = [r.url.params.get("cursor") for r in fake.requests]
    assert cursors == [None, "2", "4"]


def test_events_parse_sse_and_resume_after_a_drop(api: Client, fake: FakeService) -> None:
    fake.drop_events_after = 2
    events = list(api.events("j1"))
    assert [e.seq for e in events] == [1, 2, 3, 4, 5, 6, 7], "nothing lost, nothing repeated"
    assert events[3].model_dump(mode="json", exclude_none=True) == {
        "id": 4,
        "seq": 4,
        "kind": "phase",
        "data": EVENTS[3][2],
    }, "the event as the server sent it"
    first, second = [r for r in fake.requests if r.url.path.endswith("/events")]
    assert first.headers["accept"] == "text/event-stream" and "last-event-id" not in first.headers
    assert second.headers["last-event-id"] == "2", "the half-sent event 99 must not count"


def test_events_are_typed_by_kind_and_keep_fields_unknown_here(api: Client) -> None:
    events = {e.kind: e for e in api.events("j1")}
    pruned, epoch = events["pruned"].data, events["epoch"].data
    assert isinstance(pruned, PrunedData) and pruned.macs_after < pruned.macs_before
    assert isinstance(epoch, EpochData) and (epoch.phase, epoch.epoch, epoch.top1) == ("finetune", 1, 91.5)
    assert epoch.model_extra == {"lr": 0.01}, "a newer server's field is kept, not refused"
    odd = sdk.parse_event({"kind": "pruned", "data": {"macs_before": "lots"}})
    assert type(odd.data) is EventData and odd.data.model_extra == {"macs_before": "lots"}


def test_wait_returns_the_ended_job_with_its_typed_result(
    api: Client, fake: FakeService, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake.jobs["j1"] = fake.job("j1", "running")
    monkeypatch.setattr(sdk, "_sleep", lambda _s: fake.jobs["j1"].update(status="succeeded", result=RESULT))
    job = api.wait("j1", timeout=60)
    assert job.ended and job.status == "succeeded"
    assert (job.result.achieved_macs_ratio, job.result.pruned.top1) == (0.5006, 91.5)
    fake.jobs["j2"] = fake.job("j2", "running")
    with pytest.raises(TimeoutError, match="job j2 is still running"):
        api.wait("j2", timeout=0)


def test_download_verifies_sha256(api: Client, fake: FakeService, tmp_path: Path) -> None:
    path = api.download("j1", "model.safetensors", tmp_path)
    assert path == tmp_path / "model.safetensors" and path.read_bytes() == BLOB
    assert list(tmp_path.iterdir()) == [path], "no .part left behind"

    fake.blob = BLOB[:-1] + b"\x00"  # corrupted in transit; headers still announce the real sha256
    dest = tmp_path / "other" / "m.safetensors"
    with pytest.raises(IntegrityError, match="sha256"):
        api.download("j1", "model.safetensors", dest)
    assert list(dest.parent.iterdir()) == [], "a corrupted body is never kept"


def test_download_resumes_a_partial_file_with_range(api: Client, fake: FakeService, tmp_path: Path) -> None:
    dest = tmp_path / "model.safetensors"
    (tmp_path / "model.safetensors.part").write_bytes(BLOB[:5000])
    assert api.download("j1", "model.safetensors", dest).read_bytes() == BLOB
    (req,) = [r for r in fake.requests if "artifacts/" in r.url.path]
    assert req.headers["range"] == "bytes=5000-"
    assert not (tmp_path / "model.safetensors.part").exists()


def test_download_resumes_after_a_drop_and_discards_a_stale_part(
    api: Client, fake: FakeService, tmp_path: Path
) -> None:
    fake.drop_download_after = 3000
    assert api.download("j1", "model.safetensors", tmp_path).read_bytes() == BLOB
    ranges = [r.headers.get("range") for r in fake.requests]
    assert ranges == [None, "bytes=3000-"]

    fake.requests.clear()
    (tmp_path / "b.part").write_bytes(b"not the same file")  # a leftover from another artifact
    assert api.download("j1", "model.safetensors", tmp_path / "b").read_bytes() == BLOB
    assert [r.headers.get("range") for r in fake.requests] == ["bytes=17-", None], "then one fresh try"


def test_refuses_hostile_artifact_names(api: Client, tmp_path: Path) -> None:
    for name in ("../evil", "/etc/passwd", "a/../../b"):
        with pytest.raises(sdk.ClientError, match="refusing"):
            api.download("j1", name, tmp_path)


def test_problem_json_becomes_a_one_line_api_error(api: Client, fake: FakeService) -> None:
    with pytest.raises(ApiError) as err:
        api.get("nope")
    assert (err.value.status, err.value.title, err.value.detail) == (404, "Not Found", "job nope not found")
    assert str(err.value) == "404 Not Found: job nope not found"

    e = ApiError.from_response(
        problem(
            422, "Invalid job spec", "2 problems\nin body", [{"loc": ["body", "target"], "msg": "bad"}, "x"]
        )
    )
    assert e.errors and "\n" not in str(e) and "target: bad" in str(e)


# --- CLI ---


@pytest.fixture
def use_fake(fake: FakeService, monkeypatch: pytest.MonkeyPatch) -> FakeService:
    monkeypatch.setattr(cli, "Client", functools.partial(Client, transport=httpx.MockTransport(fake)))
    return fake


def test_submit_with_an_invalid_spec_prints_one_line_per_field(
    tmp_path: Path, use_fake: FakeService, capsys: pytest.CaptureFixture
) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_text("model: {name: resnet20}\ntarget: {macs_ratio: 2}\nschedule: {epochs: -1}\ncolour: red\n")
    assert (
        cli.main(["submit", str(spec), "--model", "No Such Model"]) == 2
    )  # no plugin could be named so: plugin-shaped names are left to the server
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 4 and all(line.startswith("prune: error: invalid spec: ") for line in lines)
    assert {line.split(": ")[3] for line in lines} == {
        "model.name",
        "target.macs_ratio",
        "schedule.epochs",
        "colour",
    }
    assert use_fake.requests == [], "no request for a spec that fails locally"


def test_submit_uploads_local_files_then_waits(
    tmp_path: Path, use_fake: FakeService, capsys: pytest.CaptureFixture
) -> None:
    weights = tmp_path / "dense.safetensors"
    weights.write_bytes(b"weights")
    use_fake.jobs["j1"] = use_fake.job("j1", "succeeded")
    use_fake.by_key["k"] = "j1"
    assert (
        cli.main(
            ["submit", "--data", "digits", "--weights", str(weights), "--idempotency-key", "k", "--wait"]
        )
        == 0
    )
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "j1" and "succeeded" in out[1] and "top-1 95.00% -> 91.50%" in out[1]
    assert use_fake.uploads == [b"weights"]
    sent = json.loads(next(r for r in use_fake.requests if r.url.path == "/v1/jobs").content)
    assert sent["model"]["weights"] == "upload:u1" and sent["data"]["name"] == "digits"


def test_submit_does_not_send_the_same_file_twice(
    tmp_path: Path, use_fake: FakeService, capsys: pytest.CaptureFixture
) -> None:
    weights = tmp_path / "dense.pth"
    weights.write_bytes(b"the same weights")
    other = tmp_path / "other.pth"
    other.write_bytes(b"other weights")
    for file in (weights, weights, other):
        assert cli.main(["submit", "--data", "digits", "--weights", str(file)]) == 0
    assert use_fake.uploads == [b"the same weights", b"other weights"]  # sent once each
    err = capsys.readouterr().err
    assert f"already uploaded {weights} as upload:u1" in err and f"uploaded {other} as upload:u2" in err
    sent = [json.loads(r.content) for r in use_fake.requests if r.url.path == "/v1/jobs"]
    assert [s["model"]["weights"] for s in sent] == ["upload:u1", "upload:u1", "upload:u2"]
    # a server that ignores the filter (listing every upload) is not trusted with the match
    use_fake.ignore_sha256_filter = True
    with cli.Client("http://fake", api_key="k") as c:
        assert c.find_upload("0" * 64, "weights") is None
        assert c.find_upload(hashlib.sha256(b"other weights").hexdigest(), "weights").id == "u2"
        assert c.upload(weights, "weights", reuse=False).id == "u3"


def test_model_keys_command(use_fake: FakeService, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["model", "resnet20", "--classes", "7", "--channels", "1"]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0].split() == ["key", "shape", "dtype"]
    assert lines[1].split() == ["conv1.weight", "16x1x3x3", "float32"]
    assert lines[2].split() == ["bn1.num_batches_tracked", "scalar", "int64"]
    assert lines[3].split() == ["linear.weight", "7x64", "float32"] and "3 keys" in err
    assert cli.main(["model", "nosuch"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Model nosuch is not one this server offers" in err, err


def test_watch_status_download_cancel(
    tmp_path: Path, use_fake: FakeService, capsys: pytest.CaptureFixture
) -> None:
    use_fake.jobs["j1"] = use_fake.job("j1", "running")
    assert cli.main(["watch", "j1"]) == 0
    out = capsys.readouterr().out
    assert EPOCH_LINE in out and PRUNED_LINE in out
    assert "j1 succeeded: MACs 40.55M -> 20.30M (ratio 0.501)" in out

    use_fake.jobs["j2"] = use_fake.job("j2", "failed") | {"error": {"code": "bad_data", "message": "no"}}
    assert cli.main(["watch", "j2"]) == 1
    assert "j2 failed: bad_data: no" in capsys.readouterr().out

    assert cli.main(["status"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:2] == ["ID", "STATUS"] and [r.split()[0] for r in table[1:]] == ["j2", "j1"]
    # an ended job shows where it ended and, when it succeeded, its result (achieved MACs, top-1)
    assert table[0].split()[-4:] == ["MACS", "TOP-1", "%", "CREATED"]
    assert "done" in table[2] and "0.501" in table[2] and "91.50" in table[2]
    assert "stopped at" in table[1]
    assert cli.main(["status", "j1", "--url", "http://elsewhere"]) == 0
    assert "status    succeeded" in capsys.readouterr().out

    assert cli.main(["download", "j1", "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == BLOB

    assert cli.main(["cancel", "j2"]) == 0
    assert use_fake.jobs["j2"]["cancel_requested"]

    assert cli.main(["status", "j9"]) == 2
    assert capsys.readouterr().err == "prune: error: 404 Not Found: job j9 not found\n"


def test_watch_into_a_file_prints_plain_lines_without_carriage_returns(
    use_fake: FakeService, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_fake.jobs["j1"] = use_fake.job("j1", "running")
    assert cli.main(["watch", "j1"]) == 0  # capsys: neither stdout nor stderr is a terminal
    captured = capsys.readouterr()
    assert "\r" not in captured.out + captured.err, "no progress-bar frames in a log file"
    assert captured.err == ""
    lines = captured.out.splitlines()
    assert lines[:2] == ["status: queued", "status: running"] and lines[-1].startswith("j1 succeeded: MACs")
    assert "phase finetune: 1 epochs x 5 steps" in lines

    # on a terminal the bar is drawn (on stderr), so the rule above is not "never a bar"
    use_fake.jobs["j1"] = use_fake.job("j1", "running")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert cli.main(["watch", "j1"]) == 0
    assert "\r" in capsys.readouterr().err


def test_status_with_no_match_says_so_in_one_line(
    use_fake: FakeService, capsys: pytest.CaptureFixture
) -> None:
    assert cli.main(["status"]) == 1
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("", "prune: no jobs yet\n")

    use_fake.jobs["j1"] = use_fake.job("j1", "succeeded")
    assert cli.main(["list", "--status", "failed"]) == 1
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("", "prune: no failed jobs\n")
    assert cli.main(["list", "--status", "succeeded"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[:2] == ["j1", "succeeded"]


def test_artifacts_lists_name_size_and_media_type(
    use_fake: FakeService, capsys: pytest.CaptureFixture
) -> None:
    use_fake.jobs["j1"] = use_fake.job("j1", "succeeded")
    assert cli.main(["artifacts", "j1"]) == 0
    header, row = capsys.readouterr().out.splitlines()
    assert header.split() == ["NAME", "SIZE", "MEDIA", "TYPE"]
    assert row.split() == ["model.safetensors", f"{len(BLOB):,}", "x"]

    use_fake.jobs["j2"] = use_fake.job("j2", "running")
    assert cli.main(["artifacts", "j2"]) == 1
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("", "prune: job j2 has no artifacts yet (status running)\n")
    assert cli.main(["artifacts", "j9"]) == 2
    assert capsys.readouterr().err == "prune: error: 404 Not Found: job j9 not found\n"


class _JobsHandler(http.server.BaseHTTPRequestHandler):
    """A real HTTP server's ``GET /v1/jobs``: many jobs, so the table is longer than one line."""

    def do_GET(self) -> None:
        jobs = [FakeService().job(f"j{i}", "succeeded") for i in range(200)]
        body = json.dumps({"items": jobs, "next_cursor": None}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None: ...


@pytest.fixture
def jobs_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _JobsHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_closed_pipe_is_not_an_error(jobs_server: str) -> None:
    cmd = [sys.executable, "-m", "pruning_client.cli", "--url", jobs_server, "list", "--limit", "200"]
    root = Path(__file__).parents[1]
    # The reader is gone before prune writes a byte: its first write meets a closed pipe.
    proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141, err  # 128 + SIGPIPE, as `yes | head -1` ends
    assert err == "", "no traceback, no 'Exception ignored' at exit"

    # and as people type it
    shell = subprocess.run(
        ["bash", "-o", "pipefail", "-c", " ".join(cmd) + " | head -1"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shell.stdout.split()[:2] == ["ID", "STATUS"] and shell.stderr == ""
    assert shell.returncode in (0, 141), shell.returncode  # 0 when prune wrote it all before head left


def test_run_is_the_local_engine_command(monkeypatch: pytest.MonkeyPatch) -> None:
    import pruning_core.cli

    seen = []
    monkeypatch.setattr(pruning_core.cli, "main", lambda argv: seen.append(argv) or 0)
    assert cli.main(["--url", "http://x", "run", "spec.yaml", "--epochs", "1", "--url", "y"]) == 0
    assert seen == [["run", "spec.yaml", "--epochs", "1", "--url", "y"]]


def test_status_against_an_unreachable_service(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(sdk, "_sleep", lambda s: None)
    assert cli.main(["--url", "http://127.0.0.1:1", "status"]) == 2
    captured = capsys.readouterr()
    assert captured.err == "prune: error: cannot reach http://127.0.0.1:1: is the service running?\n"
    assert captured.out == ""


def test_keys_create_list_revoke(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from pruning_core.settings import get_settings
    from store import db, repo

    monkeypatch.setenv("DATABASE_URL", sqlite_url)
    get_settings.cache_clear()
    try:
        db.migrate(sqlite_url)
        assert cli.main(["keys", "create", "--owner", "alice", "--name", "ci"]) == 0
        key = capsys.readouterr().out.strip()
        engine = db.make_engine(sqlite_url)
        with db.session_scope(engine) as s:
            assert repo.owner_of_key(s, key) == "alice"
            (row,) = repo.list_api_keys(s, "alice")

        assert cli.main(["keys", "list", "--owner", "alice"]) == 0
        listing = capsys.readouterr().out
        assert row.id in listing and key not in listing, "the plaintext is shown once only"
        assert cli.main(["keys", "list", "--owner", "alice", "--json"]) == 0
        (listed,) = json.loads(capsys.readouterr().out)
        assert (listed["id"], listed["name"], listed["revoked_at"]) == (row.id, "ci", None)
        assert key not in json.dumps(listed) and key.startswith(listed["prefix"])

        assert cli.main(["keys", "revoke", row.id, "--owner", "bob"]) == 2
        assert cli.main(["keys", "revoke", row.id, "--owner", "alice"]) == 0
        with db.session_scope(engine) as s:
            assert repo.owner_of_key(s, key) is None
        engine.dispose()
    finally:
        get_settings.cache_clear()


def test_keys_on_an_unmigrated_database_is_one_line(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from pruning_core.settings import get_settings

    monkeypatch.setenv("DATABASE_URL", sqlite_url)
    get_settings.cache_clear()
    try:
        assert cli.main(["keys", "list", "--owner", "alice"]) == 2
    finally:
        get_settings.cache_clear()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("prune: error: database ")


def test_client_never_imports_torch(tmp_path: Path) -> None:
    code = (
        "import sys; import pruning_client, pruning_client.cli, pruning_client.sdk; "
        "pruning_client.sdk._sleep = lambda s: None; "
        "rc = pruning_client.cli.main(['submit', '--model', 'nope']); "
        "rc2 = pruning_client.cli.main(['--url', 'http://127.0.0.1:1', 'cancel', 'j1']); "
        "print(rc, rc2, [m for m in ('torch', 'torchvision', 'sqlalchemy') if m in sys.modules])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parents[1],
    )
    assert out.stdout.strip() == "2 2 []"


# Run before anything else in a child: every import of the engine, torch or the service fails as in
# an environment where only the SDK (``pip install ./pruning_client``) is installed.
WITHOUT_ENGINE = """
import sys
class NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("torch", "pruning_core", "api", "store", "worker", "sqlalchemy"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NotInstalled())
"""


def _without_engine(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_ENGINE + code],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[1],
        env={**os.environ, "PRUNE_URL": "http://127.0.0.1:1", "HOME": str(tmp_path)},
        timeout=120,
    )


def test_the_sdk_and_cli_work_without_the_engine_or_torch(tmp_path: Path) -> None:
    code = """
import contextlib, io, pruning_client.sdk
from pruning_client import Client
from pruning_client.cli import main
pruning_client.sdk._sleep = lambda s: None
with Client("http://127.0.0.1:1", api_key="k") as c:
    assert c.base_url == "http://127.0.0.1:1"
out = io.StringIO()
with contextlib.redirect_stdout(out):
    try:
        main(["submit", "--help"])
    except SystemExit as e:
        assert e.code == 0, e.code
assert "--target" in out.getvalue() and "--set" in out.getvalue()
codes = [main(["submit", "--model", "resnet20", "--target", "0.5"]), main(["methods"]), main(["run", "x.yaml"])]
print(codes, sorted(m for m in ("torch", "pruning_core", "httpx") if m in sys.modules))
"""
    out = _without_engine(code, tmp_path)
    assert out.stdout.strip() == "[2, 2, 2] ['httpx']", out.stderr
    errors = out.stderr.splitlines()
    assert errors[0] == "prune: error: cannot reach http://127.0.0.1:1: is the service running?", (
        "submit goes to the service: the spec is checked there"
    )
    assert (
        errors[1].startswith("prune: error: prune methods needs the engine")
        and "GET /v1/methods" in errors[1]
    )
    assert errors[2].startswith("prune: error: prune run needs the engine") and len(errors) == 3


def test_the_sdk_wheel_holds_only_pruning_client_and_requires_no_torch(tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(Path(cli.__file__).parent, src, ignore=shutil.ignore_patterns("__pycache__", "build"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(src),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("pruning_client-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        top = z.read(next(n for n in names if n.endswith(".dist-info/top_level.txt"))).decode()
    assert top.split() == ["pruning_client"]
    assert {n.split("/")[0] for n in names} == {"pruning_client", wheel.name.split("-py3")[0] + ".dist-info"}
    assert "pruning_client/sdk.py" in names and "pruning_client/cli.py" in names
    requires = [
        line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Requires-Dist:")
    ]
    assert {re.split(r"[<>=\[; ]", r)[0].lower() for r in requires} == {"httpx", "pydantic", "pyyaml", "tqdm"}


def test_version_methods_and_models_need_no_service(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("prune 0.")
    assert cli.main(["methods"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert [r.split()[0] for r in rows[1:]] == ["magnitude", "s2h", "tas", "psap", "epi"]
    assert cli.main(["methods", "psap"]) == 0
    ramp = next(r for r in capsys.readouterr().out.splitlines() if r.startswith("ramp "))
    assert ramp.split()[1] == "0.25"
    assert cli.main(["methods", "psap", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["psap"]["properties"]["ramp"]["default"] == 0.25
    assert cli.main(["methods", "nope"]) == 2
    assert (
        capsys.readouterr().err
        == "prune: error: unknown method 'nope'; known: magnitude, s2h, tas, psap, epi\n"
    )
    assert cli.main(["models", "--json"]) == 0
    names = {m["name"] for m in json.loads(capsys.readouterr().out)}
    assert {"resnet20", "mobilenet_v2", "tv:resnet18"} <= names


def test_set_any_spec_field_and_its_errors(
    tmp_path: Path, use_fake: FakeService, capsys: pytest.CaptureFixture
) -> None:
    """``--set FIELD=VALUE`` reaches any field, the value read as YAML; a bad one is one line."""
    argv = ["submit", "--data", "digits", "--method", "psap", "--set", "method.ramp=0.5"]
    argv += ["--set", "export.formats=[safetensors, onnx]", "--set", "kd.enabled=true"]
    assert cli.main(argv) == 0
    spec = next(iter(use_fake.jobs.values()))["spec"]
    assert spec["method"]["ramp"] == 0.5 and spec["export"]["formats"] == ["safetensors", "onnx"]
    assert spec["kd"]["enabled"] is True
    capsys.readouterr()
    assert cli.main(["submit", "--data", "digits", "--set", "ramp"]) == 2
    assert (
        capsys.readouterr().err
        == "prune: error: invalid spec: --set 'ramp': expected FIELD=VALUE, e.g. method.ramp=0.25\n"
    )
    assert cli.main(["submit", "--data", "digits", "--set", "schedule.epochs=-1"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("prune: error: invalid spec: schedule.epochs:")
