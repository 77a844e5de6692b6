"""Where a job's files live: ``<LMD_DATA_DIR>/jobs/<job id>/`` on a volume the API and the workers share.

A render worker writes image.png, overlay.png, masks/, layout.json and report.json there; the
API serves the PNGs; every worker's maintenance thread drops directories past the retention.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from layout_planner.layout import mask_file_name

log = logging.getLogger(__name__)


def jobs_root(data_dir: Path) -> Path:
    return Path(data_dir) / "jobs"


def job_dir(data_dir: Path, job_id: str) -> Path:
    """Where a job's image, overlay, masks and report are written (a volume shared by API and workers)."""
    return jobs_root(data_dir) / job_id


def result_file(data_dir: Path, job_id: str, name: str) -> Path:
    """One of the PNGs the API serves: ``image``, ``overlay`` or ``preview`` (the latest live preview)."""
    return job_dir(data_dir, job_id) / f"{name}.png"


def mask_file(data_dir: Path, job_id: str, object_id: str) -> Path:
    """One object's mask: ``masks/<id>.png`` (``layout_planner.layout.mask_file_name``: the id alphabet
    keeps it a plain file name; ValueError for an id outside it)."""
    return job_dir(data_dir, job_id) / "masks" / mask_file_name(object_id)


def report_file(data_dir: Path, job_id: str) -> Path:
    return job_dir(data_dir, job_id) / "report.json"


def drop_old_job_dirs(data_dir: Path, retention_s: float) -> int:
    """Delete the job directories not modified for ``retention_s``; returns how many went."""
    root = jobs_root(data_dir)
    if not root.is_dir():
        return 0
    cutoff = time.time() - retention_s
    dropped = 0
    for path in root.iterdir():
        try:
            if path.is_dir() and path.stat().st_mtime < cutoff:
                shutil.rmtree(path)
                dropped += 1
        except OSError as exc:
            log.warning("could not drop %s: %s", path, exc)
    return dropped
