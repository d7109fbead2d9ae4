"""MkDocs hook: the reference pages generated at build time from the code, so they cannot drift.

A page names what it wants with a marker on a line of its own, replaced here before the Markdown is
rendered:

- ``<!-- generated: jobspec -->``: every section of ``pruning_core.spec.JobSpec`` (model, data, target,
  ...), one table each: field, type, default, bounds (and the server's cap), description.
- ``<!-- generated: method NAME -->``: the options model of method NAME, the same way.
- ``<!-- generated: settings -->``: ``pruning_core.settings.Settings``: environment variable, type,
  default, description, grouped as the class groups them.
- ``<!-- include: PATH -->``: a Markdown file of the repository (BENCHMARKS.md), as it is.

Nothing generated is committed; ``tests/test_docs.py`` builds the site and checks the pages name every field.
"""

from __future__ import annotations

import inspect
import json
import re
import sys
import types
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types as at
from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # this checkout's packages, not whichever one the venv installed
    sys.path.insert(0, str(ROOT))

from pruning_core import spec  # noqa: E402  (after the path)
from pruning_core.settings import Settings  # noqa: E402

MARKER = re.compile(r"^<!-- (generated|include): ([^>]*?) -->$", re.M)


# --- cells ---


def cell(text: str) -> str:
    """Text safe in a Markdown table cell: one line, pipes escaped, ``<``/``>`` outside code spans escaped."""
    text = inspect.cleandoc(text).replace("\n", " ")
    parts = re.split(r"(`+[^`]*`+)", text)
    out = []
    for i, part in enumerate(parts):
        if i % 2:  # a code span: the tables extension reads a pipe in it as text
            out.append(part)
        else:
            out.append(
                part.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")
            )
    return "".join(out)


def type_name(tp: Any) -> str:
    """A short, readable name of a field's annotation: ``int``, ``a or b``, ``list of float``."""
    origin = get_origin(tp)
    if origin is Annotated:
        return type_name(get_args(tp)[0])
    if origin is Literal:
        return " or ".join(f"`{json.dumps(a) if not isinstance(a, str) else a}`" for a in get_args(tp))
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        return " or ".join(type_name(a) for a in args)
    if origin is tuple:
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {type_name(args[0])}"
        return "list of " + ", ".join(type_name(a) for a in args)
    if isinstance(tp, type):
        if issubclass(tp, SecretStr):
            return "secret string"
        if issubclass(tp, Path):
            return "path"
        if issubclass(tp, BaseModel):
            return "object"
        if issubclass(tp, Enum):
            return " or ".join(f"`{m.value}`" for m in tp)
        return tp.__name__
    return str(tp).replace("typing.", "")


def default_of(field: FieldInfo, none: str = "none") -> str:
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if value is None:
        return none
    if isinstance(value, BaseModel):
        return "see below"
    if isinstance(value, Path | str):
        return f"`{value}`" if str(value) else '`""`'
    if isinstance(value, tuple | list) and len(value) > 8:
        return f"{len(value)} names: `{', '.join(map(str, value[:4]))}, ...`"
    return f"`{json.dumps(value.value if isinstance(value, Enum) else value)}`"


def bounds(field: FieldInfo) -> list[str]:
    """``≥ 1``, ``< 1`` ... from the field's constraints (its annotated_types metadata)."""
    signs = {at.Ge: ("ge", "≥"), at.Gt: ("gt", ">"), at.Le: ("le", "≤"), at.Lt: ("lt", "<")}
    out = []
    for m in field.metadata:
        for kind, (attr, sign) in signs.items():
            if isinstance(m, kind):
                out.append(f"{sign} {getattr(m, attr):,}")
        if isinstance(m, at.MinLen) and m.min_length > 1:
            out.append(f"at least {m.min_length} items")
        if isinstance(m, at.MaxLen):
            unit = "items" if type_name(field.annotation).startswith("list") else "characters"
            out.append(f"at most {m.max_length:,} {unit}")
    return out


# --- the job spec ---


def caps() -> dict[tuple[type, str], str]:
    """(options class, field) -> the Settings variable that caps it on a server (``spec.LIMITS``)."""
    return {(cls, name): setting.upper() for setting, rows in spec.LIMITS.items() for _, cls, name in rows}


def model_table(model: type[BaseModel], prefix: str) -> str:
    capped = caps()
    rows = ["| field | type | default | bounds | description |", "|---|---|---|---|---|"]
    for name, field in model.model_fields.items():
        limits = bounds(field)
        if (model, name) in capped:
            limits.append(f"server cap `{capped[model, name]}`")
        description = cell(field.description or "")
        rows.append(
            f"| `{prefix}{name}` | {cell(type_name(field.annotation))} | {cell(default_of(field))} "
            f"| {cell(', '.join(limits))} | {description} |"
        )
    return "\n".join(rows)


def doc_of(model: type) -> str:
    doc = model.__doc__ or ""
    return inspect.cleandoc(doc) if doc and doc != BaseModel.__doc__ else ""


def jobspec_page() -> str:
    out = [doc_of(spec.JobSpec), ""]
    top = {n: f for n, f in spec.JobSpec.model_fields.items() if not _submodels(f.annotation)}
    out += ["## Top level", "", _top_table(top), ""]
    for name, field in spec.JobSpec.model_fields.items():
        models = _submodels(field.annotation)
        if not models:
            continue
        out += [f"## `{name}`", ""]
        if name == "method":
            out += [
                "A union discriminated on `name`: one options model per method; each method's page section "
                "has its options (`method.name` picks one). Default: "
                f"`{spec.JobSpec.model_fields['method'].default.name}`.",
                "",
            ]
            for cls in models:
                method = cls.model_fields["name"].default
                out += [f"### `method.name: {method}`", "", doc_of(cls), "", model_table(cls, "method."), ""]
            continue
        if field.description:
            out += [cell(field.description), ""]
        out += [doc_of(models[0]), "", model_table(models[0], f"{name}."), ""]
    return "\n".join(out)


def _top_table(fields: dict[str, FieldInfo]) -> str:
    rows = ["| field | type | default | bounds | description |", "|---|---|---|---|---|"]
    for name, field in fields.items():
        rows.append(
            f"| `{name}` | {cell(type_name(field.annotation))} | {cell(default_of(field))} "
            f"| {cell(', '.join(bounds(field)))} | {cell(field.description or '')} |"
        )
    return "\n".join(rows)


def _submodels(tp: Any) -> list[type[BaseModel]]:
    if get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [tp]
    return [a for a in get_args(tp) if isinstance(a, type) and issubclass(a, BaseModel)]


def method_page(name: str) -> str:
    cls = spec.method_options()[name]
    return "\n".join([doc_of(cls), "", model_table(cls, "method."), ""])


# --- the settings ---


def settings_groups() -> dict[str, str]:
    """Field name -> the ``# --- group ---`` comment above it in the class source ('' before any)."""
    group, out = "", {}
    for line in inspect.getsource(Settings).splitlines():
        comment = re.match(r"\s*# --- (.+?)(?: ---|$)", line)
        if comment:
            group = comment.group(1).split(":")[0].split("(")[0].strip()
            continue
        field = re.match(r"    ([a-z_][a-z0-9_]*): ", line)
        if field and field.group(1) in Settings.model_fields:
            out[field.group(1)] = group
    return out


def settings_page() -> str:
    groups, current, out = settings_groups(), None, []
    for name, field in Settings.model_fields.items():
        group = groups.get(name, "")
        if group != current:
            current = group
            out += ["", f"## {group[:1].upper() + group[1:]}" if group else "## General", ""]
            out += ["| variable | type | default | description |", "|---|---|---|---|"]
        default = default_of(field, none="unset")
        value = field.default
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1024**2:
            for unit, size in (("GiB", 1024**3), ("MiB", 1024**2)):
                if value % size == 0:
                    default += f" ({value // size} {unit})"
                    break
        out.append(
            f"| `{name.upper()}` | {cell(type_name(field.annotation))} | {cell(default)} "
            f"| {cell(field.description or '')} |"
        )
    return "\n".join(out).strip() + "\n"


# --- the hook ---


def site_links(markdown: str) -> str:
    """A repository file's relative links as the site sees them: ``docs/x.md`` -> ``x.md``, and
    ``BENCHMARKS.md`` -> its page. Any other relative link stays, and fails the strict build."""
    markdown = re.sub(r"\]\(docs/", "](", markdown)
    return re.sub(r"\]\(BENCHMARKS\.md", "](benchmarks.md", markdown)


def render(kind: str, arg: str) -> str:
    if kind == "include":
        return site_links((ROOT / arg).read_text(encoding="utf-8"))
    if arg == "jobspec":
        return jobspec_page()
    if arg == "settings":
        return settings_page()
    if arg.startswith("method "):
        return method_page(arg.split()[1])
    raise ValueError(f"docs: unknown generated block {arg!r}")


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    return MARKER.sub(lambda m: render(m.group(1), m.group(2).strip()), markdown)
