# ruff: noqa: F811 (the fixtures imported from test_api are arguments of the tests by name)
"""Uploads an attacker shapes (issue #26, items 2 and 4): a ``.pt`` whose tensors expand, or whose
records deflate, to more than ``MAX_UPLOAD_BYTES`` or the owner's room under her quota is refused by
its metadata before the converter makes anything; an owner at her quota costs no conversion; the same
bytes sent again, or sent concurrently, are one upload."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import threading
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from api import files, torch_child
from store.objects import ObjectStore
from tests.test_api import Api, assert_problem, make_api  # noqa: F401 (fixtures)
from tests.test_fairness import safetensors_bytes, too_many

GiB = 1024**3


def torch_bytes(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def deflated(pt: bytes) -> bytes:
    """The same ``torch.save`` archive with every record deflate-compressed (torch.load reads it)."""
    src, out = zipfile.ZipFile(io.BytesIO(pt)), io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for info in src.infolist():
            z.writestr(info.filename, src.read(info.filename))
    return out.getvalue()


def stored_files(api: Api) -> list[Path]:
    root = api.settings.uploads_dir
    return sorted(p for p in root.rglob("*") if p.is_file() and files.TMP_DIR not in p.parts)


def convert_in_a_child(src: Path, dst: Path, cap: int) -> dict:
    """``python -m pruning_core.models.child convert`` as the API runs it; its JSON answer."""
    proc = subprocess.run(
        [sys.executable, "-m", "pruning_core.models.child", "convert", str(src), str(dst), str(cap)],
        capture_output=True,
        timeout=300,
        check=False,
    )
    return json.loads(proc.stdout.decode().strip().splitlines()[-1])


def test_an_expanded_tensor_is_refused_by_its_declared_size(make_api, sqlite_url: str) -> None:
    """``torch.zeros(1).expand(3 * 2**27)``: a 1.6 KB file that the converter used to write as a
    1,610,612,816-byte upload. Refused by its shape, with the default 1 GiB cap, before any copy: 413."""
    api = make_api(sqlite_url, max_upload_bytes=GiB)
    body = torch_bytes({"w": torch.zeros(1).expand(3 * 2**27)})
    assert len(body) < 4096
    r = api.client.post("/v1/uploads?kind=weights&filename=bomb.pt", content=body, headers=api.a)
    detail = assert_problem(r, 413)["detail"]
    m = re.fullmatch(
        rf"The weights would be (\d+) bytes as safetensors, over the limit of {GiB} bytes\.", detail
    )
    assert m and 3 * 2**29 < int(m.group(1)) < 3 * 2**29 + 256, detail  # the data and a small header
    assert stored_files(api) == [] and list((api.settings.uploads_dir / files.TMP_DIR).iterdir()) == []


def test_a_deflate_bomb_is_refused_unread(make_api, sqlite_url: str, tmp_path: Path) -> None:
    """A deflate-compressed ``.pt`` whose records unpack to 16 MiB (the attack: 1 MB to 1 GiB) against
    a 1 MiB cap: refused from the zip directory's sizes, never decompressed."""
    api = make_api(sqlite_url, max_upload_bytes=2**20)
    body = deflated(torch_bytes({"w": torch.zeros(2**22)}))
    assert len(body) < 2**16
    r = api.client.post("/v1/uploads?kind=weights&filename=bomb.pt", content=body, headers=api.a)
    assert "over the limit of 1048576 bytes" in assert_problem(r, 413)["detail"]
    assert stored_files(api) == []
    # the child's own answer names the records (not the tensors: it never loaded them)
    (tmp_path / "bomb.pt").write_bytes(body)
    out = convert_in_a_child(tmp_path / "bomb.pt", tmp_path / "out.safetensors", 2**20)
    assert out["code"] == "too_large" and out["error"].startswith("its records unpack to")
    assert not (tmp_path / "out.safetensors").exists()


def test_the_streamed_output_is_the_state_dict(tmp_path: Path) -> None:
    """What the converter writes one tensor at a time reads back with safetensors, every dtype, an
    expanded tensor materialised, a deflated archive read, tied tensors as two copies."""
    w = torch.randn(3, 4)
    state = {
        "w": w,
        "tied": w,
        "e": torch.ones(1).expand(5),
        "h": torch.arange(6, dtype=torch.float16).reshape(2, 3).t(),
        "b": torch.tensor([1.5], dtype=torch.bfloat16),
        "n": torch.tensor(7),
        "m": torch.tensor([True, False]),
        "z": torch.zeros(0, 3),
    }
    for name, body in (("plain.pt", torch_bytes(state)), ("deflated.pt", deflated(torch_bytes(state)))):
        (tmp_path / name).write_bytes(body)
        out = convert_in_a_child(tmp_path / name, tmp_path / f"{name}.safetensors", GiB)
        assert out == {"tensors": len(state)}, out
        got = load_file(str(tmp_path / f"{name}.safetensors"))
        assert set(got) == set(state)
        for k, v in state.items():
            assert got[k].dtype == v.dtype and torch.equal(got[k], v.contiguous()), k


def test_an_owner_at_her_quota_costs_no_conversion(make_api, sqlite_url: str, monkeypatch) -> None:
    """At her upload-bytes quota, a ``.pt`` is a 429 before any child runs; with a little room left, the
    child refuses what would not fit (by the tensors' sizes) with a 429, and nothing is stored. The
    bytes she already sent, sent again, are her earlier upload (200), not a 429."""
    first = safetensors_bytes(1024)
    api = make_api(sqlite_url, max_upload_bytes=2**20, quota_upload_bytes=len(first))
    c = api.client
    r = c.post("/v1/uploads?kind=weights", content=first, headers=api.a)
    assert r.status_code == 201, r.text
    runs: list[list[str]] = []
    real_run = torch_child.run
    monkeypatch.setattr(torch_child, "run", lambda args, *rest: runs.append(args) or real_run(args, *rest))
    pt = torch_bytes({"w": torch.zeros(1).expand(2**16)})
    too_many(c.post("/v1/uploads?kind=weights&filename=m.pt", content=pt, headers=api.a), "upload-quota")
    assert runs == []
    again = c.post("/v1/uploads?kind=weights", content=first, headers=api.a)
    assert again.status_code == 200 and again.json()["id"] == r.json()["id"]
    # room for 1 KiB more: the child is told so and refuses 256 KiB by its metadata
    api.settings.quota_upload_bytes = len(first) + 1024
    body = too_many(
        c.post("/v1/uploads?kind=weights&filename=m.pt", content=pt, headers=api.a), "upload-quota"
    )
    assert [a[0] for a in runs] == ["convert"] and runs[0][-1] == "1024"
    assert body["used"] == len(first)
    assert len(stored_files(api)) == 1


@pytest.mark.parametrize("backend", ["sqlite", "pg"])
def test_concurrent_uploads_of_the_same_bytes_store_one(make_api, request, backend: str, monkeypatch) -> None:
    """Three uploads of the same bytes at once, all past the look-up for an earlier one before any is
    recorded (a barrier holds them there): one row, one file, one id; the losers answer 200 with it."""
    api = make_api(request.getfixturevalue(f"{backend}_url"), max_upload_bytes=2**20)
    body, n = safetensors_bytes(4096), 3
    barrier = threading.Barrier(n, timeout=60)
    real_place = files.place

    def place_together(tmp: Path, store: ObjectStore, name: str, sha256: str):
        barrier.wait()
        return real_place(tmp, store, name, sha256)

    monkeypatch.setattr(files, "place", place_together)

    def send(_: int):
        return api.client.post("/v1/uploads?kind=weights", content=body, headers=api.a)

    with ThreadPoolExecutor(n) as pool:
        answers = list(pool.map(send, range(n)))
    assert sorted(r.status_code for r in answers) == [200, 200, 201], [r.text for r in answers]
    assert len({r.json()["id"] for r in answers}) == 1
    assert len(stored_files(api)) == 1
    listed = api.client.get("/v1/uploads", headers=api.a).json()["items"]
    assert [u["id"] for u in listed] == [answers[0].json()["id"]]
