"""The HTTP API (FastAPI): requests become job records and Celery messages; records become answers.

``main.create_app`` wires the settings, the record store (``jobs.store``) and the Celery app
(``jobs.queue``); ``routes/`` holds one router per resource, ``schemas`` the request and
response models, ``submit`` the path of a new job (idempotency claim, records, message),
``deps`` the injected settings, store and caller's key. The API keeps no state of its own and
never imports ``worker`` or torch: the contract is in docs/service.md.
"""
