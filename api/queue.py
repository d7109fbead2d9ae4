"""Enqueue a job by task NAME with a bare Celery client: the API never imports worker/ or torch.

The database row is the truth; the broker message is only a wake-up call. A failed send is logged and
reported as False: the job stays ``queued`` and the reaper re-enqueues it later. With no ``REDIS_URL``
(embedded mode) nothing is sent: the local runner polls the database (in a fair order, store.repo).

Fairness on the broker: a message's priority grows with the number of its owner's unfinished jobs
ahead of it (``fair_priority``). Redis serves priority 0 first (kombu's default steps 0, 3, 6, 9, read
in that order by every worker, no worker setting needed), so each owner's first job overtakes another
owner's long queue; within one priority the order stays first in, first out.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

from pruning_core.settings import Settings

if TYPE_CHECKING:
    from celery import Celery

log = logging.getLogger("api.queue")

TASK_NAME = "pruning.run_job"
QUEUE = "pruning"
CONNECT_TIMEOUT_S = 2.0

_clients: dict[tuple[str, int], Celery] = {}
_lock = threading.Lock()


def _visibility_timeout(settings: Settings) -> int:
    # Above the hard time limit, so Redis never redelivers a message whose job is still running.
    return int(settings.job_time_limit_s) + 3600


def _client(settings: Settings) -> Celery:
    assert settings.redis_url
    key = (settings.redis_url, _visibility_timeout(settings))
    with _lock:
        app = _clients.get(key)
        if app is None:
            from celery import Celery

            app = Celery("pruning-api", broker=settings.redis_url, set_as_current=False)
            app.conf.update(
                broker_connection_timeout=CONNECT_TIMEOUT_S,
                broker_connection_retry_on_startup=False,
                broker_transport_options={
                    "visibility_timeout": _visibility_timeout(settings),
                    "socket_connect_timeout": CONNECT_TIMEOUT_S,
                    "socket_timeout": 5,
                },
                task_default_queue=QUEUE,
                task_ignore_result=True,
            )
            _clients[key] = app
        return app


# kombu's Redis transport keeps one list per priority step: the queue's own name for 0, then
# "<queue>\x06\x16<step>" (its default separator) for the others. Whoever counts or clears a queue by
# hand must look at all of them.
PRIORITY_STEPS = (0, 3, 6, 9)


def redis_keys(queue: str = QUEUE) -> list[str]:
    """The Redis lists that hold ``queue``'s messages, served first to last."""
    return [queue if p == 0 else f"{queue}\x06\x16{p}" for p in PRIORITY_STEPS]


def fair_priority(ahead: int) -> int:
    """The broker priority (0 first) of a job with ``ahead`` unfinished jobs of its owner before it:
    its owner's 1st job 0, 2nd 3, 3rd and 4th 6, later ones 9 (kombu's Redis priority steps)."""
    return 0 if ahead <= 0 else 3 if ahead == 1 else 6 if ahead <= 3 else 9


def enqueue(job_id: str, settings: Settings, *, priority: int = 0) -> bool:
    """Send ``pruning.run_job(job_id)`` (task id = job id) to the ``pruning`` queue with ``priority``
    (0 is served first). True when sent."""
    if not settings.redis_url:
        return False
    retry: dict[str, Any] = {"max_retries": 1, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.2}
    try:
        _client(settings).send_task(
            TASK_NAME,
            args=[job_id],
            task_id=job_id,
            queue=QUEUE,
            priority=priority,
            retry=True,
            retry_policy=retry,
        )
    except Exception as err:  # the broker is down: the reaper re-enqueues the queued row later
        log.warning(
            "could not enqueue job %s (%s: %s); the reaper will retry", job_id, type(err).__name__, err
        )
        return False
    return True


def ping(settings: Settings) -> None:
    """Raise if the broker does not answer within a second or two."""
    if not settings.redis_url:
        return
    import redis

    client = redis.Redis.from_url(
        settings.redis_url, socket_connect_timeout=CONNECT_TIMEOUT_S, socket_timeout=CONNECT_TIMEOUT_S
    )
    try:
        client.ping()
    finally:
        client.close()


def close() -> None:
    with _lock:
        for app in _clients.values():
            app.close()
        _clients.clear()
