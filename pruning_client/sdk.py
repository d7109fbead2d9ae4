"""Python SDK for the pruning service, on httpx (no torch).

    from pruning_client import Client

    with Client("http://127.0.0.1:8000", api_key="pk_...") as c:
        spec = {"model": {"name": "resnet20"}, "data": {"name": "digits"}, "target": {"macs_ratio": 0.5},
                "schedule": {"dense_epochs": 3, "epochs": 3}}  # no weights: train, then prune
        job = c.submit(spec)
        for ev in c.events(job.id):
            print(ev.seq, ev.kind, ev.data)
        c.download(job.id, "model.safetensors", Path("out"))

Results are typed (``pruning_client.models``: ``Job``, ``Event``, ``Artifact``, ``Upload``, ``Sweep``).
Requests that are safe to repeat (every call but ``upload``; ``submit`` through its Idempotency-Key)
are retried with exponential backoff on connection errors and 429/502/503/504. Errors are
``ApiError`` (an RFC 9457 problem+json reply), ``UnreachableError`` and ``IntegrityError``, all
``ClientError``, each with a one-line ``str()``.
"""

from __future__ import annotations

import base64
import binascii
import builtins
import hashlib
import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote

import httpx

from .models import (
    TERMINAL,
    Artifact,
    Delivery,
    Event,
    Job,
    ModelKeys,
    Resource,
    Sweep,
    SweepEvent,
    Upload,
    parse_event,
)
from .sse import iter_sse

if TYPE_CHECKING:
    from pruning_core.spec import JobSpec

DEFAULT_URL = "http://127.0.0.1:8000"
RETRY_STATUSES = frozenset({429, 502, 503, 504})
CHUNK = 1 << 20
MAX_DELAY_S = 10.0
R = TypeVar("R", bound=Resource)
_sleep = time.sleep  # tests patch this


class ClientError(Exception):
    """Base of every error the SDK raises; ``str()`` is one line."""


class UnreachableError(ClientError):
    def __init__(self, url: str):
        self.url = url
        super().__init__(f"cannot reach {url}: is the service running?")


class IntegrityError(ClientError):
    """A downloaded file whose sha256 does not match what the server announced (it is discarded)."""


class ApiError(ClientError):
    """An error reply, parsed from ``application/problem+json`` when the server sent one."""

    def __init__(
        self,
        status: int,
        title: str,
        detail: str | None = None,
        errors: list[Any] | None = None,
        type: str | None = None,
    ):
        self.status, self.title, self.detail, self.type = status, title, detail, type
        self.errors = list(errors or [])
        super().__init__(status, title, detail, self.errors)

    @classmethod
    def from_response(cls, r: httpx.Response) -> ApiError:
        try:
            body = r.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            text = r.text.strip()
            return cls(r.status_code, r.reason_phrase or "error", text[:200] or None)
        detail = body.get("detail")
        if detail is not None and not isinstance(detail, str):  # e.g. a FastAPI-style list
            detail = json.dumps(detail)
        return cls(
            int(body.get("status") or r.status_code),
            str(body.get("title") or r.reason_phrase or "error"),
            detail,
            body.get("errors") if isinstance(body.get("errors"), list) else None,
            body.get("type"),
        )

    def error_lines(self) -> list[str]:
        """One line per entry of ``errors`` (``field: message``)."""
        return [format_error(e) for e in self.errors]

    def __str__(self) -> str:
        text = f"{self.status} {self.title}"
        if self.detail:
            text += f": {self.detail}"
        if self.errors:
            text += f" ({'; '.join(self.error_lines())})"
        return " ".join(text.split())


def format_error(e: Any) -> str:
    """``field: message`` from a problem's ``errors`` entry, whatever its exact shape."""
    if not isinstance(e, dict):
        return str(e)
    loc = e.get("loc") or e.get("field") or e.get("pointer") or ""
    if isinstance(loc, list | tuple):
        loc = ".".join(str(p) for p in loc if p != "body")
    msg = e.get("msg") or e.get("message") or e.get("detail") or json.dumps(e)
    return f"{loc}: {msg}" if loc else str(msg)


def _default_url() -> str:
    return os.environ.get("PRUNE_URL") or DEFAULT_URL


class Client:
    """A session with the service; use it as a context manager (or call ``close``)."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 30,
        transport: httpx.BaseTransport | None = None,
        retries: int = 3,
        backoff: float = 0.5,
    ):
        url = (base_url or _default_url()).rstrip("/")
        self.base_url = url.removesuffix("/v1")
        self.api_key = api_key if api_key is not None else os.environ.get("PRUNE_API_KEY") or None
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        headers = {"User-Agent": "prune-client", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        self._http = httpx.Client(
            base_url=self.base_url, headers=headers, timeout=timeout, transport=transport
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # --- jobs ---

    def submit(self, spec: JobSpec | dict[str, Any], *, idempotency_key: str | None = None) -> Job:
        """Create a job; returns the job resource. One key per call, reused by its retries."""
        body = spec.model_dump(mode="json") if hasattr(spec, "model_dump") else spec
        key = idempotency_key or uuid.uuid4().hex
        return Job.model_validate(
            self._send("POST", "/v1/jobs", json=body, headers={"Idempotency-Key": key}).json()
        )

    def get(self, job_id: str) -> Job:
        return Job.model_validate(self._send("GET", f"/v1/jobs/{_seg(job_id)}").json())

    def list(self, status: str | None = None, limit: int = 50) -> Iterator[Job]:
        """Every job of the caller, newest first, fetched ``limit`` per page (following next_cursor)."""
        params: dict[str, Any] = {"limit": limit}
        if status:
            params["status"] = status
        while True:
            page = self._send("GET", "/v1/jobs", params=params).json()
            yield from _typed(Job, _items(page, "jobs"))
            cursor = page.get("next_cursor") if isinstance(page, dict) else None
            if not cursor:
                return
            params["cursor"] = cursor

    def cancel(self, job_id: str) -> Job:
        return Job.model_validate(self._send("POST", f"/v1/jobs/{_seg(job_id)}/cancel").json())

    def delete(self, job_id: str) -> None:
        """Delete an ended job with its events and artifacts (ApiError 409 while it is queued or
        running: cancel it first)."""
        self._send("DELETE", f"/v1/jobs/{_seg(job_id)}").close()

    def rerun(
        self, job_id: str, overrides: dict[str, Any] | None = None, *, idempotency_key: str | None = None
    ) -> Job:
        """Submit the job's spec again as a new job (its ``rerun_of`` names ``job_id``), with
        ``overrides`` merged in (objects key by key: ``{"target": {"macs_ratio": 0.3}}``)."""
        key = idempotency_key or uuid.uuid4().hex
        r = self._send(
            "POST", f"/v1/jobs/{_seg(job_id)}/rerun", json=overrides or {}, headers={"Idempotency-Key": key}
        )
        return Job.model_validate(r.json())

    def deliveries(self, job_id: str) -> builtins.list[Delivery]:
        """The job's webhook deliveries, each with its attempts (status code or error, time)."""
        page = self._send("GET", f"/v1/jobs/{_seg(job_id)}/deliveries").json()
        return list(_typed(Delivery, _items(page, "deliveries")))

    def wait(self, job_id: str, timeout: float | None = None, poll: float = 1.0) -> Job:
        """Poll until the job is succeeded, failed or cancelled and return it; TimeoutError after
        ``timeout`` s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.get(job_id)
            if job.ended:
                return job
            if deadline is not None and time.monotonic() + poll > deadline:
                raise TimeoutError(f"job {job_id} is still {job.status} after {timeout:g} s")
            _sleep(poll)

    def events(self, job_id: str, after: int = 0) -> Iterator[Event]:
        """The job's events after sequence number ``after``, live (SSE) until the server ends the
        stream, each with its data typed by kind (``status``, ``phase``, ``progress``, ``epoch``,
        ``pruned``, ``message``; ``pruning_client.models``). ``seq`` (= ``id``) numbers them within the
        job; a dropped connection is resumed with Last-Event-ID."""
        last: str | None = str(after) if after else None
        failures, delay = 0, None
        while True:
            headers = {"Accept": "text/event-stream"}
            if last is not None:
                headers["Last-Event-ID"] = last
            params = {"after": last} if last is not None and last.isdigit() else {}
            r = self._send(
                "GET",
                f"/v1/jobs/{_seg(job_id)}/events",
                params=params,
                headers=headers,
                stream=True,
                timeout=httpx.Timeout(self.timeout, read=max(60.0, self.timeout)),
            )
            try:
                for sse in iter_sse(r.iter_lines()):
                    last, failures = sse.id if sse.id is not None else last, 0
                    delay = sse.retry / 1000 if sse.retry is not None else delay
                    yield parse_event(_event(sse.event, sse.data, sse.id))
                return
            except httpx.TransportError as err:
                failures += 1
                if failures > self.retries:
                    raise ClientError(f"event stream of job {job_id} keeps dropping: {_why(err)}") from err
            finally:
                r.close()
            _sleep(min(MAX_DELAY_S, delay if delay is not None else self._delay(failures - 1)))

    # --- sweeps ---

    def sweep(
        self,
        spec: JobSpec | dict[str, Any],
        methods: builtins.list[str | dict[str, Any]] | None = None,
        targets: builtins.list[float | str | dict[str, float]] | None = None,
        rank_by: str = "top1",
    ) -> Sweep:
        """Start a sweep: one job per method and target (default: every method, the spec's target),
        ranked by ``rank_by`` (``top1``, ``speedup`` or ``pareto``) when the last ends. A target is a
        remaining-MAC ratio (``0.5``), a speed-up (``"2x"``) or a dict. Returns the sweep resource. Not
        retried once sent (a sweep has no Idempotency-Key): a lost reply could otherwise run it twice."""
        body: dict[str, Any] = {
            "spec": spec.model_dump(mode="json") if hasattr(spec, "model_dump") else spec,
            "rank_by": rank_by,
        }
        if methods:
            body["methods"] = methods
        if targets:
            body["targets"] = [parse_target(t) for t in targets]
        return Sweep.model_validate(self._send("POST", "/v1/sweeps", json=body, retry=False).json())

    def sweeps(self, limit: int = 50) -> Iterator[Sweep]:
        """Every sweep of the caller, newest first, ``limit`` per page."""
        params: dict[str, Any] = {"limit": limit}
        while True:
            page = self._send("GET", "/v1/sweeps", params=params).json()
            yield from _typed(Sweep, _items(page, "sweeps"))
            if not (cursor := page.get("next_cursor") if isinstance(page, dict) else None):
                return
            params["cursor"] = cursor

    def get_sweep(self, sweep_id: str) -> Sweep:
        return Sweep.model_validate(self._send("GET", f"/v1/sweeps/{_seg(sweep_id)}").json())

    def cancel_sweep(self, sweep_id: str) -> Sweep:
        """Cancel every job of the sweep."""
        return Sweep.model_validate(self._send("POST", f"/v1/sweeps/{_seg(sweep_id)}/cancel").json())

    def wait_sweep(self, sweep_id: str, timeout: float | None = None, poll: float = 2.0) -> Sweep:
        """Poll until the sweep has ended (its leaderboard is then in the resource)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            sweep = self.get_sweep(sweep_id)
            if sweep.status in TERMINAL:
                return sweep
            if deadline is not None and time.monotonic() + poll > deadline:
                raise TimeoutError(f"sweep {sweep_id} is still {sweep.status} after {timeout:g} s")
            _sleep(poll)

    def sweep_events(self, sweep_id: str) -> Iterator[SweepEvent]:
        """Snapshots of the sweep's progress, live (SSE) until it ends: ``kind`` ``progress``, then
        ``status``; ``data``: its status, progress, counts, jobs and winner. Each is whole, so a dropped
        connection is simply opened again."""
        failures = 0
        while True:
            r = self._send(
                "GET",
                f"/v1/sweeps/{_seg(sweep_id)}/events",
                headers={"Accept": "text/event-stream"},
                stream=True,
                timeout=httpx.Timeout(self.timeout, read=max(60.0, self.timeout)),
            )
            try:
                for sse in iter_sse(r.iter_lines()):
                    failures = 0
                    yield SweepEvent.model_validate(_event(sse.event, sse.data, sse.id))
                return
            except httpx.TransportError as err:
                failures += 1
                if failures > self.retries:
                    raise ClientError(
                        f"event stream of sweep {sweep_id} keeps dropping: {_why(err)}"
                    ) from err
            finally:
                r.close()
            _sleep(self._delay(failures - 1))

    def sweep_artifacts(self, sweep_id: str) -> builtins.list[Artifact]:
        """``leaderboard.json``, ``sweep.html`` and the winner's artifacts (each with its ``url``)."""
        page = self._send("GET", f"/v1/sweeps/{_seg(sweep_id)}/artifacts").json()
        return builtins.list(_typed(Artifact, _items(page, "x")))

    # --- files ---

    def artifacts(self, job_id: str) -> builtins.list[Artifact]:
        """A job's files: name, size, sha256, media type."""
        page = self._send("GET", f"/v1/jobs/{_seg(job_id)}/artifacts").json()
        return builtins.list(_typed(Artifact, _items(page, "artifacts")))

    def download(self, job_id: str, name: str, dest: Path) -> Path:
        """Fetch artifact ``name`` to ``dest`` (a file path, or an existing directory to put it in).

        Streams into ``<dest>.part``, checks its sha256 against the ETag / Repr-Digest / Digest
        headers and renames it into place. A ``.part`` left by an interrupted download is resumed with a
        Range request; a dropped connection is resumed the same way."""
        dest = Path(dest)
        if dest.is_dir():
            dest = dest.joinpath(*safe_parts(name))
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(dest.name + ".part")
        failures, fresh_retry = 0, True
        while True:
            resuming = part.exists() and part.stat().st_size > 0
            try:
                return self._download_once(job_id, name, dest, part)
            except httpx.TransportError as err:  # keep the .part: the next try resumes it
                failures += 1
                if failures > self.retries:
                    raise ClientError(f"download of {name} keeps failing: {_why(err)}") from err
                _sleep(self._delay(failures - 1))
            except IntegrityError:
                part.unlink(missing_ok=True)
                if not (resuming and fresh_retry):  # a stale .part may be to blame: one fresh try
                    raise
                fresh_retry = False

    def _download_once(self, job_id: str, name: str, dest: Path, part: Path) -> Path:
        offset = part.stat().st_size if part.exists() else 0
        headers = {"Accept": "*/*", "Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        path = f"/v1/jobs/{_seg(job_id)}/artifacts/{quote(name, safe='/')}"
        try:
            r = self._send("GET", path, headers=headers, stream=True)
        except ApiError as err:
            if err.status == 416 and offset:  # the .part is not a prefix of this file any more
                part.unlink()
                return self._download_once(job_id, name, dest, part)
            raise
        try:
            if r.status_code != 206 or not r.headers.get("content-range", "").startswith(f"bytes {offset}-"):
                offset = 0  # the server sent the whole file
            expected = expected_sha256(r.headers) or self._listed_sha256(job_id, name)
            digest = hashlib.sha256()
            if offset:
                with part.open("rb") as f:
                    for chunk in iter(lambda: f.read(CHUNK), b""):
                        digest.update(chunk)
            with part.open("ab" if offset else "wb") as f:
                for chunk in r.iter_bytes():  # as received: a drop keeps what came
                    f.write(chunk)
                    digest.update(chunk)
                f.flush()
                os.fsync(f.fileno())
        finally:
            r.close()
        if digest.hexdigest() != expected:
            raise IntegrityError(
                f"{name}: sha256 {digest.hexdigest()[:16]}… does not match the server's "
                f"{expected[:16]}…; download discarded"
            )
        os.replace(part, dest)
        return dest

    def _listed_sha256(self, job_id: str, name: str) -> str:
        for art in self.artifacts(job_id):
            if art.name == name and art.sha256:
                return art.sha256.lower()
        raise IntegrityError(f"{name}: the server announced no sha256 to verify the download against")

    def upload(
        self, path: str | Path, kind: str, filename: str | None = None, *, reuse: bool = True
    ) -> Upload:
        """Stream a local file (``kind``: ``weights`` — safetensors or a PyTorch ``.pt``/``.pth`` state
        dict, which the server converts — or ``dataset``); returns the upload resource, whose id goes
        into a JobSpec as ``upload:<id>``. With ``reuse`` the file's sha256 is computed here first and
        the caller's earlier upload of the same bytes is returned without sending them again (with
        ``reused`` true). Not retried (each try is a new upload)."""
        path = Path(path)
        size = path.stat().st_size
        if reuse and (earlier := self.find_upload(file_sha256(path), kind)) is not None:
            return earlier.model_copy(update={"reused": True})

        def body() -> Iterator[bytes]:
            with path.open("rb") as f:
                yield from iter(lambda: f.read(CHUNK), b"")

        r = self._send(
            "POST",
            "/v1/uploads",
            params={"kind": kind, "filename": filename or path.name},
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
            content=body(),
            retry=False,
        )
        return Upload.model_validate(r.json())

    def find_upload(self, sha256: str, kind: str | None = None) -> Upload | None:
        """The caller's upload whose bytes as sent had this sha256 (hex), of ``kind`` if given, or
        None. Only the caller's own uploads are ever found."""
        sha256 = sha256.lower()
        page = self._send("GET", "/v1/uploads", params={"sha256": sha256, "limit": 200}).json()
        for up in _typed(Upload, _items(page, "uploads")):
            # checked here too: a server without the filter answers with the newest uploads
            same = sha256 in (up.source_sha256, up.sha256)
            if same and kind in (None, up.kind):
                return up
        return None

    def model_keys(self, name: str, num_classes: int = 10, in_channels: int = 3) -> ModelKeys:
        """The state dict that weights for model ``name`` must hold, for ``num_classes`` classes and
        ``in_channels`` input channels: its keys with their shape and dtype, in the model's order
        (ApiError 404 for a model the server lacks)."""
        params = {"num_classes": num_classes, "in_channels": in_channels}
        return ModelKeys.model_validate(self._send("GET", f"/v1/models/{_seg(name)}", params=params).json())

    def uploads(self, limit: int = 50) -> Iterator[Upload]:
        """Every upload of the caller, newest first, fetched ``limit`` per page."""
        params: dict[str, Any] = {"limit": limit}
        while True:
            page = self._send("GET", "/v1/uploads", params=params).json()
            yield from _typed(Upload, _items(page, "uploads"))
            cursor = page.get("next_cursor") if isinstance(page, dict) else None
            if not cursor:
                return
            params["cursor"] = cursor

    def delete_upload(self, upload_id: str) -> None:
        """Delete one of the caller's uploads (ApiError 409 while a queued or running job uses it)."""
        self._send("DELETE", f"/v1/uploads/{_seg(upload_id.removeprefix('upload:'))}").close()

    # --- plumbing ---

    def _delay(self, attempt: int) -> float:
        return min(MAX_DELAY_S, self.backoff * 2**attempt)

    def _send(
        self, method: str, path: str, *, stream: bool = False, retry: bool = True, **kw: Any
    ) -> httpx.Response:
        """One request with retries; raises ApiError for an error reply (after reading its body)."""
        attempts = self.retries + 1 if retry else 1
        for attempt in range(attempts):
            last = attempt == attempts - 1
            try:
                r = self._http.send(self._http.build_request(method, path, **kw), stream=stream)
            except (httpx.ConnectError, httpx.ConnectTimeout) as err:
                if last:
                    raise UnreachableError(self.base_url) from err
            except httpx.TransportError as err:
                if last:
                    raise ClientError(f"{method} {self.base_url}{path}: {_why(err)}") from err
            else:
                if r.status_code in RETRY_STATUSES and not last:
                    r.close()
                    _sleep(_retry_after(r) or self._delay(attempt))
                    continue
                if r.is_error:
                    r.read()
                    r.close()
                    raise ApiError.from_response(r)
                return r
            _sleep(self._delay(attempt))
        raise AssertionError("unreachable")


def file_sha256(path: Path) -> str:
    """The hex sha256 of a local file, read in CHUNK-byte blocks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def parse_target(value: float | str | dict[str, float]) -> dict[str, float]:
    """A sweep target: ``0.5`` or ``"0.5"`` -> ``{"macs_ratio": 0.5}``, ``"2x"`` -> ``{"speedup": 2.0}``;
    a dict as given. ValueError for anything else."""
    if isinstance(value, dict):
        return value
    text = str(value).strip().lower()
    try:
        return {"speedup": float(text[:-1])} if text.endswith("x") else {"macs_ratio": float(text)}
    except ValueError:
        raise ValueError(f"target {value!r}: give a MAC ratio (0.5) or a speed-up (2x)") from None


def _seg(value: str) -> str:
    return quote(str(value), safe="")


def _why(err: Exception) -> str:
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__


def _typed(model: type[R], items: builtins.list[dict]) -> Iterator[R]:
    return (model.model_validate(item) for item in items)


def _items(page: Any, key: str) -> builtins.list[dict]:
    if isinstance(page, list):
        return page
    for k in ("items", key, "data"):
        if isinstance(page.get(k), list):
            return page[k]
    return []


def _retry_after(r: httpx.Response) -> float | None:
    value = r.headers.get("retry-after", "")
    return min(MAX_DELAY_S, float(value)) if value.isdigit() else None


def _event(kind: str, data: str, event_id: str | None) -> dict:
    """An SSE event as a dict like the JSON page's: the server may send the whole event resource as
    data, or only its ``data`` with the kind as the SSE event name."""
    try:
        payload = json.loads(data)
    except ValueError:
        payload = data
    if isinstance(payload, dict) and "kind" in payload and "data" in payload:
        out = dict(payload)
    else:
        out = {"kind": kind, "data": payload}
    seq = int(event_id) if event_id and event_id.isdigit() else event_id
    out.setdefault("id", seq)  # as in the JSON page (EventOut.id)
    out.setdefault("seq", out["id"])
    return out


def expected_sha256(headers: httpx.Headers) -> str | None:
    """The hex sha256 announced by Repr-Digest (``sha-256=:b64:``), Digest (``sha-256=b64``) or a
    64-hex ETag; None if none of them says; IntegrityError if they disagree."""
    found: set[str] = set()
    for header in ("repr-digest", "digest"):
        for item in headers.get(header, "").split(","):
            algo, _, value = item.strip().partition("=")
            if algo.strip().lower() != "sha-256":
                continue
            try:
                found.add(base64.b64decode(value.strip().strip(":"), validate=True).hex())
            except (binascii.Error, ValueError):
                continue
    etag = headers.get("etag", "").removeprefix("W/").strip('"').lower()
    if len(etag) == 64 and all(c in "0123456789abcdef" for c in etag):
        found.add(etag)
    if len(found) > 1:
        raise IntegrityError(f"the server's digest headers disagree: {sorted(found)}")
    return found.pop() if found else None


def safe_parts(name: str) -> tuple[str, ...]:
    """An artifact name as relative path parts; refuses absolute names and ``..`` (a hostile server)."""
    p = PurePosixPath(name)
    if p.is_absolute() or not p.parts or any(part in ("..", ".", "") for part in p.parts) or "\\" in name:
        raise ClientError(f"refusing artifact name {name!r}: not a plain relative path")
    return p.parts
