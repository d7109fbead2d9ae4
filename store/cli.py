"""``python -m store``: database migrations and API keys, for operators (no server needed).

    python -m store migrate                        # upgrade to head
    python -m store downgrade REV                  # e.g. base, or 0001
    python -m store current                        # the revision the database is at
    python -m store keys create --owner alice [--name laptop]   # prints the key once, on stdout
    python -m store keys list --owner alice
    python -m store keys revoke KEY_ID --owner alice

The database is DATABASE_URL (or the SQLite file under STATE_DIR), or ``--database-url``. Errors are one
line on stderr; exit 2 for bad input (usage, unknown key, database not migrated), 1 when the database
itself fails.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


class BadInput(Exception):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m store", description="Job store: migrations and API keys.")
    p.add_argument("--database-url", help="SQLAlchemy URL (default: DATABASE_URL or SQLite under STATE_DIR)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)
    m = sub.add_parser("migrate", help="upgrade the schema (to head)")
    m.add_argument("--revision", default="head")
    d = sub.add_parser("downgrade", help="downgrade the schema to REV ('base' drops every table)")
    d.add_argument("revision", metavar="REV")
    sub.add_parser("current", help="print the schema revision")

    keys = sub.add_parser("keys", help="API keys").add_subparsers(
        dest="keys_command", metavar="{create,list,revoke}", required=True, parser_class=_Parser
    )
    c = keys.add_parser("create", help="create a key; its plaintext is printed once, on stdout")
    c.add_argument("--owner", required=True)
    c.add_argument("--name", default="")
    ls = keys.add_parser("list", help="list an owner's keys (never their plaintext)")
    ls.add_argument("--owner", required=True)
    ls.add_argument("--json", action="store_true", help="print the keys as JSON")
    r = keys.add_parser("revoke", help="revoke a key by id")
    r.add_argument("key_id", metavar="ID")
    r.add_argument("--owner", required=True)
    return p


def _owner(value: str) -> str:
    value = value.strip()
    if not value or len(value) > 128:
        raise BadInput("--owner must be 1 to 128 characters")
    return value


def keys(args: argparse.Namespace, url: str) -> int:
    """Create, list or revoke API keys (``args`` as parsed by the ``keys`` subcommands); BadInput on bad
    input. Shared by ``python -m store keys`` and ``prune keys``."""
    from sqlalchemy import inspect

    from . import repo
    from .db import make_engine, session_scope

    engine = make_engine(url)
    try:
        if not inspect(engine).has_table("api_keys"):
            raise BadInput(
                f"database {engine.url.render_as_string()} is not migrated: run `python -m store migrate` first"
            )
        owner = _owner(args.owner)
        with session_scope(engine) as s:
            if args.keys_command == "create":
                if len(args.name) > 128:
                    raise BadInput("--name must be at most 128 characters")
                key, plaintext = repo.create_api_key(s, owner, args.name)
                print(plaintext)
                print(
                    f"created key {key.id} (prefix {key.prefix}) for {owner}; "
                    "the key is shown only once: store it now",
                    file=sys.stderr,
                )
            elif args.keys_command == "list":
                listed = repo.list_api_keys(s, owner)
                if getattr(args, "json", False):  # the key itself is never listed, only its prefix
                    rows = [
                        {
                            "id": k.id,
                            "prefix": k.prefix,
                            "name": k.name,
                            "created_at": k.created_at.isoformat(),
                            "revoked_at": k.revoked_at.isoformat() if k.revoked_at else None,
                        }
                        for k in listed
                    ]
                    print(json.dumps(rows, indent=2))
                else:
                    for key in listed:
                        state = f"revoked {key.revoked_at.isoformat()}" if key.revoked_at else "active"
                        print(
                            f"{key.id}\t{key.prefix}...\t{key.name or '-'}\t{key.created_at.isoformat()}\t{state}"
                        )
            elif not repo.revoke_api_key(s, args.key_id, owner):
                raise BadInput(f"no active key {args.key_id!r} for owner {owner!r}")
            else:
                print(f"revoked {args.key_id}", file=sys.stderr)
    finally:
        engine.dispose()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pruning_core.settings import get_settings

    url = args.database_url or get_settings().sqlalchemy_url
    try:
        from . import db

        if args.command == "migrate":
            db.migrate(url, args.revision)
            print(f"database at revision {db.current_revision(url)}", file=sys.stderr)
        elif args.command == "downgrade":
            db.downgrade(url, args.revision)
            print(f"database at revision {db.current_revision(url)}", file=sys.stderr)
        elif args.command == "current":
            print(db.current_revision(url) or "none")
        else:
            return keys(args, url)
    except BadInput as err:
        print(f"python -m store: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # one line, not a traceback
        from alembic.util import CommandError

        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        print(f"python -m store: error: {first}", file=sys.stderr)
        return 2 if isinstance(err, CommandError) else 1
    return 0
