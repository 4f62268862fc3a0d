"""Training-run checkpoints (torch.distributed.checkpoint) and weight exports (LoRA, full model).

Run checkpoints
    ``<run_dir>/checkpoints/step_00000250/`` holds a DCP checkpoint of a plain nested dict built from the train
    state (``state_to_dict``), plus ``metadata.json`` (step, time, world size, the caller's ``extra`` such as the
    data-sampler position, the resolved config and its fingerprint). DCP stores global tensor shapes, so a run
    saved on N processes resumes on M.

    Saving is atomic: every rank writes into ``step_XXXXXXXX.tmp``; after all ranks finished, rank 0 writes
    ``metadata.json`` into it and renames the directory. A directory counts as a checkpoint only under its final
    name and with both ``metadata.json`` and DCP's ``.metadata`` inside, so a crash at any point leaves the
    previous checkpoint as the newest one; leftovers (``*.tmp``) are deleted by the next save or resume. Old
    checkpoints are pruned only after the new one is complete.

    Resume checks the saved config against the current one (:func:`check_config_compatible`): a change in a
    field that changes what the saved tensors mean (:data:`CRITICAL_CONFIG_FIELDS`, e.g. LoRA rank or alpha,
    training mode, optimizer) is a ``ValueError``; any other change (learning rate, total steps, log interval,
    paths) is logged as a warning and the run continues with the new values.

Exports
    :func:`export_lora` writes a LoRA in the ComfyUI / ltx-core layout without alpha keys (the scale folded into
    lora_B), which ltx-core, ComfyUI and diffusers all load as the trained model (see its docstring);
    :func:`export_full_model` writes a whole official single-file checkpoint: the trained transformer (and
    connectors) over a copy of the base file. Every LoRA layout is read by :mod:`ltxf.lora_formats`
    (``load_lora_file`` is re-exported here).
"""

from __future__ import annotations

import datetime
import fnmatch
import hashlib
import json
import logging
import os
import re
import shutil
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

from ltxf.faults import CheckpointSaveError, describe_exception, gather_objects, save_error_message
from ltxf.lora_formats import LoraFile as LoraFile  # re-exported: the LoRA reader's home is ltxf.lora_formats
from ltxf.lora_formats import load_lora_file as load_lora_file
from ltxf.models.checkpoint import (
    TEXT_CONNECTOR_SUBPREFIXES,
    TRANSFORMER_PREFIX,
    read_config,
    read_metadata,
    read_tensors,
    write_checkpoint,
)

logger = logging.getLogger(__name__)

CHECKPOINTS_DIRNAME = "checkpoints"
METADATA_FILENAME = "metadata.json"
FORMAT_VERSION = "ltxf-dcp-1"
_DCP_METADATA_FILENAME = ".metadata"
_STEP_DIR_RE = re.compile(r"^step_(\d{8,})$")
_TMP_SUFFIX = ".tmp"
_OLD_SUFFIX = ".old"
_UNREADABLE_SUFFIX = ".unreadable"

# Dotted config fields (fnmatch patterns) whose change between save and resume makes the saved state mean
# something else: the set or shape of trainable tensors, the optimizer-state layout, the LoRA scale, the task.
CRITICAL_CONFIG_FIELDS: tuple[str, ...] = (
    "model.training_mode",
    "model.train_connectors",
    "lora.rank",
    "lora.alpha",
    "lora.target_modules",
    "lora.exclude_audio",
    "optim.optimizer",
    "strategy.name",
)

COMFY_LORA_PREFIX = "diffusion_model."
_PEFT_LORA_PREFIX = "base_model.model."
_LORA_A_SUFFIX = ".lora_A.weight"
_LORA_B_SUFFIX = ".lora_B.weight"
_ALPHA_SUFFIX = ".alpha"


# -------------------------------------------------------------------------------------------------------------
# Process-group helpers (everything works without an initialised process group)


def _dist_active() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _dist_active() else 0


def _world_size() -> int:
    return dist.get_world_size() if _dist_active() else 1


def _barrier() -> None:
    if _dist_active():
        dist.barrier()


def _broadcast_error(error: str | None) -> None:
    """Raise the same error on every rank if rank 0 failed a file-system step, so no rank hangs in a barrier."""
    if _dist_active():
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise CheckpointSaveError(error)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_json_atomic(path: Path, payload: Mapping[str, Any]) -> None:
    tmp = path.with_name(path.name + _TMP_SUFFIX)
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


# -------------------------------------------------------------------------------------------------------------
# Config fingerprint and resume compatibility


def _canonical_json(config: Mapping[str, Any]) -> str:
    return json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)


def config_fingerprint(config: Mapping[str, Any]) -> str:
    """A stable 16-hex-digit SHA-256 fingerprint of a JSON-able config (key order does not matter)."""
    return hashlib.sha256(_canonical_json(config).encode()).hexdigest()[:16]


def _flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten_config(value, name + "."))
        else:
            # Round-trip through JSON so tuples and lists (and Paths and strings) compare equal.
            flat[name] = json.loads(json.dumps(value, default=str))
    return flat


def check_config_compatible(
    saved_config: Mapping[str, Any],
    current_config: Mapping[str, Any],
    *,
    critical_fields: Sequence[str] = CRITICAL_CONFIG_FIELDS,
    source: str | Path = "<checkpoint>",
) -> list[str]:
    """Compare the config a checkpoint was saved with to the current one.

    Fields are compared as dotted paths (``lora.rank``). A changed, added or removed field that matches one of
    the fnmatch patterns in ``critical_fields`` raises a ``ValueError`` listing every such field with its old
    and new value; other differences are logged as one warning and returned (as ``"field: old -> new"``
    strings) so the caller can record them.
    """
    saved_flat = _flatten_config(saved_config)
    current_flat = _flatten_config(current_config)
    missing = object()
    changes: list[tuple[str, Any, Any]] = []
    for name in sorted(set(saved_flat) | set(current_flat)):
        old, new = saved_flat.get(name, missing), current_flat.get(name, missing)
        if old != new:
            changes.append((name, old, new))

    def show(value: Any) -> str:
        return "<absent>" if value is missing else json.dumps(value)

    def is_critical(name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in critical_fields)

    critical = [f"{n}: {show(o)} -> {show(v)}" for n, o, v in changes if is_critical(n)]
    other = [f"{n}: {show(o)} -> {show(v)}" for n, o, v in changes if not is_critical(n)]
    if critical:
        raise ValueError(
            f"{source}: cannot resume, the config changed in fields that change what the saved state means "
            f"({', '.join(critical)}). Restore these values, or start a new run in another output directory."
        )
    if other:
        logger.warning("%s: resuming with a changed config (new values apply): %s", source, "; ".join(other))
    return other


# -------------------------------------------------------------------------------------------------------------
# Run checkpoints: layout


def _checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIRNAME


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    """Where the checkpoint of ``step`` lives (whether or not it exists)."""
    return _checkpoints_dir(run_dir) / f"step_{step:08d}"


def is_complete_checkpoint(path: str | Path) -> bool:
    """True if ``path`` is a finished checkpoint directory (final name, DCP metadata and our metadata.json)."""
    path = Path(path)
    return (
        _STEP_DIR_RE.match(path.name) is not None
        and (path / METADATA_FILENAME).is_file()
        and (path / _DCP_METADATA_FILENAME).is_file()
    )


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """All complete checkpoints of a run as ``(step, path)``, oldest first. Incomplete ones are skipped."""
    return [(step, path) for step, path in step_directories(run_dir) if is_complete_checkpoint(path)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step, or ``None`` if the run has none."""
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def cleanup_incomplete(run_dir: str | Path) -> list[Path]:
    """Delete what interrupted saves left behind; return what was removed. Call on one rank only.

    ``step_X.tmp`` directories are unfinished saves. ``step_X.old`` is a checkpoint that was being replaced by a
    new save of the same step: it is deleted if the replacement is in place, and renamed back otherwise.
    """
    root = _checkpoints_dir(run_dir)
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    for child in sorted(root.iterdir()):
        if child.name.endswith(_TMP_SUFFIX) and _STEP_DIR_RE.match(child.name[: -len(_TMP_SUFFIX)]):
            logger.warning("removing incomplete checkpoint %s (left by an interrupted save)", child)
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child)
        elif child.name.endswith(_OLD_SUFFIX) and _STEP_DIR_RE.match(child.name[: -len(_OLD_SUFFIX)]):
            final = child.with_name(child.name[: -len(_OLD_SUFFIX)])
            if is_complete_checkpoint(final):
                shutil.rmtree(child, ignore_errors=True)
                removed.append(child)
            else:
                logger.warning("restoring %s from %s (a replacing save was interrupted)", final, child)
                if final.exists():
                    shutil.rmtree(final)
                child.rename(final)
    return removed


def read_checkpoint_metadata(path: str | Path) -> dict[str, Any]:
    """The ``metadata.json`` of a checkpoint directory (step, time, world_size, extra, config, fingerprint)."""
    path = Path(path)
    if not is_complete_checkpoint(path):
        raise ValueError(
            f"{path} is not a complete checkpoint directory (expected a 'step_XXXXXXXX' directory holding "
            f"'{METADATA_FILENAME}' and '{_DCP_METADATA_FILENAME}')"
        )
    try:
        metadata = json.loads((path / METADATA_FILENAME).read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path / METADATA_FILENAME} is not valid JSON: {exc}") from exc
    if not isinstance(metadata, dict) or not isinstance(metadata.get("step"), int):
        raise ValueError(f"{path / METADATA_FILENAME}: expected a JSON object with an integer 'step'")
    return metadata


def _incomplete_reason(path: Path) -> str | None:
    """Why a ``step_X`` directory is not a complete checkpoint, or None if it is."""
    missing = [name for name in (_DCP_METADATA_FILENAME, METADATA_FILENAME) if not (path / name).is_file()]
    if not missing:
        return None
    if len(missing) == 2:
        return f"it holds neither DCP's '{_DCP_METADATA_FILENAME}' nor '{METADATA_FILENAME}'"
    if missing[0] == _DCP_METADATA_FILENAME:
        return f"DCP's '{_DCP_METADATA_FILENAME}' is missing (a partial copy, or files deleted?)"
    return f"'{METADATA_FILENAME}' is missing (a partial copy, or files deleted?)"


def step_directories(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Every ``step_XXXXXXXX`` directory of a run, complete or not, as ``(step, path)``, oldest first."""
    root = _checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR_RE.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


def _move_aside(path: Path) -> Path:
    """Rename a checkpoint directory that cannot be used to ``<name>.unreadable`` (``.unreadable.N`` if taken):
    out of the way of resume and of later saves, never deleted."""
    target = path.with_name(path.name + _UNREADABLE_SUFFIX)
    n = 1
    while target.exists():
        target = path.with_name(f"{path.name}{_UNREADABLE_SUFFIX}.{n}")
        n += 1
    path.rename(target)
    return target


# -------------------------------------------------------------------------------------------------------------
# Run checkpoints: save


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    state: dict[str, Any],
    *,
    extra: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
    keep_last_n: int = 0,
) -> Path:
    """Save ``state`` as ``<run_dir>/checkpoints/step_{step:08d}``, atomically. Collective: every rank calls it.

    ``state`` is a nested dict of tensors (DTensors allowed: each rank writes its shards) and small Python
    values; it is read, not modified. ``extra`` (JSON-able, e.g. the data-sampler position) and ``config`` (the
    resolved run config, JSON-able; stored with its :func:`config_fingerprint` for the resume check) go into
    ``metadata.json``. A complete checkpoint of the same step is replaced. ``keep_last_n > 0`` then deletes all
    but the newest ``keep_last_n`` complete checkpoints (never the one just written); ``<= 0`` keeps all.

    Returns the final checkpoint directory. The run directory must be on a file system every rank sees.
    """
    if step < 0:
        raise ValueError(f"checkpoint step must be >= 0, got {step}")
    extra = dict(extra or {})
    try:
        json.dumps(extra)
    except TypeError as exc:
        raise ValueError(f"save_checkpoint: 'extra' must be JSON-serialisable: {exc}") from exc
    final = checkpoint_path(run_dir, step)
    tmp = final.with_name(final.name + _TMP_SUFFIX)
    rank = _rank()
    started = time.perf_counter()

    previous = latest_checkpoint(run_dir) if rank == 0 else None
    error = None
    if rank == 0:
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            cleanup_incomplete(run_dir)
            tmp.mkdir()
        except OSError as exc:
            error = save_error_message(final, exc, previous=previous)
    _broadcast_error(error)  # also a barrier: no rank writes before the leftovers are gone

    try:
        _dcp_call(dcp.save, state, checkpoint_id=tmp)
    except (OSError, CheckpointException) as exc:
        # DCP gathers every rank's failure, so all ranks raise here together.
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # frees what the partial save took
        raise CheckpointSaveError(save_error_message(final, exc, previous=previous)) from exc
    _barrier()

    error = None
    if rank == 0:
        try:
            _finalise(tmp, final, step=step, extra=extra, config=config)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            error = save_error_message(final, exc, previous=previous)
        if error is None:
            try:
                _prune(run_dir, keep_last_n=keep_last_n, keep=final)
            except OSError as exc:
                logger.warning("saved %s but could not delete older checkpoints (keep_last_n=%d): %s", final,
                               keep_last_n, exc)
    # The broadcast also keeps every rank here until rank 0 has renamed the checkpoint into place.
    _broadcast_error(error)
    logger.info("saved checkpoint %s in %.1f s", final, time.perf_counter() - started)
    return final


def _finalise(tmp: Path, final: Path, *, step: int, extra: dict, config: Mapping[str, Any] | None) -> None:
    now = time.time()
    metadata = {
        "format": FORMAT_VERSION,
        "step": step,
        "time": datetime.datetime.fromtimestamp(now, tz=datetime.timezone.utc).isoformat(),
        "unix_time": now,
        "world_size": _world_size(),
        "torch_version": torch.__version__,
        "extra": extra,
        "config_fingerprint": config_fingerprint(config) if config is not None else None,
        "config": json.loads(_canonical_json(config)) if config is not None else None,
    }
    _write_json_atomic(tmp / METADATA_FILENAME, metadata)
    _fsync_dir(tmp)
    old = final.with_name(final.name + _OLD_SUFFIX)
    if final.exists() and not is_complete_checkpoint(final):
        # Never overwrite what may be someone's data (e.g. a partly copied checkpoint): keep it aside.
        aside = _move_aside(final)
        logger.warning("%s existed but is not a complete checkpoint (%s); moved it to %s before saving step %d",
                       final, _incomplete_reason(aside), aside, step)
    if final.exists():
        # A directory cannot be renamed over a non-empty one: move the old one aside first. cleanup_incomplete
        # puts it back if we crash between the two renames.
        logger.info("replacing existing checkpoint %s", final)
        final.rename(old)
    tmp.rename(final)
    _fsync_dir(final.parent)
    if old.exists():
        shutil.rmtree(old)


def _prune(run_dir: str | Path, *, keep_last_n: int, keep: Path) -> None:
    found = list_checkpoints(run_dir)
    keep_step = int(_STEP_DIR_RE.match(keep.name).group(1))
    newer = [path for step, path in found if step > keep_step]
    if newer:
        logger.warning(
            "checkpoints with higher steps than the one just saved exist (%s); they are from another run in this "
            "directory and a resume would pick them",
            ", ".join(p.name for p in newer),
        )
    if keep_last_n <= 0:
        return
    older = [path for step, path in found if path != keep]
    for path in older[: max(0, len(older) - (keep_last_n - 1))]:
        logger.info("deleting old checkpoint %s (keep_last_n=%d)", path, keep_last_n)
        shutil.rmtree(path)


# -------------------------------------------------------------------------------------------------------------
# Run checkpoints: load and resume


def _dcp_call(fn, state: dict[str, Any], *, checkpoint_id: Path) -> None:
    if _dist_active():
        fn(state, checkpoint_id=str(checkpoint_id))
        return
    with warnings.catch_warnings():
        # Single process is the intended mode here; DCP warns about it unconditionally.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        fn(state, checkpoint_id=str(checkpoint_id), no_dist=True)


def _iter_tensor_paths(tree: Any, path: tuple = ()) -> Iterator[tuple[tuple, torch.Tensor]]:
    if isinstance(tree, torch.Tensor):
        yield path, tree
    elif isinstance(tree, Mapping):
        for key, value in tree.items():
            yield from _iter_tensor_paths(value, (*path, key))
    elif isinstance(tree, (list, tuple)):
        for index, value in enumerate(tree):
            yield from _iter_tensor_paths(value, (*path, index))


def _has_path(tree: Any, path: tuple) -> bool:
    for key in path:
        if isinstance(tree, Mapping) and key in tree:
            tree = tree[key]
        elif isinstance(tree, (list, tuple)) and isinstance(key, int) and 0 <= key < len(tree):
            tree = tree[key]
        else:
            return False
    return True


def _check_template(path: Path, template: dict[str, Any], *, strict: bool) -> None:
    """Compare the template with the checkpoint's DCP metadata and fail with every difference listed."""
    saved = _read_dcp_metadata(path)
    paths = saved.planner_data
    if not isinstance(paths, dict):
        return  # not written by the default planner: leave the checks to DCP
    saved_tensors = {
        tuple(paths[name]): meta
        for name, meta in saved.state_dict_metadata.items()
        if isinstance(meta, TensorStorageMetadata) and name in paths
    }
    template_tensors = dict(_iter_tensor_paths(template))

    def dotted(key: tuple) -> str:
        return ".".join(str(part) for part in key)

    missing = sorted(dotted(k) for k in template_tensors if k not in saved_tensors)
    mismatched = sorted(
        f"{dotted(k)}: checkpoint {tuple(saved_tensors[k].size)} vs template {tuple(t.shape)}"
        for k, t in template_tensors.items()
        if k in saved_tensors and tuple(saved_tensors[k].size) != tuple(t.shape)
    )
    unexpected: list[str] = []
    if strict:
        unexpected = sorted(dotted(k) for k in saved_tensors if k not in template_tensors)
        unexpected += sorted(
            name
            for name, meta in saved.state_dict_metadata.items()
            if isinstance(meta, BytesStorageMetadata) and name in paths and not _has_path(template, tuple(paths[name]))
        )
    if missing or mismatched or unexpected:
        parts = [f"{path}: the checkpoint does not match the state it is loaded into."]
        if missing:
            parts.append(f"missing from the checkpoint ({len(missing)}): {_abbreviate(missing)}")
        if unexpected:
            parts.append(f"in the checkpoint but not in the state ({len(unexpected)}): {_abbreviate(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatches ({len(mismatched)}): {_abbreviate(mismatched)}")
        raise ValueError("\n  ".join(parts))
    cast = [
        f"{dotted(k)} ({saved_tensors[k].properties.dtype} -> {t.dtype})"
        for k, t in template_tensors.items()
        if saved_tensors[k].properties.dtype != t.dtype
    ]
    if cast:
        logger.warning("%s: tensors are cast on load: %s", path, _abbreviate(cast))


class UnreadableCheckpointError(ValueError):
    """A checkpoint's files cannot be read (corrupt, truncated or missing), as opposed to a readable checkpoint
    that does not fit the run (a config or shape mismatch)."""


def _read_dcp_metadata(path: Path):
    try:
        return dcp.FileSystemReader(str(path)).read_metadata()
    except Exception as exc:  # pickle, EOF, OS errors...: whatever a damaged file raises
        raise UnreadableCheckpointError(f"DCP's '{_DCP_METADATA_FILENAME}' cannot be read "
                                        f"({describe_exception(exc)})") from exc


def _abbreviate(items: list[str], limit: int = 20) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def load_checkpoint(
    path: str | Path, state_template: dict[str, Any], *, strict: bool = True
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load a checkpoint directory into ``state_template``, in place, and return ``(state_template, extra)``.

    Collective when a process group is initialised (every rank calls it); a single process works without one.
    The template must be an initialised state of the right structure (build it with the normal init, never
    ``dataclasses.asdict``, which copies tensors so the in-place load would fill the copies). Its tensors are
    overwritten in place (DTensors get their own shards, whatever the world size at save time); non-tensor
    leaves are replaced in their dicts. Missing tensors and shape mismatches are a ``ValueError`` listing them;
    with ``strict`` (default) so is anything saved that the template has no place for.
    """
    path = Path(path)
    metadata = read_checkpoint_metadata(path)
    _check_template(path, state_template, strict=strict)
    _dcp_call(dcp.load, state_template, checkpoint_id=path)
    return state_template, dict(metadata.get("extra") or {})


class Restored(NamedTuple):
    """What :func:`resume_checkpoint` found and loaded."""

    path: Path
    step: int
    state: dict[str, Any]
    extra: dict[str, Any]


def resume_checkpoint(
    run_dir: str | Path,
    state_template: dict[str, Any],
    *,
    config: Mapping[str, Any] | None = None,
    critical_fields: Sequence[str] = CRITICAL_CONFIG_FIELDS,
) -> Restored | None:
    """Load the newest complete and readable checkpoint of a run into ``state_template``; ``None`` if the run has
    no checkpoint directory at all.

    Collective (every rank calls it). Leftovers of interrupted saves are removed first. Checkpoints are tried
    newest first: one that is incomplete (a ``step_X`` directory without DCP's ``.metadata`` or our
    ``metadata.json``) or cannot be read (corrupt or truncated files) is reported with its reason, and once an
    older one loads, each such directory is moved aside to ``step_X.unreadable`` (kept, never deleted or
    overwritten) with a warning naming it and the checkpoint used instead. If none loads, a ``ValueError`` names
    every one and why (nothing is moved). A readable checkpoint that does not fit (config change in a critical
    field, checked with :func:`check_config_compatible` before anything is loaded, or tensor shapes) is an error
    at once: an older checkpoint of the same run would not fit either.
    """
    if _rank() == 0:
        cleanup_incomplete(run_dir)
    _barrier()
    candidates = step_directories(run_dir)
    if not candidates:
        return None
    failures: list[tuple[Path, str]] = []
    for _, path in reversed(candidates):
        # Every rank must take the same branch (a load is collective): agree on each outcome.
        reason = _agreed(_precheck(path, state_template, config, critical_fields))
        if reason is None:
            try:
                _dcp_call(dcp.load, state_template, checkpoint_id=path)
            except (Exception, CheckpointException) as exc:  # CheckpointException is a BaseException
                reason = f"loading failed: {describe_exception(exc)}"
            reason = _agreed(reason)
        if reason is not None:
            logger.warning("checkpoint %s cannot be used: %s", path, reason)
            failures.append((path, reason))
            continue
        metadata = read_checkpoint_metadata(path)
        if failures:
            moved = []
            if _rank() == 0:
                moved = [f"{bad} -> {_move_aside(bad).name} ({why})" for bad, why in failures]
            _barrier()
            logger.warning("resuming from the older checkpoint %s (step %d) because newer ones could not be used; "
                           "they were moved aside (kept, not deleted): %s. The steps after %d will be trained again.",
                           path, metadata["step"], "; ".join(moved) or "see rank 0", metadata["step"])
        logger.info("resumed from %s (step %d)", path, metadata["step"])
        return Restored(path=path, step=metadata["step"], state=state_template,
                        extra=dict(metadata.get("extra") or {}))
    listing = "\n  ".join(f"{path.name}: {why}" for path, why in failures)
    raise ValueError(
        f"cannot resume: no checkpoint in {_checkpoints_dir(run_dir)} can be loaded:\n  {listing}\nMove these "
        "folders out of the way to start from scratch (or use another --output_dir); nothing was changed."
    )


def _agreed(reason: str | None) -> str | None:
    """The first non-None reason of any rank (every rank gets the same answer)."""
    return next((r for r in gather_objects(reason) if r is not None), None)


def _precheck(
    path: Path, template: dict[str, Any], config: Mapping[str, Any] | None, critical_fields: Sequence[str]
) -> str | None:
    """Why ``path`` cannot be read (None if it looks loadable). Raises ``ValueError`` if it is readable but does
    not fit this run."""
    reason = _incomplete_reason(path)
    if reason is not None:
        return reason
    try:
        metadata = read_checkpoint_metadata(path)
    except ValueError as exc:
        return str(exc)
    if config is not None:
        saved_config = metadata.get("config")
        if saved_config is None:
            logger.warning("%s was saved without a config; cannot check that the current config matches", path)
        elif metadata.get("config_fingerprint") != config_fingerprint(config):
            check_config_compatible(saved_config, config, critical_fields=critical_fields, source=path)
    try:
        _check_template(path, template, strict=True)
    except UnreadableCheckpointError as exc:
        return str(exc)
    return None


# -------------------------------------------------------------------------------------------------------------
# LoRA export (reading every LoRA layout lives in ltxf.lora_formats)

LORA_METADATA_RANK = "ltxf_lora_rank"
LORA_METADATA_TRAINING_ALPHA = "ltxf_training_alpha"
"""The run's ``lora.alpha``, for the record only: the scale ``alpha / rank`` is already folded into lora_B (a name
no loader reads, unlike ``lora_alpha`` / ``ss_network_alpha``, which loaders would apply a second time)."""
LORA_METADATA_FOLDED_SCALE = "ltxf_scale_folded_into_lora_B"


def _split_lora_key(key: str) -> tuple[str, str] | None:
    for suffix in (_LORA_A_SUFFIX, _LORA_B_SUFFIX, _ALPHA_SUFFIX):
        if key.endswith(suffix):
            return key[: -len(suffix)], suffix
    return None


def _check_full_tensor(key: str, tensor: torch.Tensor) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"LoRA tensor '{key}' must be a torch.Tensor, got {type(tensor).__name__}")
    if type(tensor) is not torch.Tensor and hasattr(tensor, "full_tensor"):
        raise ValueError(
            f"LoRA tensor '{key}' is a sharded DTensor; gather it first (call .full_tensor() on every rank) and "
            "export from rank 0"
        )


def export_lora(
    path: str | Path,
    lora_tensors: Mapping[str, torch.Tensor],
    *,
    rank: int,
    alpha: float,
    dtype: torch.dtype = torch.bfloat16,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write trained LoRA adapters in the ComfyUI / ltx-core layout, with the training scale folded into lora_B.

    ``lora_tensors`` maps ``<module>.lora_A.weight`` ([rank, in]) and ``<module>.lora_B.weight`` ([out, rank])
    to full (not sharded) tensors, keys without prefix (a leading ``diffusion_model.`` is accepted). The trained
    model is ``W + (alpha / rank) * B @ A``. The file holds ``diffusion_model.<module>.lora_A.weight = A`` and
    ``...lora_B.weight = (alpha / rank) * B`` (computed in fp32, then cast to ``dtype``) and no ``.alpha`` keys,
    the layout of Lightricks' own LoRAs: every loader then applies ``W + strength * B @ A`` and gets the trained
    model -- ltx-core (never scales), ComfyUI (scale 1 without an alpha key) and diffusers (whose loader refuses
    keys without "lora" in them, such as ``.alpha``, and takes ``alpha = rank`` without adapter metadata).

    Safetensors metadata: ``metadata`` (strings, e.g. ``reference_downscale_factor`` for IC-LoRAs, read by the
    official pipelines), plus :data:`LORA_METADATA_RANK`, :data:`LORA_METADATA_TRAINING_ALPHA` and
    :data:`LORA_METADATA_FOLDED_SCALE` (records, under names no loader reads). Written to a temporary file and
    renamed.
    """
    path = Path(path)
    if rank < 1:
        raise ValueError(f"export_lora: rank must be >= 1, got {rank}")
    if not alpha > 0:
        raise ValueError(f"export_lora: alpha must be > 0, got {alpha}")
    metadata = dict(metadata or {})
    bad_meta = {k: type(v).__name__ for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)}
    if bad_meta:
        raise ValueError(f"export_lora: safetensors metadata must map str to str, got non-strings for {bad_meta}")
    if not lora_tensors:
        raise ValueError("export_lora: no LoRA tensors given")

    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in lora_tensors.items():
        _check_full_tensor(key, tensor)
        name = key[len(COMFY_LORA_PREFIX) :] if key.startswith(COMFY_LORA_PREFIX) else key
        split = _split_lora_key(name)
        if split is None or split[1] == _ALPHA_SUFFIX:
            raise ValueError(
                f"export_lora: unexpected key '{key}'; expected '<module>{_LORA_A_SUFFIX}' or "
                f"'<module>{_LORA_B_SUFFIX}'"
            )
        modules.setdefault(split[0], {})[split[1]] = tensor

    scale = alpha / rank
    out: dict[str, torch.Tensor] = {}
    for module, parts in sorted(modules.items()):
        if set(parts) != {_LORA_A_SUFFIX, _LORA_B_SUFFIX}:
            raise ValueError(f"export_lora: module '{module}' needs both lora_A and lora_B, got {sorted(parts)}")
        a, b = parts[_LORA_A_SUFFIX], parts[_LORA_B_SUFFIX]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise ValueError(
                f"export_lora: module '{module}': expected lora_A [rank={rank}, in] and lora_B [out, rank={rank}], "
                f"got {tuple(a.shape)} and {tuple(b.shape)}"
            )
        a = a.detach().to("cpu", torch.float32)
        b = b.detach().to("cpu", torch.float32)
        out[f"{COMFY_LORA_PREFIX}{module}{_LORA_A_SUFFIX}"] = a.to(dtype).contiguous()
        out[f"{COMFY_LORA_PREFIX}{module}{_LORA_B_SUFFIX}"] = (b * scale).to(dtype).contiguous()

    file_metadata = {
        **metadata,
        LORA_METADATA_RANK: str(rank),
        LORA_METADATA_TRAINING_ALPHA: repr(float(alpha)),
        LORA_METADATA_FOLDED_SCALE: repr(scale),
        "format": "pt",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + _TMP_SUFFIX)
    save_file(out, str(tmp), metadata=file_metadata)
    tmp.replace(path)
    logger.info("exported LoRA (%d modules, rank %d, alpha %g) to %s", len(modules), rank, alpha, path)
    return path


# -------------------------------------------------------------------------------------------------------------
# Full-model export


def export_full_model(
    path: str | Path,
    transformer_state: Mapping[str, torch.Tensor],
    config: Mapping[str, Any] | None = None,
    *,
    dtype: torch.dtype = torch.bfloat16,
    base_checkpoint: str | Path | None = None,
    connectors: Mapping[str, torch.Tensor] | None = None,
    extra_metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write fine-tuned weights as an official single-file checkpoint (real safetensors, written atomically).

    ``transformer_state`` holds full (gathered) tensors keyed by state-dict names without prefix; they are
    written as ``model.diffusion_model.<name>``. ``connectors`` (trained text connectors, keys
    ``video_embeddings_connector.*`` / ``audio_embeddings_connector.*``) go under the same prefix, their official
    names. Both are cast to ``dtype`` (floating point only).

    With ``base_checkpoint`` (what the trainer passes) the result is a whole checkpoint that replaces the base
    file anywhere: every tensor of the base that was not trained (video VAE, audio VAE, vocoder, text projection,
    untrained connectors, any other) is copied unchanged, in its own dtype, and the base's metadata is kept
    (``config``, ``model_version``, ``license`` and anything else; ``config`` replaced only if given). Trained
    names that the base lacks are a ``ValueError``. Without a base the file holds only what is given, with
    ``config`` (which must have a ``transformer`` section) as its metadata; a warning says it is not a whole
    checkpoint. ``extra_metadata`` entries are added last.
    """
    path = Path(path)
    metadata: dict[str, str] = {}
    if base_checkpoint is not None:
        metadata = read_metadata(base_checkpoint)
        if config is None:
            config = read_config(base_checkpoint)
    elif config is None:
        raise ValueError("export_full_model: pass the model config or a base_checkpoint to take it from")
    if not isinstance(config.get("transformer"), Mapping):
        raise ValueError(
            f"export_full_model: the config must be a full checkpoint config with a 'transformer' section, got "
            f"sections {sorted(config)}"
        )
    bad_connectors = sorted(k for k in (connectors or {}) if not k.startswith(TEXT_CONNECTOR_SUBPREFIXES))
    if bad_connectors:
        raise ValueError(f"export_full_model: connector keys must start with one of {TEXT_CONNECTOR_SUBPREFIXES}, "
                         f"got {_abbreviate(bad_connectors)}")
    tensors: dict[str, torch.Tensor] = {}
    for key, tensor in [*transformer_state.items(), *(connectors or {}).items()]:
        _check_full_tensor(key, tensor)
        tensor = tensor.detach()
        if tensor.is_floating_point() and tensor.dtype != dtype:
            tensor = tensor.to(dtype)
        tensors[TRANSFORMER_PREFIX + key] = tensor
    if base_checkpoint is not None:
        base_keys: set[str] = set()

        def select(key: str) -> str | None:
            base_keys.add(key)
            return None if key in tensors else key

        copied = read_tensors(base_checkpoint, select)
        new = sorted(k for k in tensors if k not in base_keys)
        if new:
            raise ValueError(
                f"export_full_model: {len(new)} tensors are not in the base checkpoint {base_checkpoint} "
                f"(strict loading would reject the file): {_abbreviate(new)}"
            )
        tensors.update(copied)
    else:
        logger.warning("export_full_model: no base checkpoint given, so %s holds only the trained tensors (not a "
                       "whole checkpoint: no VAEs, vocoder or text projection)", path)
    metadata.pop("config", None)  # written from ``config``
    metadata.update(extra_metadata or {})
    write_checkpoint(path, tensors, config, metadata)
    logger.info("exported full model (%d tensors) to %s", len(tensors), path)
    return path
