"""Signed webhooks when a job ends: the URL check at submit (``urls``), Standard
Webhooks signing (``signing``), the event's body (``event``) and the delivery thread
every API and worker process runs (``deliver``). The outbox itself is SQL, in
core/store/webhooks.py."""
