"""Fit a TRL trainer (SFT, reward): in this process, or as a Ray Train job on the pipeline's cluster.

A `ray` block that asks for more than one worker or a GPU runs the trainer
inside a `TorchTrainer`, with Ray's Hugging Face integration
(`prepare_trainer` and `RayTrainReportCallback`): each worker builds the
same trainer, the Trainer shards the data over the process group Ray set up,
and every checkpoint the Trainer saves is reported to Ray Train, under a run
named after the stage fingerprint, so re-entering the stage resumes from the
newest one. Otherwise the trainer runs here and resumes from its own newest
checkpoint in the work dir. Either way rank 0 logs to the stage's MLflow run
and writes the trained model to the outputs.

`make_trainer(output_dir)` builds `(trainer, tokenizer)` from plain values:
it is pickled to the workers, which may be on other nodes (with this project
installed and the home on shared storage). Each worker saves into its own
`output_dir`, and Ray Train merges what they report (rank 0: weights,
optimizer, trainer state; every rank: its RNG state) into one checkpoint.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from rlhf import cluster as rlhf_cluster
from rlhf import training
from rlhf.config import RayConfig
from rlhf.seeding import seed_everything

@dataclass
class Fitted:
    """What the stage reports about the training it ran (this attempt, when it resumed)."""

    train_loss: float
    steps: int
    resumed_from_step: int
    tokens_per_second: float
    peak_rss_mb: float  # per worker
    parameters: int
    eval: dict[str, float]  # the final evaluation
    first_eval_loss: float | None


def fit(make_trainer: Callable, cluster: RayConfig, *, name: str, work: Path, outputs: Path, seed: int, mlflow_uri: str,
        mlflow_run_id: str) -> Fitted:
    """Train, evaluate and save the model (and adapter) to `outputs`."""
    if not cluster.trains_on_ray():
        checkpoint, resumed_from_step = training.resume_point(work / "trainer")
        seed_everything(seed)  # heads and adapters start the same here and on Ray workers
        trainer, tokenizer = make_trainer(work / "trainer")
        return _train(trainer, tokenizer, checkpoint, resumed_from_step, outputs)

    from ray.train import CheckpointConfig, RunConfig

    rlhf_cluster.train(
        cluster,
        _train_loop,
        {
            "make_trainer": make_trainer, "outputs": str(outputs), "fitted": str(work / _FITTED),
            "trainer_dir": str(work / "trainer"), "seed": seed, "threads": cluster.cpus_per_worker,
            "mlflow_uri": mlflow_uri, "mlflow_run_id": mlflow_run_id,
        },
        RunConfig(name=name, storage_path=str(work / "ray"), checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    return Fitted(**json.loads((work / _FITTED).read_text()))


_FITTED = "fitted.json"  # how rank 0 hands its figures to the driver


def _train(trainer, tokenizer, checkpoint: str | None, resumed_from_step: int, outputs: Path) -> Fitted:
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # its raw dicts go to the stage's log instead
    trainer.add_callback(training.StageProgress())
    trainer.add_callback(training.SealCheckpoints())
    result = trainer.train(resume_from_checkpoint=checkpoint)
    final = trainer.evaluate()
    if trainer.is_world_process_zero():
        training.save_policy(trainer, tokenizer, outputs)
    history = trainer.state.log_history
    return Fitted(
        train_loss=result.training_loss,
        # resumed from the final checkpoint, transformers counts one step it does not take
        steps=min(trainer.state.global_step, trainer.state.max_steps),
        resumed_from_step=resumed_from_step,
        tokens_per_second=training.tokens_per_second(history, resumed_from_step, result.metrics["train_runtime"]),
        peak_rss_mb=training.peak_rss_mb(),
        parameters=trainer.model.num_parameters(),
        eval={k: v for k, v in final.items() if isinstance(v, (int, float))},
        first_eval_loss=next((entry["eval_loss"] for entry in history if "eval_loss" in entry), None),
    )


def _train_loop(config: dict) -> None:
    """One Ray Train worker: build the trainer, resume from Ray's newest checkpoint, train; rank 0 logs and saves."""
    import mlflow
    import ray.train
    import ray.train.torch
    import torch
    from ray.train.huggingface.transformers import RayTrainReportCallback, prepare_trainer

    logging.getLogger("ray.train").setLevel(logging.WARNING)
    torch.set_num_threads(config["threads"])
    context = ray.train.get_context()
    rank = context.get_world_rank()
    print(f"{context.get_experiment_name()}: worker {rank} of {context.get_world_size()} "
          f"on Ray node {ray.get_runtime_context().get_node_id()} ({ray.train.torch.get_device()})", flush=True)
    seed_everything(config["seed"])  # the same initial heads and adapters on every worker
    trainer, tokenizer = config["make_trainer"](Path(config["trainer_dir"]) / f"rank-{rank}")
    trainer.add_callback(RayTrainReportCallback())
    trainer = prepare_trainer(trainer)

    if rank == 0:  # the Trainer's MLflow callback logs into the active run, on rank 0 only
        mlflow.set_tracking_uri(config["mlflow_uri"])
        mlflow.start_run(run_id=config["mlflow_run_id"])
    try:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            fitted = _train(trainer, tokenizer, None, 0, Path(config["outputs"]))
        else:
            with checkpoint.as_directory() as directory:
                hf_checkpoint = Path(directory) / RayTrainReportCallback.CHECKPOINT_NAME
                step = json.loads((hf_checkpoint / "trainer_state.json").read_text())["global_step"]
                if rank == 0:
                    print(f"resuming from {checkpoint.path} (step {step})", flush=True)
                fitted = _train(trainer, tokenizer, str(hf_checkpoint), step, Path(config["outputs"]))
    finally:
        if rank == 0:
            mlflow.end_run(status="RUNNING")  # the driver still owns the stage run and ends it
    if rank == 0:
        Path(config["fitted"]).write_text(json.dumps(asdict(fitted)))
