"""The service's client side: the SDK (``pruning_client.Client``, on httpx) and the ``prune`` CLI.

Torch-free: only ``prune run`` (the local engine run) loads torch, lazily."""

from .sdk import ApiError, Client, ClientError, IntegrityError, UnreachableError

__all__ = ["ApiError", "Client", "ClientError", "IntegrityError", "UnreachableError"]
