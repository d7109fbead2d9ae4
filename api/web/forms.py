"""The submit form, built from the JobSpec JSON schema and the methods' option schemas.

A field's form name is its dotted path in the spec (``schedule.epochs``), except method options, which
are namespaced by method (``method.s2h.temperature``) since methods share option names. An empty field
is left out of the spec (its default applies), so a submitted spec holds only what the user set; the
values stay strings and pydantic coerces them, so its error locations name the fields. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from starlette.datastructures import FormData

from pruning_core import spec
from pruning_core.settings import Settings

SECTIONS = ("model", "data", "method", "target", "schedule", "kd", "export")
TOP_LEVEL = ("seed", "device")
# Fields the form leaves to the method fieldsets (name) or never shows.
SKIPPED = {"name"}


@dataclass(frozen=True)
class FormField:
    """One input: ``name`` the form name, ``path`` where its value goes in the spec."""

    name: str
    path: tuple[str, ...]
    kind: str  # text | number | bool | select | choices | list
    label: str
    help: str
    default: Any
    options: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    integer: bool = False
    required: bool = False


@dataclass(frozen=True)
class Section:
    name: str
    title: str
    fields: tuple[FormField, ...]


def _branch(prop: dict[str, Any]) -> dict[str, Any]:
    """The non-null branch of an optional property (``anyOf: [X, null]``), else the property."""
    for b in prop.get("anyOf", []):
        if b.get("type") != "null":
            return b
    return prop


def _field(name: str, path: tuple[str, ...], prop: dict[str, Any], required: bool) -> FormField | None:
    """The input for one JSON-schema property; None for shapes the form does not offer."""
    b = _branch(prop)
    kind, options = "text", ()
    typ = b.get("type")
    if "enum" in b:
        kind, options = "select", tuple(str(v) for v in b["enum"])
    elif typ == "boolean":
        kind = "bool"
    elif typ in ("integer", "number"):
        kind = "number"
    elif typ == "array":
        items = b.get("items") or {}
        kind, options = ("choices", tuple(items["enum"])) if "enum" in items else ("list", ())
    elif typ != "string":
        return None
    return FormField(
        name=name,
        path=path,
        kind=kind,
        label=path[-1].replace("_", " "),
        help=prop.get("description", ""),
        default=prop.get("default"),
        options=options,
        minimum=b.get("minimum", b.get("exclusiveMinimum")),
        maximum=b.get("maximum", b.get("exclusiveMaximum")),
        integer=typ == "integer",
        required=required,
    )


def _fields(schema: dict[str, Any], prefix: str, path: tuple[str, ...]) -> tuple[FormField, ...]:
    required = set(schema.get("required", ()))
    out = []
    for key, prop in schema.get("properties", {}).items():
        if key in SKIPPED and path and path[0] == "method":
            continue
        f = _field(f"{prefix}{key}", (*path, key), prop, key in required)
        if f is not None:
            out.append(f)
    return tuple(out)


def _limited(cls: type[BaseModel], settings: Settings) -> dict[str, Any]:
    """``cls``'s schema with this server's caps (and allowed model names) written in."""
    schema = cls.model_json_schema()
    spec.schema_limits({cls.__name__: schema}, settings)
    return schema


def spec_sections(settings: Settings) -> list[Section]:
    """The JobSpec's sections (method aside) and its top-level fields, in the schema's order."""
    classes = {f: spec.JobSpec.model_fields[f].annotation for f in SECTIONS if f != "method"}
    sections = [
        Section(name, name, _fields(_limited(cls, settings), f"{name}.", (name,)))  # type: ignore[arg-type]
        for name, cls in classes.items()
    ]
    top = _limited(spec.JobSpec, settings)
    job = {k: top["properties"][k] for k in TOP_LEVEL}
    sections.append(Section("job", "job", _fields({"properties": job}, "", ())))
    return sections


def method_sections(settings: Settings) -> list[Section]:
    """One fieldset per method, from its options schema (what ``GET /v1/methods`` lists)."""
    return [
        Section(name, name, _fields(_limited(cls, settings), f"method.{name}.", ("method",)))
        for name, cls in spec.method_options().items()
    ]


def _set(out: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        out = out.setdefault(key, {})
    out[path[-1]] = value


def _value(f: FormField, form: FormData) -> Any:
    """The field's value from the form, or None to leave it out (empty, or a checkbox at its default)."""
    if f.kind == "choices":
        picked = [v for v in form.getlist(f.name) if v in f.options]
        return picked if f.name + "._present" in form and picked != list(f.default or []) else None
    raw = form.getlist(f.name)
    text = str(raw[-1]).strip() if raw else ""
    if f.kind == "bool":
        checked = text == "true"
        return checked if raw and checked != bool(f.default) else None
    if not text:
        return None
    if f.kind == "list":
        return [v.strip() for v in text.split(",") if v.strip()]
    return text


def spec_from_form(form: FormData, sections: list[Section], methods: list[Section]) -> dict[str, Any]:
    """The spec the form asks for: the fields set (as strings; pydantic coerces them), the chosen
    method's options only."""
    out: dict[str, Any] = {}
    for f in (f for s in sections for f in s.fields):
        if (v := _value(f, form)) is not None:
            _set(out, f.path, v)
    chosen = str(form.get("method.name") or "magnitude")
    out["method"] = {"name": chosen}
    for section in methods:
        if section.name == chosen:
            for f in section.fields:
                if (v := _value(f, form)) is not None:
                    _set(out, f.path, v)
    return out


def form_field_name(field: str, method: str, known: set[str]) -> str:
    """The form name an API error's ``field`` (``method.p``, ``method.magnitude.p``, ``schedule.epochs``)
    belongs to; ``""`` when it names no input (the error is shown above the form)."""
    if field in known:
        return field
    parts = field.split(".")
    if parts[0] == "method" and len(parts) > 1 and parts[1] != method:
        parts.insert(1, method)
    name = ".".join(parts)
    while name and name not in known:
        name = name.rpartition(".")[0]  # an item of a list field: its list
    return name


def errors_by_field(errors: list[dict[str, str]], method: str, known: set[str]) -> dict[str, list[str]]:
    """The API's ``errors`` (one ``{"field", "message"}`` each) keyed by form name; ``""`` for the rest.
    A message that starts with a known field (``schedule.epochs: psap needs ...``, from a validator of
    the whole spec) goes to that field."""
    out: dict[str, list[str]] = {}
    for e in errors:
        field, message = e.get("field", ""), e.get("message", "")
        lead, sep, rest = message.partition(": ")
        if field == "(body)" and sep and form_field_name(lead, method, known):
            field, message = lead, rest
        out.setdefault(form_field_name(field, method, known), []).append(message)
    return out
