"""What both pre-training stages do the same way: the run folder, resume rules, per-rank state, the loop, progress.

A stage (:class:`~pumit_nnunet.pretrain.tokenizer_trainer.TokenizerTrainer`,
:class:`~pumit_nnunet.pretrain.mim_trainer.MIMTrainer`) keeps only what is its own (models, losses, pictures) and
implements the small :class:`Stage` protocol; :func:`fit` drives it and :func:`run_stage` is the entry point of
both commands. Files in a run folder:

- ``checkpoint_latest.pth``: the training state for exact resume (written atomically at every checkpoint): the
  header of :func:`state_header` (stage, run config, step, number of processes, every rank's RNG and loader state
  under ``per_rank``, history) plus the stage's models, optimisers, schedules and scalers;
- ``pumit_<stage>_latest.pth`` / ``pumit_<stage>_final.pth``: the stage's artefact in the package's checkpoint
  format (kind ``tokenizer`` or ``mim``), what the next stage or fine-tuning loads;
- ``train_config.json``, ``history.json``, ``progress.png`` and the stage's pictures.

Resume (``--resume``): the recorded config is read back strictly, and every field not declared
``resume=True`` in :mod:`pumit_nnunet.pretrain.config` must be equal, else one line names the differing fields.
Errors are :class:`~pumit_nnunet.errors.PumitError` s; ``pumit_nnunet.cli.main`` prints them.
"""

from __future__ import annotations

import sys
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

from tqdm.auto import tqdm

from pumit_nnunet import __version__
from pumit_nnunet.checkpoints.tokenizer import LEGACY_TOKENIZER_FORMAT
from pumit_nnunet.corpus.api import ensure_store
from pumit_nnunet.corpus.loader import CropGrid, build_pretrain_loader
from pumit_nnunet.errors import DataError, UsageError
from pumit_nnunet.io import nonfinite_to_null, write_json_atomic
from pumit_nnunet.pretrain import distributed as D
from pumit_nnunet.pretrain.checkpoint import capture_rng_state, load_checkpoint, restore_rng_state
from pumit_nnunet.pretrain.config import RunConfig, resume_may_change

__all__ = ["TRAIN_STATE", "HISTORY", "CONFIG_JSON", "STATE_FORMAT", "History", "Stage", "artefact_names",
           "open_run", "preflight", "build_corpus_loader", "check_resume", "resume_from_folder", "resume_or_init",
           "restore_state", "state_header", "restore_header", "write_run_files", "fit", "run_stage", "Progress"]

TRAIN_STATE, HISTORY, CONFIG_JSON = "checkpoint_latest.pth", "history.json", "train_config.json"
#: the ``format`` entry of a training state (earlier releases: ``pumit-nnunet/tokenizer/1``, refused on resume with
#: the way to continue; or none for MIM, still resumed)
STATE_FORMAT = "pumit-nnunet/train-state/2"

#: curves by name: ``[(step, value), ...]``
History = dict[str, list[tuple[int, float]]]


def artefact_names(stage: str) -> tuple[str, str]:
    """``(latest, final)`` file names of a stage's artefact in our checkpoint format."""
    return f"pumit_{stage}_latest.pth", f"pumit_{stage}_final.pth"


class Stage(Protocol):
    """What :func:`fit` needs of a stage's trainer."""

    config: RunConfig
    info: D.DistInfo
    loader: Any
    step: int

    def train_batch(self, batch: Any) -> Any: ...  # one optimisation step; increments ``step``
    def after_step(self, result: Any, last: bool) -> dict[str, str]: ...  # curves, pictures; the progress postfix
    def save(self) -> None: ...  # collective: the training state and the latest artefact
    def finish(self) -> Path: ...  # the final artefact (rank 0 writes it)


# --- the run folder --------------------------------------------------------------------------------------------
def _warn(command: str, out: Path, problem: str) -> None:
    print(f"pumit-nnunet {command}: warning: {out}: {problem}", file=sys.stderr)


def open_run(config: RunConfig, resume: bool) -> dict | None:
    """The training state to resume from (``None``: a new run); refuses to start over an existing run.

    ``--resume`` on a folder without a checkpoint starts a new run and says so loudly (re-running the same command
    line after a crash before the first checkpoint is the common case).
    """
    out = Path(config.out)
    latest = out / TRAIN_STATE
    if latest.exists() and not resume:
        raise UsageError(f"already holds a {config.STAGE} run ({TRAIN_STATE}); pass --resume to continue it, or "
                         "choose another --out", out)
    if not resume:
        return None
    if not latest.exists():
        _warn(f"pretrain {config.STAGE}", out, f"--resume, but there is no {TRAIN_STATE} here: STARTING A NEW RUN "
              "from step 0")
        return None
    return load_checkpoint(latest)


def _recorded_config(state: dict, config: RunConfig, path: Path) -> RunConfig:
    if state.get("format") == LEGACY_TOKENIZER_FORMAT:
        # its generator optimiser decayed the codebook (one group more than ours holds): no exact resume possible
        raise UsageError(f"was written by an earlier release ({LEGACY_TOKENIZER_FORMAT}), whose optimiser decayed the "
                         "codebook, and cannot be resumed exactly; continue in a new --out with `--init "
                         f"{path}` (keeps the tokenizer and discriminator weights; the step count restarts)", path)
    stage = state.get("stage", "mim" if "mask_generator" in state else "?")  # earlier MIM states record no stage
    if stage != config.STAGE:
        raise UsageError(f"is a {stage} run, not a {config.STAGE} run: resume it with `pumit-nnunet pretrain {stage}`",
                         path)
    recorded = state.get("config")
    if not isinstance(recorded, dict):
        raise DataError("records no run config; it was not written by `pumit-nnunet pretrain`", path)
    return type(config).from_plain(recorded, strict=True, source=path)


def check_resume(state: dict, config: RunConfig, path: Path, info: D.DistInfo) -> None:
    """Refuse a resume whose recipe differs from the recorded one (one line naming every differing field)."""
    recorded = _recorded_config(state, config, path)
    free = resume_may_change(type(config))
    changed = [f"{f.name} {getattr(recorded, f.name)!r} -> {getattr(config, f.name)!r}" for f in fields(config)
               if f.name not in free and getattr(recorded, f.name) != getattr(config, f.name)]
    if changed:
        raise UsageError(f"--resume with a different recipe ({'; '.join(changed)}): resume with the recorded values, "
                         "or start a new --out (with --init to keep the weights)", path)
    if recorded.steps != config.steps and D.is_main(info):
        _warn(f"pretrain {config.STAGE}", path, f"--steps changed from {recorded.steps} to {config.steps}: the cosine "
              "schedule is stretched from here on")
    world = state.get("world_size", 1)
    if world != info.world_size:
        raise UsageError(f"was written by {world} processes, this run has {info.world_size}: exact resume needs "
                         "the same number", path)


# --- the state every checkpoint starts with --------------------------------------------------------------------
def state_header(trainer: Stage, history: History) -> dict[str, Any]:
    """Stage, config, step, processes, per-rank RNG and loader state, history. Collective: call on every rank."""
    loader = trainer.loader
    loader_state = loader.state_dict() if hasattr(loader, "state_dict") else None
    per_rank = D.gather_objects({"rng": capture_rng_state(), "loader": loader_state})
    return {"format": STATE_FORMAT, "package_version": __version__, "stage": trainer.config.STAGE,
            "config": trainer.config.to_plain(), "step": trainer.step, "world_size": trainer.info.world_size,
            "per_rank": per_rank, "history": {k: [list(p) for p in v] for k, v in history.items()}}


def restore_header(trainer: Stage, state: dict) -> History:
    """Step, this rank's RNG and loader state from :func:`state_header` output; returns the history."""
    trainer.step = int(state["step"])
    mine = state["per_rank"][trainer.info.rank]
    if mine["loader"] is not None and hasattr(trainer.loader, "load_state_dict"):
        trainer.loader.load_state_dict(mine["loader"])
    restore_rng_state(mine["rng"])
    return {k: [tuple(p) for p in v] for k, v in state["history"].items()}


def write_run_files(out: Path, config: RunConfig, history: History | None = None) -> None:
    """``train_config.json`` and (with ``history``) ``history.json``, atomically, as strict JSON.

    Each curve is a list of ``{"step": s, "value": v}`` points, so a non-finite value (a diverged loss) has room for
    :func:`~pumit_nnunet.io.nonfinite_to_null`'s ``"value": null, "value_status": "nan"``; read it back with
    :func:`~pumit_nnunet.io.null_to_nonfinite`.
    """
    write_json_atomic(out / CONFIG_JSON, config.to_plain())
    if history is not None:
        points = {name: [{"step": int(step), "value": float(value)} for step, value in curve]
                  for name, curve in history.items()}
        write_json_atomic(out / HISTORY, nonfinite_to_null(points))


def build_corpus_loader(config: RunConfig, info: D.DistInfo) -> tuple[Any, str]:
    """This rank's share of the corpus loader and the store's path; rank 0 converts raw data into OUT/corpus first
    (the others wait for the path it broadcasts)."""
    work = Path(config.out) / "corpus"
    store = ensure_store(config.data, work, num_workers=config.num_workers) if D.is_main(info) else None
    store = D.broadcast_object(None if store is None else str(store))
    loader = build_pretrain_loader(store, config.batch_size, CropGrid(config.crop_depth_tokens, config.crop_inplane_tokens),
                                   seed=config.seed, rank=info.rank, world_size=info.world_size,
                                   num_workers=config.num_workers, augment=config.augment)
    return loader, store


# --- the loop ----------------------------------------------------------------------------------------------------
class Progress:
    """The progress bar of rank 0: step, the stage's postfix, and the members the corpus loader had to skip."""

    def __init__(self, stage: str, total: int, initial: int, loader: Any, enabled: bool) -> None:
        self.loader = loader
        self.bar = tqdm(total=total, initial=initial, desc=stage, disable=not enabled, dynamic_ncols=True)

    def update(self, postfix: dict[str, str]) -> None:
        skipped = getattr(self.loader, "skipped", None)  # the corpus loader's count of replaced unreadable crops
        if skipped is not None:  # always shown for the corpus loader, so a growing count is noticed
            postfix = {**postfix, "skipped": str(skipped)}
        self.bar.update(1)
        if postfix:
            self.bar.set_postfix(postfix, refresh=False)

    def close(self) -> None:
        self.bar.close()


def fit(trainer: Stage, until: int | None = None) -> Path | None:
    """Train to ``config.steps`` (or stop after ``--stop-at``/``until``, as an interruption would) from wherever
    the trainer's state says; checkpoint every ``ckpt_every`` steps and where it stops; the final artefact when the
    run is complete (its path; ``None`` when stopped early)."""
    config = trainer.config
    stop = config.last_step() if until is None else min(until, config.steps)
    progress = Progress(config.STAGE, config.steps, trainer.step, trainer.loader, D.is_main(trainer.info))
    batches: Iterable = iter(trainer.loader) if trainer.step < stop else iter(())
    try:
        while trainer.step < stop:
            result = trainer.train_batch(next(batches))
            progress.update(trainer.after_step(result, last=trainer.step == stop))
            if trainer.step % config.ckpt_every == 0 or trainer.step == stop:
                trainer.save()
    finally:
        progress.close()
    return trainer.finish() if trainer.step >= config.steps else None


def run_stage(config: RunConfig, build: Callable[[RunConfig, D.DistInfo], Stage]) -> Path | None:
    """Entry point of both commands: join the process group, build the stage (``build`` resumes it when asked),
    train."""
    info = D.init_distributed(config.device)
    try:
        trainer = build(config, info)
        if D.is_main(info):
            Path(config.out).mkdir(parents=True, exist_ok=True)
            write_run_files(Path(config.out), config)
        result = fit(trainer)
        D.barrier()
        return result
    finally:
        D.cleanup_distributed()


def preflight(config: RunConfig, info: D.DistInfo, resume: bool) -> dict | None:
    """The refusals that need no model and no data, before any corpus conversion: a new run over an existing one,
    or a resume with a different recipe. Returns the checked training state to resume from (``None``: a new run),
    which :func:`resume_or_init` restores without reading the file again."""
    state = open_run(config, resume)
    if state is not None:
        check_resume(state, config, Path(config.out) / TRAIN_STATE, info)
    return state


def restore_state(trainer: Any, state: dict) -> None:
    """Load a training state that :func:`preflight` has checked into ``trainer`` (and say so on rank 0)."""
    trainer.load_state_dict(state)
    if D.is_main(trainer.info):
        print(f"resumed {trainer.config.STAGE} pre-training at step {trainer.step} from "
              f"{Path(trainer.config.out) / TRAIN_STATE}")


def resume_from_folder(trainer: Any) -> bool:
    """Load the run folder's training state into ``trainer`` after checking the recipe; ``False`` when there is
    none (said loudly: a new run starts)."""
    state = preflight(trainer.config, trainer.info, resume=True)
    if state is not None:
        restore_state(trainer, state)
    return state is not None


def resume_or_init(trainer: Any, state: dict | None) -> None:
    """Resume the trainer from :func:`preflight`'s state (``--resume``), else start it from ``--init`` weights,
    if given."""
    if state is not None:
        restore_state(trainer, state)
    elif trainer.config.init:
        trainer.init_weights_from(trainer.config.init)
