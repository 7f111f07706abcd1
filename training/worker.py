"""The process a fine-tuning job trains in, apart from the server so that serving keeps its latency.

Exit code 0 means trained (the summary is in OUT/summary.json); anything else failed, and the last
"error" event says why. A job cancelled through the API stops at its next step.
"""

import ctypes
import json
import logging
import os
import signal
import sys
import traceback

import torch

from server.database import Database
from training.config import TrainConfig
from training.data import DataError
from training.jobs import JobStore
from training.recipe import TrainingCancelled, train
from training.report import METRIC_PREFIXES

SUMMARY_FILE = "summary.json"
_PR_SET_PDEATHSIG = 1  # from <sys/prctl.h>


def die_with_parent() -> None:
    """Linux: be killed when the server process dies, even by kill -9; a restarted server resumes the
    job, and an orphan still training beside it would write the same files."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() == 1:  # the server was gone before the call
            os._exit(1)


def run_job(database_url: str, job_id: str, num_threads: int | None) -> None:
    die_with_parent()
    logging.basicConfig(level=logging.WARNING)
    if num_threads:
        torch.set_num_threads(num_threads)
    store = JobStore(Database(database_url, migrate=False))  # the server migrated it
    config = TrainConfig.model_validate(store.get_job(job_id).config)
    latest: dict = {}

    def on_event(event: dict) -> None:
        data = event.get("data") or {}
        if {"train_loss", "valid_loss"} & data.keys():  # a step's or a validation's record (not the summary's)
            latest.update({k: v for k, v in data.items() if k.startswith(METRIC_PREFIXES)})
        store.add_event(job_id, event["level"], event["message"], data or None)
        if "checkpoint" in data:
            metrics = {"step": data["step"], **latest}
            # Validation runs on the whole file: OpenAI's "full" metrics too.
            metrics |= {f"full_{name}": value for name, value in latest.items() if name.startswith("valid_")}
            store.add_checkpoint(job_id, data["step"], data["epoch"], data["checkpoint"], metrics)

    try:
        summary = train(config, on_event, should_stop=lambda: store.status(job_id) == "cancelled")
    except TrainingCancelled as exc:
        store.add_event(job_id, "info", str(exc))
        raise SystemExit(3) from exc
    except DataError as exc:
        store.add_event(job_id, "error", str(exc), {"code": "invalid_training_file"})
        raise SystemExit(1) from exc
    except Exception as exc:  # whatever broke, the job's events must say it
        store.add_event(job_id, "error", f"training failed: {exc}", {"code": "training_error",
                                                                     "traceback": traceback.format_exc()[-4000:]})
        raise SystemExit(1) from exc
    (config.out / SUMMARY_FILE).write_text(json.dumps(summary))
