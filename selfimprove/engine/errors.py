"""Failures while a run runs, each said in one line: the stage, what went wrong in words, the fix.

Stages raise :class:`RunError` for what they can explain themselves (a training set that does not
fit max_length); :func:`explain` puts the libraries' failures into words by their exception types
(CUDA out of memory, no network for the hub, a vLLM engine that does not start). The CLI prints the
line, writes the whole traceback to ``<run dir>/error.log`` (``HYDRA_FULL_ERROR=1`` prints it too)
and exits 1; config errors found before a run starts are ``registry.ConfigError`` (exit 2).
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path


class RunError(RuntimeError):
    """A runtime failure a stage explains itself: its message is the line the user reads."""


class StageFailed(RuntimeError):
    """A stage raised: ``stage`` names it, ``reason`` is the one line (see :func:`explain`)."""

    def __init__(self, stage: str, reason: str):
        super().__init__(f"{stage}: {reason}")
        self.stage = stage
        self.reason = reason


HUB_FIX = (
    "run once with network to fill the Hugging Face cache (HF_HOME), or point model.name_or_path / "
    "dataset.*.path at a local copy"
)


INTERRUPTED = "interrupted; run the same command to resume"
RESUME = "run the same command to resume"


def free_space(path: Path) -> str:
    """Free space on the file system that holds ``path`` (or its nearest existing parent)."""
    from selfimprove.memory import format_bytes

    while not path.exists() and path != path.parent:
        path = path.parent
    return format_bytes(shutil.disk_usage(path).free)


def explain_os_error(err: BaseException, where: Path | None) -> str | None:
    """A full disk, a read-only place or a file in the way, in words: the path and the fix. Torch and
    safetensors report a full disk in their own words; ``where`` (the run or stage folder) stands in
    for a path the error does not name."""
    text = str(err)
    code = getattr(err, "errno", None)
    path = Path(getattr(err, "filename", None) or where or ".")
    if code == errno.ENOSPC or "No space left on device" in text or "StorageFull" in text:
        return f"disk full writing {path} ({free_space(path)} free there); free space and {RESUME}"
    if code in (errno.EROFS, errno.EACCES, errno.EPERM):
        why = "the file system is read-only" if code == errno.EROFS else "permission denied"
        return f"cannot write {path} ({why}); make it writable or choose another out_root / run_dir, then {RESUME}"
    if code in (errno.ENOTDIR, errno.EEXIST, errno.EISDIR):
        return f"a file is in the way at {path} ({err.strerror}); move it away or choose another out_root / run_dir"
    return None


def explain(err: BaseException, where: Path | None = None) -> str:
    """One line for an exception raised inside a stage: what went wrong and the fix."""
    if isinstance(err, RunError):
        return str(err)
    name = type(err).__name__
    text = " ".join(str(err).split())
    disk = explain_os_error(err, where)
    if disk is not None:
        return disk
    if name == "OutOfMemoryError" or "CUDA out of memory" in text:
        return (
            "out of GPU memory; lower the method's micro-batch (model.optim.micro_batch_size) or "
            "max_length, train a LoRA adapter (model.optim.lora), or shard training (hardware=gpu8); "
            "`selfimprove plan` estimates the peak"
        )
    if (
        name in ("LocalEntryNotFoundError", "OfflineModeIsEnabled")
        or "couldn't connect to 'https://huggingface.co'" in text
        or ("offline" in text.lower() and ("hub" in text.lower() or "huggingface" in text.lower()))
    ):
        return f"the model or dataset is not in the local Hugging Face cache and the hub cannot be reached; {HUB_FIX}"
    if name in ("ConnectError", "ConnectionError", "ConnectTimeout", "MaxRetryError", "DatasetNotFoundError"):
        return f"cannot reach the Hugging Face hub ({name}); {HUB_FIX}"
    if name in ("RepositoryNotFoundError", "GatedRepoError", "RevisionNotFoundError"):
        return f"{text[:200]}; check model.name_or_path / dataset.*.path, or `huggingface-cli login` for gated models"
    if "vllm" in text.lower() and ("engine" in text.lower() or "EngineCore" in text):
        return (
            f"the vLLM engine failed ({text[:200]}); try generator=hf, a lower "
            "hardware.gpu_memory_utilization, or hardware.enforce_eager=true"
        )
    return f"{name}: {text[:300]}"
