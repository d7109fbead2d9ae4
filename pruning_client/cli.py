"""``prune``: run jobs locally, or submit and follow them on the service.

    prune run spec.yaml [--out DIR]                  the local engine run (pruning_core.cli)
    prune submit spec.yaml [--wait | --watch] [--model M --target 0.5 ...]
    prune status [JOB_ID] | list                     one job, or a table of recent jobs (1: none match)
    prune watch JOB_ID                               live progress; exit 0 succeeded, 1 failed/cancelled
    prune artifacts JOB_ID                           a job's files: name, size, media type
    prune download JOB_ID [NAME ...] [--out DIR]     every artifact by default, sha256-verified
    prune cancel JOB_ID
    prune delete JOB_ID                              an ended job, its events and artifacts
    prune rerun JOB_ID [CHANGES.yaml] [--target 0.3 --set F=V ...] [--wait | --watch]
    prune deliveries JOB_ID                          the job's webhook calls and their attempts
    prune sweep spec.yaml [--methods a,b] [--targets 0.5,2x] [--rank-by top1|speedup|pareto] [--watch]
    prune sweeps [list] | sweeps show|watch|cancel SWEEP_ID
    prune uploads [list] | uploads delete ID        your uploads (newest first); delete one
    prune model NAME [--classes N] [--channels C]    the state-dict keys and shapes weights must hold
    prune keys create --owner NAME [--name N] | keys list --owner NAME | keys revoke ID --owner NAME

The service is ``--url`` (env PRUNE_URL, default http://127.0.0.1:8000) with ``--api-key`` (env
PRUNE_API_KEY). ``keys`` are admin commands for the server host: they use the database directly
(DATABASE_URL / STATE_DIR). Every error is one line on stderr (one per bad field for a spec), exit 2.
A closed pipe (``prune list | head -1``) ends the command quietly. Nothing here imports torch except
``prune run``; the SDK installed on its own (``pruning-client``, no engine) runs every command but
``run``, ``methods``, ``models`` and ``keys``, and leaves checking a spec to the service.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import render
from .models import Job, Resource
from .sdk import ApiError, Client, ClientError, format_error
from .spec_args import SpecInputError, add_spec_flags, build_spec, version_line

GLOBAL = ("--url", "--api-key")
# spec fields that name files: a local path there is uploaded and replaced by `upload:<id>`
FILE_FIELDS: dict[tuple[str, ...], str] = {
    ("model", "weights"): "weights",
    ("kd", "teacher"): "weights",
    ("data", "root"): "dataset",
}
STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")


class CliError(Exception):
    """A one-line error for the user."""


def _global_options() -> argparse.ArgumentParser:
    # SUPPRESS defaults so the options work before and after the subcommand
    g = argparse.ArgumentParser(add_help=False)
    g.add_argument("--url", default=argparse.SUPPRESS, help="service URL (env PRUNE_URL)")
    g.add_argument("--api-key", default=argparse.SUPPRESS, help="API key (env PRUNE_API_KEY)")
    return g


def _parser() -> argparse.ArgumentParser:
    g = _global_options()
    p = argparse.ArgumentParser(prog="prune", description="Structured pruning jobs.", parents=[g])
    p.add_argument("--version", action="version", version=version_line())
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("run", help="run a job locally (prune run --help)", add_help=False)

    s = sub.add_parser("submit", parents=[g], help="submit a job to the service")
    add_spec_flags(s)
    s.add_argument("--idempotency-key", help="reuse to make a repeated submit return the same job")
    follow = s.add_mutually_exclusive_group()
    follow.add_argument("--wait", action="store_true", help="wait until the job ends")
    follow.add_argument("--watch", action="store_true", help="follow the job with a progress bar")
    s.set_defaults(func=cmd_submit)

    sw = sub.add_parser("sweep", parents=[g], help="run several methods on one spec and rank them")
    add_spec_flags(sw)
    sw.add_argument("--methods", help="methods to compare, comma-separated (default: every method)")
    sw.add_argument("--targets", help="targets, comma-separated: MAC ratios (0.5) or speed-ups (2x)")
    sw.add_argument("--rank-by", choices=("top1", "speedup", "pareto"), default="top1")
    sfollow = sw.add_mutually_exclusive_group()
    sfollow.add_argument("--wait", action="store_true", help="wait until the sweep ends")
    sfollow.add_argument("--watch", action="store_true", help="a live table of its jobs until it ends")
    sw.set_defaults(func=cmd_sweep)

    sws = sub.add_parser("sweeps", parents=[g], help="your sweeps; show, watch or cancel one")
    sws.add_argument("action", nargs="?", choices=("list", "show", "watch", "cancel"), default="list")
    sws.add_argument("sweep_id", nargs="?")
    sws.add_argument("--json", action="store_true", help="print the JSON resource(s)")
    sws.set_defaults(func=cmd_sweeps)

    st = sub.add_parser(
        "status", aliases=["list"], parents=[g], help="show a job, or a table of recent jobs (alias: list)"
    )
    st.add_argument("job_id", nargs="?")
    st.add_argument("--status", dest="status_filter", choices=STATUSES, help="only jobs in this state")
    st.add_argument("--limit", type=int, default=20, help="rows in the table (default 20)")
    st.add_argument("--json", action="store_true", help="print the JSON resource(s)")
    st.set_defaults(func=cmd_status)

    w = sub.add_parser("watch", parents=[g], help="follow a job live")
    w.add_argument("job_id")
    w.set_defaults(func=cmd_watch)

    a = sub.add_parser("artifacts", parents=[g], help="list a job's artifacts (name, size, media type)")
    a.add_argument("job_id")
    a.add_argument("--json", action="store_true", help="print the JSON resources")
    a.set_defaults(func=cmd_artifacts)

    d = sub.add_parser("download", parents=[g], help="download a job's artifacts (sha256-verified)")
    d.add_argument("job_id")
    d.add_argument("names", nargs="*", help="artifact names (default: all)")
    d.add_argument("--out", type=Path, help="directory (default: ./<job id>)")
    d.set_defaults(func=cmd_download)

    c = sub.add_parser("cancel", parents=[g], help="cancel a queued or running job")
    c.add_argument("job_id")
    c.set_defaults(func=cmd_cancel)

    de = sub.add_parser("delete", parents=[g], help="delete an ended job with its events and artifacts")
    de.add_argument("job_id")
    de.set_defaults(func=cmd_delete)

    r = sub.add_parser(
        "rerun", parents=[g], help="submit a job's spec again as a new job, fields changed by the flags"
    )
    r.add_argument("job_id")
    add_spec_flags(r)  # here: a file of fields to change, and flags that change one each
    r.add_argument("--idempotency-key", help="reuse to make a repeated rerun return the same job")
    rfollow = r.add_mutually_exclusive_group()
    rfollow.add_argument("--wait", action="store_true", help="wait until the new job ends")
    rfollow.add_argument("--watch", action="store_true", help="follow the new job with a progress bar")
    r.set_defaults(func=cmd_rerun)

    dl = sub.add_parser("deliveries", parents=[g], help="a job's webhook deliveries and their attempts")
    dl.add_argument("job_id")
    dl.add_argument("--json", action="store_true", help="print the resources as JSON")
    dl.set_defaults(func=cmd_deliveries)

    u = sub.add_parser("uploads", parents=[g], help="list your uploads, or delete one")
    u.add_argument("action", nargs="?", choices=("list", "delete"), default="list")
    u.add_argument("upload_id", nargs="?", help="for delete: the id (or upload:<id>)")
    u.add_argument("--json", action="store_true", help="print the JSON resources")
    u.set_defaults(func=cmd_uploads)

    m = sub.add_parser(
        "model", parents=[g], help="the state-dict keys and shapes a model's weights must hold"
    )
    m.add_argument("name", help="a model name (prune lists them: GET /v1/models), e.g. resnet20, tv:resnet18")
    m.add_argument("--classes", type=int, default=10, help="output classes (default 10)")
    m.add_argument("--channels", type=int, default=3, help="input channels (default 3)")
    m.add_argument("--json", action="store_true", help="print the JSON resource")
    m.set_defaults(func=cmd_model)

    me = sub.add_parser("methods", help="the pruning methods and their options (this installation)")
    me.add_argument("name", nargs="?", help="one method: its options with defaults")
    me.add_argument("--json", action="store_true", help="print the JSON schema(s)")
    me.set_defaults(func=cmd_methods)

    mo = sub.add_parser("models", help="the model names a spec takes (this installation)")
    mo.add_argument("--json", action="store_true", help="print them as JSON")
    mo.set_defaults(func=cmd_models)

    k = sub.add_parser("keys", help="manage API keys (admin, on the server host)")
    ks = k.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    kc = ks.add_parser("create", help="create a key; prints it once")
    kc.add_argument("--owner", required=True)
    kc.add_argument("--name", default="")
    kl = ks.add_parser("list", help="list an owner's keys")
    kl.add_argument("--owner", required=True)
    kl.add_argument("--json", action="store_true", help="print the keys as JSON")
    kr = ks.add_parser("revoke", help="revoke a key")
    kr.add_argument("key_id")
    kr.add_argument("--owner", required=True)
    k.set_defaults(func=cmd_keys)
    return p


def _client(args: argparse.Namespace) -> Client:
    return Client(getattr(args, "url", None), getattr(args, "api_key", None))


# --- commands ---


def _check_locally(data: dict[str, Any]) -> None:
    """One line per bad field before any request, where the engine's spec is installed; the SDK on its
    own leaves that to the service (its 422 lists the same lines)."""
    try:
        from pruning_core.spec import SpecError, parse_spec
    except ImportError:
        return
    try:
        parse_spec(data, remote_models=True)
    except SpecError as err:
        raise SpecInputError(err.problems) from None


def _upload_files(
    client: Client, data: dict[str, Any], local: dict[tuple[str, ...], tuple[Path, str]]
) -> None:
    """Upload the spec's ``local`` files (once: an earlier upload of the same bytes is reused) and put
    their ``upload:<id>`` references in their place."""
    for path, (file, kind) in local.items():
        upload = client.upload(file, kind)
        ref = upload.ref or f"upload:{upload.id}"
        _set(data, path, ref)
        done = "already uploaded" if upload.reused else "uploaded"
        _note(f"{done} {file} as {ref} ({'.'.join(path)})")


def _follow(client: Client, job: Job, args: argparse.Namespace) -> int:
    """A submitted job's id on stdout, then (``--watch`` / ``--wait``) its final line; the exit code: 0
    unless a followed job did not succeed."""
    print(job.id, flush=True)
    if args.watch:
        job = render.watch(client, job.id)
    elif args.wait:
        job = client.wait(job.id)
    else:
        return 0
    print(render.final_line(job))
    return 0 if job.status == "succeeded" else 1


def cmd_submit(args: argparse.Namespace) -> int:
    data = build_spec(args)
    _check_locally(data)
    local = _local_files(data)
    with _client(args) as client:
        _upload_files(client, data, local)
        return _follow(client, client.submit(data, idempotency_key=args.idempotency_key), args)


def cmd_sweep(args: argparse.Namespace) -> int:
    data = build_spec(args)
    _check_locally(data)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    targets = [t.strip() for t in args.targets.split(",") if t.strip()] if args.targets else None
    with _client(args) as client:
        _upload_files(client, data, _local_files(data))
        try:
            sweep = client.sweep(data, methods, targets, args.rank_by)
        except ValueError as err:
            raise CliError(str(err)) from None
        print(sweep.id, flush=True)
        if args.watch:
            sweep = render.watch_sweep(client, sweep.id)
        elif args.wait:
            sweep = client.wait_sweep(sweep.id)
        else:
            return 0
    print(render.sweep_summary(sweep))
    return 0 if sweep.status == "succeeded" else 1


def cmd_sweeps(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.action == "list":
            sweeps = list(itertools.islice(client.sweeps(limit=20), 20))
            rows = [
                (s.id, s.status, f"{100 * s.progress:.0f}%", s.rank_by, len(s.jobs), s.winner) for s in sweeps
            ]
            table = render.table(rows, ("ID", "STATUS", "PROGRESS", "RANK BY", "JOBS", "WINNER"))
            return _listing(sweeps, args.json, lambda _: table, "no sweeps yet")
        if not args.sweep_id:
            raise CliError(f"sweeps {args.action} needs a sweep id")
        if args.action == "cancel":
            sweep = client.cancel_sweep(args.sweep_id)
        elif args.action == "watch":
            sweep = render.watch_sweep(client, args.sweep_id)
        else:
            sweep = client.get_sweep(args.sweep_id)
    print(_json(sweep) if args.json else render.sweep_summary(sweep))
    return 0 if sweep.status in ("succeeded", "running") else 1


def _local_files(data: dict[str, Any]) -> dict[tuple[str, ...], tuple[Path, str]]:
    """Spec fields that name local files (to upload); an `upload:<id>` reference is left alone."""
    found = {}
    for path, kind in FILE_FIELDS.items():
        value = _lookup(data, path)
        if (
            not isinstance(value, str)
            or value.startswith("upload:")
            or path == ("kd", "teacher")
            and value == "dense"
        ):
            continue
        file = Path(value).expanduser()
        if file.is_dir():
            raise CliError(
                f"{'.'.join(path)}: {value} is a directory; pack it as .tar.gz or .zip to submit it"
            )
        if not file.is_file():
            raise CliError(f"{'.'.join(path)}: no such file {value} (give a local file or upload:<id>)")
        found[path] = (file, kind)
    return found


def _lookup(data: dict[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def _set(data: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        data = data[key]
    data[path[-1]] = value


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.job_id:
            job = client.get(args.job_id)
            print(_json(job) if args.json else render.job_details(job))
            return 0
        jobs = list(itertools.islice(client.list(args.status_filter, limit=min(args.limit, 100)), args.limit))
    return _listing(
        jobs,
        args.json,
        render.jobs_table,
        f"no {args.status_filter} jobs" if args.status_filter else "no jobs yet",
    )


def cmd_watch(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = render.watch(client, args.job_id)
    print(render.final_line(job))
    return 0 if job.status == "succeeded" else 1


def cmd_artifacts(args: argparse.Namespace) -> int:
    with _client(args) as client:
        arts = client.artifacts(args.job_id)
        status = None if arts else client.get(args.job_id).status  # a 404 for an unknown job
    yet = " yet" if status in ("queued", "running") else ""
    return _listing(
        arts, args.json, render.artifacts_table, f"job {args.job_id} has no artifacts{yet} (status {status})"
    )


def _json(resource: Resource | list[Resource]) -> str:
    """A resource (or a list of them) as the JSON the server sent, indented."""
    if isinstance(resource, list):
        return json.dumps([r.model_dump(mode="json") for r in resource], indent=2)
    return json.dumps(resource.model_dump(mode="json"), indent=2)


def _listing(rows: list[Any], as_json: bool, table: Callable[[list[Any]], str], empty: str) -> int:
    """Print ``rows`` as JSON or as ``table``; with none, also the one line ``empty`` and exit 1 (like
    grep: nothing matched)."""
    if as_json:
        print(_json(rows))
    elif rows:
        print(table(rows))
    if rows:
        return 0
    _note(empty)
    return 1


def cmd_download(args: argparse.Namespace) -> int:
    out: Path = args.out or Path(args.job_id)
    with _client(args) as client:
        names = args.names
        if not names:
            names = [a.name for a in client.artifacts(args.job_id)]
            if not names:
                status = client.get(args.job_id).status
                raise CliError(f"job {args.job_id} has no artifacts (status {status})")
        out.mkdir(parents=True, exist_ok=True)
        for name in names:
            path = client.download(args.job_id, name, out)
            print(f"{path}  ({path.stat().st_size:,} bytes, sha256 verified)")
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = client.cancel(args.job_id)
    status = job.status
    print(
        f"{job.id}: "
        + (
            status
            if status in ("cancelled", "succeeded", "failed")
            else f"cancel requested (status {status})"
        )
    )
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    with _client(args) as client:
        client.delete(args.job_id)
    print(f"deleted {args.job_id}")
    return 0


def cmd_rerun(args: argparse.Namespace) -> int:
    """The job's spec again, with the fields the file and flags give (merged in by the service, which
    checks the result like a submit); local files they name are uploaded first."""
    overrides = build_spec(args)
    with _client(args) as client:
        _upload_files(client, overrides, _local_files(overrides))
        return _follow(
            client, client.rerun(args.job_id, overrides, idempotency_key=args.idempotency_key), args
        )


def cmd_deliveries(args: argparse.Namespace) -> int:
    with _client(args) as client:
        items = client.deliveries(args.job_id)
    if args.json:
        print(_json(items))
        return 0
    for d in items:
        print(f"{d.id}\t{d.event}\t{d.status}\t{d.attempts} attempt(s)\t{d.url}")
        for a in d.log:
            when = a.at.isoformat() if a.at else ""
            print(f"  {when}\t{a.status_code if a.status_code is not None else '-'}\t{a.error or ''}")
    if not items:
        _note("no webhook deliveries (the job has no notify, or has not ended)")
    return 0


def cmd_uploads(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.action == "delete":
            if not args.upload_id:
                raise CliError("uploads delete needs an upload id")
            client.delete_upload(args.upload_id)
            print(f"deleted {args.upload_id}")
            return 0
        ups = list(client.uploads())
    if args.json:
        print(_json(ups))
    for up in [] if args.json else ups:
        when = up.created_at.isoformat() if up.created_at else ""
        print(f"{up.ref}\t{up.kind}\t{up.size or 0:,} bytes\t{up.filename}\t{when}")
    if not ups and not args.json:
        _note("no uploads yet")
    return 0


def cmd_model(args: argparse.Namespace) -> int:
    with _client(args) as client:
        info = client.model_keys(args.name, args.classes, args.channels)
    if args.json:
        print(_json(info))
        return 0
    rows = [(k.key, "x".join(map(str, k.shape)) or "scalar", k.dtype) for k in info.keys]
    print(render.table(rows, ("key", "shape", "dtype")))
    _note(f"{len(rows)} keys for {info.name} with {info.num_classes} classes, {info.in_channels} channels")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    """The registered methods from this installation's spec (no service, no torch): a name and the
    first line of its description; with a name, its options, their defaults and descriptions."""
    _need_engine("methods", "GET /v1/methods on the service lists them")
    from pruning_core.spec import METHODS, method_options

    opts = method_options()
    if args.name is not None and args.name not in opts:
        raise CliError(f"unknown method {args.name!r}; known: {', '.join(METHODS)}")
    names = [args.name] if args.name else list(METHODS)
    if args.json:
        print(json.dumps({n: opts[n].model_json_schema() for n in names}, indent=2))
        return 0
    if args.name is None:
        rows = [(n, _first_sentence(opts[n].__doc__)) for n in names]
        print(render.table(rows, ("method", "what it does")))
        _note("prune methods NAME lists a method's options; set one with --set method.OPTION=VALUE")
        return 0
    fields = opts[args.name].model_fields
    rows = [
        (k, json.dumps(f.default) if f.default is not None else "null", _first_line(f.description))
        for k, f in fields.items()
        if k != "name"
    ]
    print(render.table(rows, ("option", "default", "meaning")))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    """Model names this installation's spec takes: the CIFAR zoo, plugins, and the allowed torchvision
    and timm builders (the operator's ALLOWED_* settings)."""
    _need_engine("models", "GET /v1/models on the service lists them")
    from pruning_core.settings import get_settings
    from pruning_core.spec import CIFAR_MODELS, TIMM_PREFIX, TORCHVISION_PREFIX, plugin_models

    settings = get_settings()
    rows = [(n, "cifar zoo") for n in CIFAR_MODELS]
    rows += [(n, f"plugin ({v})") for n, v in plugin_models().items()]
    rows += [(f"{TORCHVISION_PREFIX}{n}", "torchvision") for n in settings.allowed_torchvision_models]
    rows += [(f"{TIMM_PREFIX}{n}", "timm") for n in settings.allowed_timm_models]
    if args.json:
        print(json.dumps([{"name": n, "family": f} for n, f in rows], indent=2))
        return 0
    print(render.table(rows, ("model", "family")))
    return 0


def _first_line(text: str | None) -> str:
    """The first paragraph of a docstring or description, on one line."""
    return " ".join((text or "").strip().split("\n\n")[0].split())


def _first_sentence(text: str | None, width: int = 100) -> str:
    """The docstring's first sentence (to its first ``;`` or ``.``), cut at ``width`` characters."""
    first = _first_line(text).split(". ")[0].split("; ")[0].rstrip(".")
    return first if len(first) <= width else first[: width - 1].rsplit(" ", 1)[0] + "…"


def cmd_keys(args: argparse.Namespace) -> int:
    """Admin: the database directly (the service's Settings), not the HTTP API; ``python -m store keys``
    does the work."""
    _need_engine("keys", "run it on the server host")
    from sqlalchemy.exc import SQLAlchemyError

    from pruning_core.settings import get_settings
    from store import cli as store_cli

    url = get_settings().sqlalchemy_url
    try:
        return store_cli.keys(args, url)
    except store_cli.BadInput as err:
        raise CliError(str(err)) from None
    except SQLAlchemyError as err:
        first = str(getattr(err, "orig", None) or err).strip().splitlines()[0]
        raise CliError(f"database: {first}") from None


def _need_engine(command: str, instead: str) -> None:
    """CliError (one line) for a command that reads this installation's engine where only the SDK is
    installed."""
    try:
        import pruning_core  # noqa: F401  (its modules load lazily: no torch here)
    except ImportError:
        raise CliError(
            f"prune {command} needs the engine (the pruning-service install), not installed here; {instead}"
        ) from None


# --- entry point ---


def _note(text: str) -> None:
    print(f"prune: {text}", file=sys.stderr)


def _error(text: str) -> None:
    print(f"prune: error: {' '.join(str(text).split())}", file=sys.stderr)


def _local_run(argv: list[str]) -> list[str] | None:
    """argv from `run` on when the command is `run` (global options before it are skipped)."""
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in GLOBAL:
            i += 2
        elif arg.startswith(tuple(f"{g}=" for g in GLOBAL)):
            i += 1
        else:
            return argv[i:] if arg == "run" else None
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    local = _local_run(argv)
    if local is not None:
        try:
            from pruning_core.cli import main as run_main  # the engine; torch loads only here
        except ImportError:
            _error("prune run needs the engine (the pruning-service install), not installed here")
            return 2
        return run_main(local)
    args = _parser().parse_args(argv)
    try:
        code = args.func(args)
        sys.stdout.flush()  # a closed pipe shows up here, inside the handler below, not at exit
        return code
    except BrokenPipeError:
        return _closed_pipe()
    except SpecInputError as err:
        for line in err.problems:
            _error(f"invalid spec: {line}")
    except ApiError as err:
        if err.status == 422 and err.errors:
            for e in err.errors:
                _error(f"invalid spec: {format_error(e)}")
        else:
            hint = " (set PRUNE_API_KEY or pass --api-key)" if err.status == 401 else ""
            _error(f"{err}{hint}")
    except (ClientError, CliError, TimeoutError) as err:
        _error(str(err))
    except OSError as err:
        _error(f"{err.strerror or err}: {err.filename}" if err.filename else str(err))
    except KeyboardInterrupt:
        if getattr(args, "command", None) in ("watch", "submit", "sweep", "sweeps"):
            _note("stopped following; the job goes on (prune cancel JOB_ID stops it)")
        return 130
    return 2


def _closed_pipe() -> int:
    """The reader went away (``prune list | head -1``): not an error. Point stdout at /dev/null so the
    flush at exit cannot fail again, and exit as a process killed by SIGPIPE would (128 + 13)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 128 + signal.SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
