"""mmq producers: everything that puts jobs on the queue and reads their results.

- ``producer.sdk``: the Python SDK, ``Client`` (validate, write, send, read, wait,
  cancel) and its similarity search.
- ``producer.cli``: the ``mmq`` command line, one module per command group.
- ``producer.api``: the HTTP API, ``create_app()``: one APIRouter per resource.
- ``producer.ui``: the results page, ``/ui``, a router the API app includes.
- ``producer.web``: what the API and the page share: API keys, the error shape,
  size-capped request bodies and uploads, and the submit service.
- ``producer.ops``: running the stack on one machine: ``mmq up`` and its supervisor,
  the Flower launcher, ``mmq top``.

Imports run sdk <- web <- {api, ui}, api -> ui; cli and ops use the SDK; nothing here
imports the workers (tests/test_imports.py).
"""
