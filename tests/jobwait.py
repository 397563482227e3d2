"""Waiting for a job through the API, as a client would (shared by the server tests)."""

from __future__ import annotations

import time


def wait_done(client, job_id, headers=None, timeout=120):
    """The job once it is done, failed or cancelled; an AssertionError if it is not within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/api/v1/jobs/{job_id}", headers=headers).json()
        if job["state"] in ("done", "failed", "cancelled"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish: {job}")


def wait_filed(client, job_id, headers=None, timeout=60):
    """The done job once the gallery has filed its images (each result record has its `image_id`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = wait_done(client, job_id, headers=headers, timeout=timeout)
        images = (job.get("result") or {}).get("images", [])
        if images and all(image.get("image_id") is not None for image in images):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id}'s images were not filed in the gallery: {job}")
