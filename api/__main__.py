"""``python -m api``: migrate the database, then serve the API with uvicorn (HOST/PORT, default
127.0.0.1:8000). Without REDIS_URL (embedded mode) it also runs ``python -m worker.local`` beside it.
``AUTH_DISABLED`` is only honoured on a loopback address, and says so at start."""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import sys

from pruning_core.settings import get_settings


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def main() -> int:
    import uvicorn

    from store.db import migrate

    settings = get_settings()
    host = os.environ.get("HOST", "127.0.0.1")
    port = int(os.environ.get("PORT", "8000"))
    if settings.auth_disabled and not is_loopback(host):
        print(
            f"refusing to start: AUTH_DISABLED is only allowed on a loopback address, not {host!r}",
            file=sys.stderr,
        )
        return 2
    migrate(settings.sqlalchemy_url)
    runner = None
    if not settings.redis_url:
        runner = subprocess.Popen([sys.executable, "-m", "worker.local"])
        print(f"embedded mode: no REDIS_URL; local runner started (pid {runner.pid})", flush=True)
    if settings.auth_disabled:
        print(
            f"auth is DISABLED: requests without an API key act as owner 'local' (bound to {host})",
            flush=True,
        )
    # uvicorn re-raises the SIGTERM it caught once it has shut down; make that an exit that runs `finally`
    # (so the local runner is stopped too) rather than the default instant death.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        uvicorn.run("api.app:create_app", factory=True, host=host, port=port, log_level="info")
    finally:
        if runner is not None and runner.poll() is None:
            runner.terminate()
            try:
                runner.wait(timeout=70)  # the running job checkpoints and goes back to the queue first
            except subprocess.TimeoutExpired:
                runner.kill()
                runner.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
