"""What the SFT and reward stages share around the TRL trainers: arguments, LoRA, checkpoints."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from transformers import TrainerCallback

from rlhf import models, progress, stage_log
from rlhf.config import Adapter, Lora, PrefixTuning, PromptTuning, Training
from rlhf.store import digest_tree

log = logging.getLogger("rlhf")


def trainer_arguments(config: Training, seed: int, output_dir: Path, workers: int, rows: int) -> dict:
    """Keyword arguments for SFTConfig / RewardConfig from a stage's typed block, `trainer_args` last.

    `batch_size` is the batch of one optimiser step over all `workers`; `rows` is the training set's size.
    """
    # TRL tokenizes the whole training set first (10 s for the demo's 18k rows on 2 cores); a process pool
    # takes about a second to start, more than it saves on a few thousand rows
    processes = {"dataset_num_proc": torch.get_num_threads()} if rows >= 10_000 else {}
    return _typed_arguments(config, seed, output_dir, workers) | processes | config.trainer_args


def _typed_arguments(config: Training, seed: int, output_dir: Path, workers: int = 1) -> dict:
    on_gpu = torch.cuda.is_available()
    return dict(
        output_dir=str(output_dir),
        learning_rate=config.learning_rate,
        per_device_train_batch_size=config.batch_size // workers,
        per_device_eval_batch_size=config.batch_size // workers,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        lr_scheduler_type="cosine",
        warmup_steps=config.warmup_ratio,  # a float below 1 is a share of all steps
        weight_decay=config.weight_decay,
        max_length=config.max_length,
        eval_strategy="steps",
        eval_steps=config.eval_steps,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        logging_steps=config.logging_steps,
        report_to=["mlflow"],
        seed=seed,
        data_seed=seed,
        use_cpu=not on_gpu,
        bf16=config.precision == "bf16",  # autocast: the weights and optimizer state stay fp32
        **{_CHECKPOINTING: config.gradient_checkpointing},
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        dataloader_num_workers=0,
        disable_tqdm=True,  # the stage's progress display shows the steps (`StageProgress`)
    )


def _checkpointing_argument() -> str:
    """transformers renamed `gradient_checkpointing` (deprecated from 5.2x on, warning at every trainer)."""
    from transformers import TrainingArguments

    return "activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__ else "gradient_checkpointing"


_CHECKPOINTING = _checkpointing_argument()


class StageProgress(TrainerCallback):
    """The trainer's steps to the stage's progress display, its raw log lines to the stage's log file."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            losses = [entry["loss"] for entry in state.log_history if "loss" in entry]
            progress.report("training", state.global_step, state.max_steps, **({"loss": losses[-1]} if losses else {}))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero:
            stage_log.detail.info("step %d: %s", state.global_step, logs)


def check_trainer_args(config_class: str, extra: dict) -> None:
    """Raise ValueError unless TRL's `config_class` accepts `extra` beside the keys the typed block sets."""
    import dataclasses
    import tempfile

    import trl

    from rlhf.config import Training

    cls = getattr(trl, config_class)
    typed = _typed_arguments(Training(learning_rate=1e-3), 0, Path(tempfile.gettempdir()))
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    for key in extra:
        if key in typed:
            raise ValueError(f"'{key}' is set by this stage's own keys; use those instead")
        if key not in known:
            raise ValueError(f"'{key}' is not an argument of trl.{config_class}")
    try:
        cls(**typed | extra)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"trl.{config_class} refuses them: {exc}".replace("\n", " ")) from None


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


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (the stage's, when it runs first or alone)."""
    import resource

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