"""The Celery workers: stage 1 (queue ``plan``) and stage 2 (queue ``render``) of queued jobs.

``tasks`` holds the two tasks and the worker's signal handlers (preload of the pipeline in a
render process, the maintenance thread, the hard time limit); ``runtime`` what a process does
with a job: claim it, keep its heartbeat, run the stage, end it with a state or an error code.
The records and their transitions belong to ``jobs``; this package never imports ``api``.
Started by ``lmd worker`` (docs/service.md "Processes").
"""
