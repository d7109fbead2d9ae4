# ruff: noqa: F811 (the fixtures imported from test_api are arguments of the tests by name)
"""Weights from users: a PyTorch state dict (.pt/.pth) read with ``torch.load(weights_only=True)`` in
a child process and stored as safetensors, a pickle that would run code refused without running it,
anything but a state dict refused in one line; the expected keys of a model over HTTP; uploads
deduplicated by sha256 per owner; a file with wrong keys fails the job naming every one of them."""

from __future__ import annotations

import hashlib
import io
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save, save_file
from torch import nn

from pruning_core.errors import WeightsError
from pruning_core.models.weights import mismatch
from pruning_core.models.zoo import build_model
from store import db, repo
from tests.test_api import DIGITS, Api, api, assert_problem, make_api  # noqa: F401 (fixtures)

BIG = 8 * 2**20  # a resnet20 state dict is about 1.1 MB


class CreatesAFile:
    """Unpickling this opens (creates) ``path`` for writing: code that a weights file must never run."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def torch_bytes(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def state_bytes(model: nn.Module) -> bytes:
    return torch_bytes(model.state_dict())


def stored_files(api: Api) -> list[Path]:
    root = api.settings.uploads_dir
    return sorted(p for p in root.rglob("*") if p.is_file() and ".tmp" not in p.parts)


@pytest.fixture
def big_api(make_api, sqlite_url: str) -> Api:
    return make_api(sqlite_url, max_upload_bytes=BIG)


def test_a_state_dict_is_stored_as_safetensors(big_api: Api) -> None:
    c, model = big_api.client, build_model("resnet20", 10, 1)
    body = state_bytes(model)
    r = c.post("/v1/uploads?kind=weights&filename=ckpt.pth", content=body, headers=big_api.a)
    assert r.status_code == 201, r.text
    up = r.json()
    assert up["filename"] == "ckpt.safetensors" and up["source_sha256"] == hashlib.sha256(body).hexdigest()
    (path,) = stored_files(big_api)
    assert path.suffix == ".safetensors" and hashlib.sha256(path.read_bytes()).hexdigest() == up["sha256"]
    assert up["size"] == path.stat().st_size
    # the same tensors, and the engine's loader takes the file
    got = load_file(str(path))
    assert sorted(got) == sorted(model.state_dict())  # safetensors stores keys sorted
    assert all(torch.equal(got[k], v) for k, v in model.state_dict().items())
    build_model("resnet20", 10, 1, weights=path)
    # a training checkpoint wrapping its state dict is read too
    ckpt = torch_bytes({"epoch": 3, "optimizer": {"lr": 0.1}, "state_dict": model.state_dict()})
    assert c.post("/v1/uploads?kind=weights", content=ckpt, headers=big_api.a).status_code == 201


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-pickle"])
def test_a_pickle_that_runs_code_never_runs(big_api: Api, tmp_path: Path, legacy: bool) -> None:
    marker = tmp_path / "pwned"
    payload = {"conv.weight": torch.zeros(2), "x": CreatesAFile(marker)}
    if legacy:
        body = pickle.dumps(payload, protocol=2)
        # the payload is real: plain unpickling creates the file
        proof = tmp_path / "proof"
        pickle.loads(pickle.dumps(CreatesAFile(proof), protocol=2)).close()
        assert proof.exists()
    else:
        body = torch_bytes(payload)
    r = big_api.client.post("/v1/uploads?kind=weights&filename=evil.pth", content=body, headers=big_api.a)
    detail = assert_problem(r, 422)["detail"]
    assert not marker.exists(), "the pickle ran"
    assert "\n" not in detail and "refused" in detail, detail
    assert stored_files(big_api) == [] and not list((big_api.settings.uploads_dir / ".tmp").iterdir())
    assert big_api.client.get("/v1/uploads", headers=big_api.a).json()["items"] == []


@pytest.mark.parametrize(
    ("obj", "words"),
    [
        (nn.Linear(2, 2), "state_dict()"),  # a whole pickled module
        ([torch.zeros(2)], "a list"),
        (torch.zeros(3), "a torch.Tensor"),
        ({"epoch": 3, "lr": 0.1}, "'epoch' holds an int"),
        ({}, "empty"),
    ],
    ids=["module", "list", "tensor", "no-tensors", "empty"],
)
def test_anything_but_a_state_dict_is_one_line(big_api: Api, obj: object, words: str) -> None:
    r = big_api.client.post("/v1/uploads?kind=weights", content=torch_bytes(obj), headers=big_api.a)
    detail = assert_problem(r, 422)["detail"]
    assert words in detail and "\n" not in detail, detail
    assert stored_files(big_api) == []


def test_uploads_are_deduplicated_per_owner(big_api: Api) -> None:
    c, body = big_api.client, state_bytes(build_model("resnet20", 10, 1))
    digest = hashlib.sha256(body).hexdigest()
    first = c.post("/v1/uploads?kind=weights&filename=a.pth", content=body, headers=big_api.a)
    again = c.post("/v1/uploads?kind=weights&filename=b.pth", content=body, headers=big_api.a)
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json()["id"] == first.json()["id"]
    assert len(stored_files(big_api)) == 1
    # found by the hash of what was sent, before sending it
    found = c.get(f"/v1/uploads?sha256={digest.upper()}", headers=big_api.a).json()["items"]
    assert [u["id"] for u in found] == [first.json()["id"]]
    assert c.get(f"/v1/uploads?sha256={'0' * 64}", headers=big_api.a).json()["items"] == []
    assert_problem(c.get("/v1/uploads?sha256=xyz", headers=big_api.a), 422)
    # another owner learns nothing of it, and gets a copy of its own
    assert c.get(f"/v1/uploads?sha256={digest}", headers=big_api.b).json()["items"] == []
    bobs = c.post("/v1/uploads?kind=weights", content=body, headers=big_api.b)
    assert bobs.status_code == 201 and bobs.json()["id"] != first.json()["id"]
    assert len(stored_files(big_api)) == 2
    # the same bytes as a dataset are another upload (a kind is part of what is asked for)
    with db.session_scope(big_api.engine) as s:
        assert repo.find_upload(s, "alice", "dataset", digest) is None


def test_expected_keys_of_a_model(api: Api) -> None:
    r = api.client.get("/v1/models/resnet20?num_classes=7&in_channels=1", headers=api.a)
    assert r.status_code == 200, r.text
    body = r.json()
    keys = {k["key"]: k["shape"] for k in body["keys"]}
    want = build_model("resnet20", 7, 1).state_dict()
    assert list(keys) == list(want) and all(keys[k] == list(v.shape) for k, v in want.items())
    assert keys["conv1.weight"] == [16, 1, 3, 3] and (body["num_classes"], body["in_channels"]) == (7, 1)
    assert {k["dtype"] for k in body["keys"]} == {"float32", "int64"}
    tv = api.client.get("/v1/models/tv:resnet18?num_classes=5", headers=api.a).json()
    assert {k["key"]: k["shape"] for k in tv["keys"]}["fc.weight"] == [5, 512]
    body = assert_problem(api.client.get("/v1/models/resnet21", headers=api.a), 404)
    assert body["type"].endswith("model-not-found") and "resnet21" in body["detail"]
    assert_problem(api.client.get("/v1/models/tv:not_allowed_here", headers=api.a), 404)
    assert_problem(api.client.get("/v1/models/resnet20?num_classes=1", headers=api.a), 422)
    assert_problem(api.client.get("/v1/models/resnet20"), 401)


def test_mismatch_lists_every_key() -> None:
    want = {f"layer.{i}.weight": (4, 4) for i in range(60)}
    got = {k: v for k, v in want.items() if not k.startswith("layer.1")}  # 11 missing
    got |= {f"module.extra.{i}": (1,) for i in range(40)} | {"layer.0.weight": (4, 3)}
    line = mismatch(want, got)
    assert line is not None and "\n" not in line
    assert "11 missing keys" in line and "40 unexpected keys" in line and "1 wrong shapes" in line
    assert all(k in line for k in want if k.startswith("layer.1"))
    assert all(f"module.extra.{i}" in line for i in range(40))
    assert "layer.0.weight 4x3 (model: 4x4)" in line
    assert mismatch(want, dict(want)) is None


def _wrong_state() -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """resnet20's state dict for digits (10 classes, 1 channel) without layer3 (42 keys) and with 25
    keys of its own, one misshapen: (state, missing keys, extra keys)."""
    state = build_model("resnet20", 10, 1).state_dict()
    dropped = [k for k in state if k.startswith("layer3.")]
    extra = [f"head.extra{i}.weight" for i in range(25)]
    bad = {k: v for k, v in state.items() if k not in dropped} | {k: torch.zeros(1) for k in extra}
    bad["conv1.weight"] = torch.zeros(16, 3, 3, 3)
    return bad, dropped, extra


def test_weights_with_wrong_keys_are_refused_at_submit_naming_all(big_api: Api) -> None:
    bad, dropped, extra = _wrong_state()
    up = big_api.client.post("/v1/uploads?kind=weights", content=torch_bytes(bad), headers=big_api.a)
    assert up.status_code == 201, up.text
    ref = up.json()["ref"]
    spec = DIGITS | {"model": {"name": "resnet20", "weights": ref}, "kd": {"enabled": True, "teacher": ref}}
    body = assert_problem(big_api.client.post("/v1/jobs", json=spec, headers=big_api.a), 422)
    assert [e["field"] for e in body["errors"]] == ["model.weights", "kd.teacher"]
    message = body["errors"][0]["message"]
    assert "\n" not in message and "resnet20 (10 classes, 1 input channels)" in message
    assert all(k in message for k in [*dropped, *extra]), message
    assert "conv1.weight 16x3x3x3 (model: 16x1x3x3)" in message
    # the same file for the model it fits (3 channels, but layer3 still missing) names only that
    spec = DIGITS | {"model": {"name": "resnet20", "weights": ref, "in_channels": 3}}
    body = assert_problem(big_api.client.post("/v1/jobs", json=spec, headers=big_api.a), 422)
    assert "wrong shapes" not in body["errors"][0]["message"]
    # matching weights pass
    good = big_api.client.post(
        "/v1/uploads?kind=weights", content=state_bytes(build_model("resnet20", 10, 1)), headers=big_api.a
    ).json()["ref"]
    big_api.submit(DIGITS | {"model": {"name": "resnet20", "weights": good}})


def _pad_header(blob: bytes, pad: int) -> bytes:
    """The same safetensors file with its JSON header padded by ``pad`` spaces (the format allows it)."""
    (n,) = struct.unpack("<Q", blob[:8])
    header = blob[8 : 8 + n] + b" " * pad
    return struct.pack("<Q", len(header)) + header + blob[8 + n :]


def test_weights_with_wrong_keys_fail_the_job_naming_all(big_api: Api) -> None:
    """A header too large for the API to read (files.PARSED_SAFETENSORS_HEADER) is checked by the
    worker: the job fails, not retried, with one line naming every key."""
    from api import files
    from worker.execute import execute

    bad, dropped, extra = _wrong_state()
    blob = _pad_header(save({k: v.contiguous() for k, v in bad.items()}), files.PARSED_SAFETENSORS_HEADER)
    up = big_api.client.post("/v1/uploads?kind=weights", content=blob, headers=big_api.a)
    assert up.status_code == 201, up.text
    job = big_api.submit(DIGITS | {"model": {"name": "resnet20", "weights": up.json()["ref"]}})
    settings = big_api.settings.model_copy(update={"heartbeat_s": 0.2})
    assert execute(job["id"], worker_name="w", settings=settings) == "failed"
    with db.session_scope(big_api.engine) as s:
        row = repo.get_job(s, job["id"])
        assert (row.error_code, row.retryable) == ("bad_weights", False)
        message = row.error_message
    assert "\n" not in message and len(dropped) > 20
    assert all(k in message for k in [*dropped, *extra]), message


def test_the_api_process_never_loads_torch_for_weights(big_api: Api, monkeypatch) -> None:
    """The conversion runs in a child: in this process torch.load is never called."""
    calls: list[object] = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(a))
    body = state_bytes(build_model("resnet20", 10, 1))
    assert big_api.client.post("/v1/uploads?kind=weights", content=body, headers=big_api.a).status_code == 201
    assert calls == []


def test_load_weights_names_every_missing_key(tmp_path: Path) -> None:
    state = {k: v.contiguous() for k, v in build_model("resnet20", 10, 3).state_dict().items()}
    gone = [k for k in state if k.startswith("layer2.")]
    path = tmp_path / "w.safetensors"
    save_file({k: v for k, v in state.items() if k not in gone}, str(path))
    with pytest.raises(WeightsError) as info:
        build_model("resnet20", 10, 3, weights=path)
    assert "\n" not in str(info.value) and all(k in str(info.value) for k in gone)


def test_the_engine_reads_a_pth_only_as_weights(tmp_path: Path) -> None:
    """``prune run`` and ``pruning_core.prune`` take a .pth as well: the same weights-only reading."""
    src = build_model("resnet20", 10, 3)
    good = tmp_path / "dense.pth"
    torch.save(src.state_dict(), good)
    dst = build_model("resnet20", 10, 3, weights=good)
    assert all(
        torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values(), strict=True)
    )
    marker, evil = tmp_path / "pwned", tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "x": CreatesAFile(marker)}, evil)
    with pytest.raises(
        WeightsError, match=r"evil.pth: it pickles \S*open, .* refused without running it"
    ) as info:
        build_model("resnet20", 10, 3, weights=evil)
    assert not marker.exists() and "\n" not in str(info.value)
