"""The trainer settings of the stages that train with TRL (SFT, reward, DPO): the typed block, and the
keyword arguments of TRL's config classes made from it.

torch, transformers and TRL are imported where they are used, not with this module: loading
`pipelines.yaml` (every `rlhf` command) must not load them.
"""

from __future__ import annotations

import dataclasses
import functools
import tempfile
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field, field_validator

from rlhf.blocks import Precision, StageConfig


class Training(StageConfig):
    """Trainer settings shared by the SFT and reward stages."""

    _trl_config: ClassVar[str]  # the TRL config class `trainer_args` must fit

    learning_rate: float = Field(gt=0, description="the optimiser's peak learning rate (cosine schedule)")
    batch_size: int = Field(32, ge=1, description="examples per optimiser step over all workers")
    epochs: float = Field(1.0, gt=0, description="passes over the training set")
    max_steps: int = Field(-1, description="stop after this many steps; -1 runs all epochs")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="share of the steps that warm the learning rate up")
    weight_decay: float = Field(0.0, ge=0, description="AdamW's weight decay")
    max_length: int = Field(128, ge=8, description="tokens per example, prompt included")
    eval_steps: int = Field(50, ge=1, description="evaluate every N steps")
    eval_rows: int = Field(512, ge=1, description="held-out rows used for each evaluation")
    save_steps: int = Field(50, ge=1, description="checkpoint every N steps (resume point)")
    save_total_limit: int = Field(2, ge=1, description="checkpoints kept on disk")
    logging_steps: int = Field(10, ge=1, description="log the loss every N steps")
    precision: Precision = Field(
        "auto", description="bf16: mixed precision (weights, LoRA and optimizer state stay fp32); auto: bf16 for a pretrained "
        "model where the hardware computes bf16 natively (CUDA, AVX512-BF16, AMX), else fp32"
    )
    gradient_checkpointing: bool = Field(False, description="recompute activations in the backward pass: less memory, more time")
    gradient_accumulation_steps: int = Field(1, ge=1, description="batches accumulated into one step")
    trainer_args: dict[str, Any] = Field({}, description="any other TRL config key, validated by TRL's own class")

    @field_validator("trainer_args")
    @classmethod
    def _trl_accepts(cls, extra: dict[str, Any]) -> dict[str, Any]:
        if extra:
            check_trainer_args(cls._trl_config, extra)
        return extra

    def check(self, name: str, pipeline) -> None:
        workers = pipeline.ray.num_workers
        if self.batch_size % workers:
            raise ValueError(
                f"stages.{name}.batch_size ({self.batch_size}) must be a multiple of ray.num_workers ({workers}): "
                "it is the batch of one step, split equally over the workers"
            )


def trainer_arguments(config: Training, seed: int, output_dir: Path, workers: int, rows: int) -> dict:
    """Keyword arguments for SFTConfig / RewardConfig from a stage's typed block, `trainer_args` last.

    `batch_size` is the batch of one optimiser step over all `workers`; `rows` is the training set's size.
    """
    # TRL tokenizes the whole training set first (10 s for the demo's 18k rows on 2 cores); a process pool
    # takes about a second to start, more than it saves on a few thousand rows
    import torch

    processes = {"dataset_num_proc": torch.get_num_threads()} if rows >= 10_000 else {}
    return _typed_arguments(config, seed, output_dir, workers) | processes | config.trainer_args


def _typed_arguments(config: Training, seed: int, output_dir: Path, workers: int = 1) -> dict:
    import torch

    from rlhf import precision

    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
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
        bf16=precision.choose(config.precision, device) == "bf16",  # autocast: the weights and optimizer state stay fp32
        **{_checkpointing_argument(): config.gradient_checkpointing},
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        dataloader_num_workers=0,
        disable_tqdm=True,  # the stage's progress display shows the steps (`StageProgress`)
    )


@functools.cache
def _checkpointing_argument() -> str:
    """transformers renamed `gradient_checkpointing` (deprecated from 5.2x on, warning at every trainer)."""
    from transformers import TrainingArguments

    return "activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__ else "gradient_checkpointing"


def check_trainer_args(config_class: str, extra: dict) -> None:
    """Raise ValueError unless TRL's `config_class` accepts `extra` beside the keys the typed block sets."""
    import trl

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
