"""``dinotune export RUN --format hf``: a run as a plain transformers folder (``model.safetensors`` +
``config.json``, the image processor, a ``README.md`` model card), written atomically and
optionally uploaded to the hub.

What the folder holds comes from the run's task (``Task.to_transformers``: classification maps onto
transformers' DINOv2 image classifiers, ``tasks/classify/hf.py``); a task without a transformers
counterpart refuses with the reason before any weights are loaded.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from dinotune.engine.run_folder import BEST
from dinotune.errors import ExportError
from dinotune.runs import load, read_config
from dinotune.tasks import get_task
from dinotune.utils import file_mode


def export_hf(run: str | Path, out: str | Path, *, push_to_hub: str | None = None, private: bool = False,
              checkpoint_name: str = BEST, model: str | None = None) -> Path:
    """Write ``run`` as a transformers folder and return ``out``.

    The folder holds ``model.safetensors`` + ``config.json``, the image processor's
    ``preprocessor_config.json`` and a short ``README.md`` model card; transformers' auto classes and
    ``pipeline`` read it without dinotune (classification: ``pipeline("image-classification",
    model=out)``).

    Args:
        run: a run folder (or one of its checkpoint folders) whose task has a transformers counterpart.
        out: the folder to create; it must not exist, or be empty.
        push_to_hub: a hub repo (``user/name``) to create (if needed) and upload the folder to; refused
            within seconds when the hub cannot be reached or no token is set.
        private: create the hub repo private.
        checkpoint_name: ``best`` or ``last``.
        model: another location of the run's base weights (as ``dinotune.load``).
    """
    out = Path(out).expanduser()
    if out.is_symlink():  # the folder is replaced at the end, which a link would make fail after the work
        raise ExportError(f"{out} is a symbolic link (to {os.readlink(out)}); pass the folder itself or a new path "
                          "as --out")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} exists and is not empty; remove it or choose another --out")
    if push_to_hub:
        check_hub(push_to_hub)  # before any work: offline or without a token this fails in seconds
    # a run that has no transformers counterpart is refused from its config, before any weights load
    get_task(read_config(run)).check_transformers_export()
    loaded = load(run, checkpoint_name=checkpoint_name, device="cpu", merge=True, model=model, precision="fp32")
    hf_model, processor, card = loaded.task.to_transformers(loaded)

    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        hf_model.save_pretrained(staging)  # safetensors
        processor.save_pretrained(staging)
        (staging / "README.md").write_text(card)
        for path in staging.iterdir():  # transformers writes the weights owner-only; keep the umask's mode
            path.chmod(file_mode())
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if push_to_hub:
        upload(out, push_to_hub, private=private)
    return out


# --------------------------------------------------------------------------------- the hub
def check_hub(repo_id: str) -> None:
    """Refuse an upload that cannot work, in seconds: a malformed repo id, an unreachable hub, no token."""
    from huggingface_hub import get_token
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    from dinotune.backbone.loading import hub_reachable

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise ExportError(f"--push-to-hub {repo_id!r} is not a hub repo id ({exc})") from None
    if not hub_reachable():
        raise ExportError(f"--push-to-hub {repo_id}: the Hugging Face hub cannot be reached from here (offline, "
                          "or HF_HUB_OFFLINE is set); export without --push-to-hub and upload the folder later "
                          "with `huggingface-cli upload`")
    if not get_token():
        raise ExportError(f"--push-to-hub {repo_id}: no Hugging Face token; log in with `huggingface-cli login` or "
                          "set HF_TOKEN to a token with write access")


def upload(folder: Path, repo_id: str, *, private: bool = False) -> str:
    """Create ``repo_id`` (if needed) and upload ``folder`` to it; returns the repo URL. A 401 / 403
    answer becomes one line about the token."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi()
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message="dinotune export")
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):
            raise ExportError(f"--push-to-hub {repo_id}: the hub refused the upload (HTTP {status}): the token is "
                              "missing, invalid or read-only, or has no access to that namespace; log in with "
                              "`huggingface-cli login` or set HF_TOKEN to a token with write access") from None
        raise ExportError(f"--push-to-hub {repo_id}: the upload failed ({exc})") from None
    return str(url)
