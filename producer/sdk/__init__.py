"""The Python SDK: ``Client`` validates jobs, writes their rows and sends their task
messages (client.py); ``Client.search`` finds similar jobs (search.py)."""

from producer.sdk.client import Client, IdempotencyConflict, Submitted, request_digest

__all__ = ["Client", "IdempotencyConflict", "Submitted", "request_digest"]
