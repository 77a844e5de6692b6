"""The job store: what the API and the workers share, owned by neither (docs/service.md "Processes").

- ``jobs.records``: the typed records (a job, a session and its turns, an Idempotency-Key
  claim), the job states and the error codes a client branches on.
- ``jobs.transitions``: how a job moves (claim, progress while held, hand-over to the render
  stage, finish, cancel, reaping a lost job, the redelivery bound) as pure functions over records.
- ``jobs.store``: the records in Redis; each change is a short WATCH transaction around one
  transition.
- ``jobs.queue``: queue and task names, the Celery app and how a job's work is enqueued.
- ``jobs.files``: where a job's image, overlay, masks and report live on disk.

Imports: the stages' layout type and the settings object, never ``api``, ``worker`` or torch.
"""
