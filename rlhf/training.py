"""What the SFT and reward stages share around the TRL trainers: arguments, LoRA, checkpoints."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import json
import logging
import resource
import shutil
import sys
from pathlib import Path

from transformers import TrainerCallback

from rlhf import models, progress, stage_log
from rlhf.blocks import Adapter, Lora, PrefixTuning, PromptTuning
from rlhf.store import digest_tree

log = logging.getLogger("rlhf")


class StageProgress(TrainerCallback):
    """The trainer's steps to the stage's progress display, its raw log lines to the stage's log file."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            losses = [entry["loss"] for entry in state.log_history if "loss" in entry]
            progress.report("training", state.global_step, state.max_steps, **({"loss": losses[-1]} if losses else {}))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero:
            stage_log.detail.info("step %d: %s", state.global_step, logs)


def peft_config(adapter: Lora | Adapter | None, task_type: str, modules_to_save: list[str] | None = None,
                base: Path | None = None):
    """peft's config for an adapter block (a bare `Lora` block is LoRA); None trains the whole model.
    `base` is the model directory whose tokenizer turns a prompt-tuning `init_text` into tokens."""
    import peft

    if adapter is None:
        return None
    if isinstance(adapter, Lora):
        return peft.LoraConfig(r=adapter.r, lora_alpha=adapter.alpha, lora_dropout=adapter.dropout,
                               target_modules=adapter.target_modules, task_type=task_type, modules_to_save=modules_to_save)
    common = {"num_virtual_tokens": adapter.virtual_tokens, "task_type": task_type}
    if isinstance(adapter, PromptTuning):
        if adapter.init_text is None:
            return peft.PromptTuningConfig(**common)
        return peft.PromptTuningConfig(**common, prompt_tuning_init="TEXT", prompt_tuning_init_text=adapter.init_text,
                                       tokenizer_name_or_path=str(base))
    if isinstance(adapter, PrefixTuning):
        return peft.PrefixTuningConfig(**common, prefix_projection=adapter.projection,
                                       encoder_hidden_size=adapter.projection_hidden_size)
    return peft.PromptEncoderConfig(**common, encoder_reparameterization_type=adapter.encoder,
                                    encoder_hidden_size=adapter.encoder_hidden_size)


class SealCheckpoints(TrainerCallback):
    """After the Trainer saves a checkpoint, record the digest of its files beside it (`checkpoint-N.sha256`)."""

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            for seal in Path(args.output_dir).glob(f"checkpoint-*{SEAL}"):  # of checkpoints the Trainer rotated out
                if not seal.with_suffix("").is_dir():
                    seal.unlink()
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            Path(f"{checkpoint}{SEAL}").write_text(digest_tree(checkpoint))


SEAL = ".sha256"


def resume_point(trainer_dir: Path) -> tuple[str | None, int]:
    """The newest sound HF checkpoint in the work dir and its step (None, 0 when starting fresh).

    A checkpoint counts when its files still have the digest recorded after it
    was saved: one a crash cut short has no seal, and one damaged since (a
    full disk, a truncated file) is reported and passed over for the one before.
    """
    complete = []
    for checkpoint in trainer_dir.glob("checkpoint-*") if trainer_dir.is_dir() else ():
        seal = Path(f"{checkpoint}{SEAL}")
        if not checkpoint.is_dir() or not seal.exists():
            continue
        if seal.read_text() != digest_tree(checkpoint):
            log.warning("%s is damaged: its files changed since it was saved; resuming from an earlier one", checkpoint)
            continue
        step = json.loads((checkpoint / "trainer_state.json").read_text())["global_step"]
        complete.append((step, checkpoint))
    if not complete:
        return None, 0
    step, checkpoint = max(complete)
    log.info("resuming from %s (step %d)", checkpoint, step)
    return str(checkpoint), step


def eval_subset(dataset, rows: int, seed: int):
    return dataset.shuffle(seed=seed).select(range(min(rows, len(dataset))))


def tokens_per_second(log_history: list[dict], resumed_from_step: int, runtime: float) -> float:
    """Training tokens per second of this attempt, from TRL's cumulative `num_tokens` log."""
    counts = [(entry["step"], entry["num_tokens"]) for entry in log_history if "num_tokens" in entry]
    if not counts or runtime <= 0:
        return 0.0
    before = max((n for step, n in counts if step <= resumed_from_step), default=0.0)
    return (counts[-1][1] - before) / runtime


_CLEAR_REFS, _STATUS = Path("/proc/self/clear_refs"), Path("/proc/self/status")
_LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if sys.platform.startswith("linux") else None


def release_freed() -> None:
    """Give what this process has freed back to the system: glibc keeps it otherwise (after SmolLM2's reward
    stage, 4.2 GB resident against 1.6 GB after this)."""
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def reset_peak_rss() -> None:
    """Start this process's peak resident memory afresh, where Linux lets it (`/proc/self/clear_refs`): a stage
    that runs in the driver after others reports its own peak, not theirs."""
    release_freed()
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    """This process's peak resident memory since `reset_peak_rss` (Linux's VmHWM), or over its life elsewhere."""
    try:
        return next(int(line.split()[1]) / 1024 for line in _STATUS.read_text().splitlines() if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def save_policy(trainer, tokenizer, outputs: Path) -> None:
    """The trained model with its tokenizer in `model/`. A LoRA adapter is kept in `adapter/` and merged
    into `model/`; a prompt-learning adapter cannot be merged: `model/` holds the base model and the
    adapter in `model/prompt/`, which `models.load_causal_lm` applies."""
    model = trainer.model
    if hasattr(model, "peft_config"):
        models.save_adapter(model, outputs / "adapter")
        if model.active_peft_config.is_prompt_learning:
            shutil.copytree(outputs / "adapter", outputs / "model" / models.PROMPT_ADAPTER)
            model = model.get_base_model()
        else:
            model = model.merge_and_unload()
    model.save_pretrained(outputs / "model")
    tokenizer.save_pretrained(outputs / "model")