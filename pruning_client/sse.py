"""A small Server-Sent Events decoder (the WHATWG event-stream format), fed line by line."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class ServerSentEvent:
    event: str = "message"
    data: str = ""
    id: str | None = None  # the last event id seen so far (ids persist across events, as in browsers)
    retry: int | None = None  # reconnection delay suggested by the server, in milliseconds


def iter_sse(lines: Iterable[str]) -> Iterator[ServerSentEvent]:
    """Decode events from lines without their terminators; a blank line dispatches one event.

    Comments (``:`` lines, the server's keep-alive pings) are skipped, an event with no data is
    dropped, and a trailing event that never saw its blank line (a dropped connection) is discarded.
    """
    event, data, last_id, retry = "", [], None, None
    for line in lines:
        if not line:
            if data:
                yield ServerSentEvent(event or "message", "\n".join(data), last_id, retry)
            event, data = "", []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            event = value
        elif field == "data":
            data.append(value)
        elif field == "id" and "\0" not in value:
            last_id = value
        elif field == "retry" and value.isdigit():
            retry = int(value)
