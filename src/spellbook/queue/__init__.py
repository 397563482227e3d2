"""The job queue: durable job records in the store, run by an in-process worker or by Celery workers."""
