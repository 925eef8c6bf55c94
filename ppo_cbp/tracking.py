"""Weights & Biases tracking and videos of a run, both optional (extras ``[wandb]``, ``[video]``).

:class:`FanOutWriter` stands where a run's TensorBoard ``SummaryWriter`` stood: every
``add_scalar(tag, value, step)`` goes to TensorBoard and, with ``--track``, to the W&B run as
``{tag: value, "global_step": step}`` (every metric is plotted against ``global_step``, so
points may come in any step order, as TensorBoard's do). What W&B gets is what TensorBoard
gets: the same tags, values and steps. ``add_text`` and everything else go to TensorBoard only;
``add_video_file`` sends a written video to W&B.

:func:`start_wandb` opens the W&B run of a run folder: the folder's name is the run's name, the
run's config (``config.json``'s settings) its config, and its id is kept in the folder
(:data:`ID_FILE`), so that a resumed run continues the same W&B run (``resume="allow"``).
TensorBoard drops the points that a killed process logged after its last checkpoint
(``purge_step``); W&B keeps them, so a resumed W&B run may show those steps twice.

:func:`require` checks, before any work, that what the flags need is installed (one
``UsageError`` line naming the install command); :func:`write_video` encodes frames to mp4
with imageio's ffmpeg (:mod:`ppo_cbp.ppo.video` renders them).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ppo_cbp.errors import UsageError

__all__ = [
    "ID_FILE",
    "FanOutWriter",
    "require",
    "start_wandb",
    "write_video",
]

ID_FILE = "wandb_id.txt"
"""The file in a run folder that holds its W&B run's id."""

WANDB_INSTALL = "pip install -e '.[wandb]'"
VIDEO_INSTALL = "pip install -e '.[video]'"


def _wandb() -> Any:
    try:
        import wandb
    except ImportError:
        raise UsageError(f"--track needs wandb, which is not installed: {WANDB_INSTALL}") from None
    return wandb


def _imageio() -> Any:
    try:
        import imageio
        import imageio_ffmpeg

        imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError):
        raise UsageError(
            f"--capture-video needs imageio with ffmpeg, which is not installed: {VIDEO_INSTALL}"
        ) from None
    return imageio


def require(track: bool, capture_video: bool) -> None:
    """Check that what ``--track`` and ``--capture-video`` need is installed, before anything
    is written: wandb; imageio with its ffmpeg.

    :raises UsageError: naming the install command.
    """
    if track:
        _wandb()
    if capture_video:
        _imageio()


class FanOutWriter:
    """A ``SummaryWriter`` whose scalars also go to a W&B run (see the module docstring).

    ``run``: the W&B run, or ``None`` (TensorBoard only); ``prefix``: put before each tag
    sent to W&B (the supervised benchmarks' ``seed_<seed>/``). ``close`` closes the
    TensorBoard writer and, if ``finish``, the W&B run.
    """

    def __init__(self, writer: Any, run: Any = None, prefix: str = "", finish: bool = True):
        self.writer, self.run, self.prefix, self.finish = writer, run, prefix, finish

    def add_scalar(self, tag: str, value: Any, step: int) -> None:
        self.writer.add_scalar(tag, value, step)
        if self.run is not None:
            self.run.log({self.prefix + tag: value, "global_step": step})

    def add_video_file(self, tag: str, path: Path, step: int, fps: int) -> None:
        """The mp4 at ``path`` to W&B (TensorBoard gets no video)."""
        if self.run is not None:
            video = _wandb().Video(str(path), fps=fps, format="mp4")
            self.run.log({self.prefix + tag: video, "global_step": step})

    def close(self) -> None:
        self.writer.close()
        if self.run is not None and self.finish:
            self.run.finish()

    def __getattr__(self, name: str) -> Any:  # flush, add_text, get_logdir, ...
        return getattr(self.writer, name)


def start_wandb(
    run_dir: Path, config: Mapping[str, Any], project: str, entity: str | None, **extra: Any
) -> Any:
    """The W&B run of ``run_dir`` (see the module docstring); a new id is written to
    :data:`ID_FILE` before ``wandb.init``. Its files go under ``WANDB_DIR`` if set, else
    ``run_dir``."""
    wandb = _wandb()
    id_file = Path(run_dir) / ID_FILE
    if id_file.exists():
        run_id = id_file.read_text().strip()
    else:
        run_id = secrets.token_hex(4)
        tmp = id_file.with_suffix(".tmp")
        tmp.write_text(run_id + "\n")
        tmp.replace(id_file)
    run = wandb.init(
        project=project,
        entity=entity,
        name=Path(run_dir).resolve().name,
        id=run_id,
        resume="allow",
        config=dict(config),
        dir=None if os.environ.get("WANDB_DIR") else str(run_dir),
        **extra,
    )
    run.define_metric("global_step")
    run.define_metric("*", step_metric="global_step")
    return run


def write_video(path: Path, frames: list[np.ndarray], fps: int) -> None:
    """Encode ``frames`` to the mp4 ``path`` (written to a temporary name, then renamed)."""
    imageio = _imageio()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.mp4")
    imageio.mimwrite(tmp, frames, fps=fps, codec="libx264", macro_block_size=1)
    tmp.replace(path)
