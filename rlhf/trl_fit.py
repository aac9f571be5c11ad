"""Fit a TRL trainer (SFT, reward, DPO): in this process, or as a Ray Train job on the pipeline's cluster
(`rlhf/session.py` decides, as for the RL stages).

On Ray Train the trainer runs inside a `TorchTrainer`, with Ray's Hugging Face integration
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
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
import torch

from rlhf import precision, session, training
from rlhf.cluster import RayConfig
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
    """Train, evaluate and save the model (and adapter) to `outputs`, here or on Ray Train (`rlhf/session.py`)."""
    session.run(cluster, _train_loop, {
        "make_trainer": make_trainer, "outputs": str(outputs), "fitted": str(work / _FITTED), "name": name,
        "trainer_dir": str(work / "trainer"), "seed": seed, "threads": cluster.cpus_per_worker,
        "mlflow_uri": mlflow_uri, "mlflow_run_id": mlflow_run_id,
    }, name=name, storage=work / "ray", keep=2)
    return Fitted(**json.loads((work / _FITTED).read_text()))


_FITTED = "fitted.json"  # how rank 0 hands its figures to the driver


def _train(trainer, tokenizer, checkpoint: str | None, resumed_from_step: int, outputs: Path) -> Fitted:
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # its raw dicts go to the stage's log instead
    trainer.add_callback(training.StageProgress())
    trainer.add_callback(training.SealCheckpoints())
    result = trainer.train(resume_from_checkpoint=checkpoint)
    final = _final_evaluation(trainer)
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


def _final_evaluation(trainer) -> dict:
    """The evaluation of the trained model: the one the schedule ran at the last step, else a new one (on SmolLM2's
    reward stage a second pass over the same rows took 10 s)."""
    at_end = [e for e in trainer.state.log_history if "eval_loss" in e and e["step"] == trainer.state.global_step]
    return {k: v for k, v in at_end[-1].items() if k != "step"} if at_end else trainer.evaluate()


def _train_loop(config: dict, session) -> None:
    """One worker: build the trainer, resume from the newest checkpoint, train; rank 0 logs and saves.

    In this process the Trainer keeps its own checkpoints (sealed, `training.resume_point`) and logs into the
    stage's active MLflow run; on Ray Train each checkpoint it saves is reported to Ray Train, and rank 0 joins
    the stage's run by id (driver environment variables do not reach the workers)."""
    training.reset_peak_rss()  # in the driver's process, the stages before this one set their own peaks
    torch.set_num_threads(config["threads"])
    session.say(f"{config['name']}: worker {session.rank} of {session.world} {session.place} ({session.device})")
    seed_everything(config["seed"])  # the same initial heads and adapters on every worker
    trainer_dir = Path(config["trainer_dir"]) / f"rank-{session.rank}"
    trainer, tokenizer = config["make_trainer"](trainer_dir)
    chosen = "bf16" if trainer.args.bf16 else "fp32"
    session.say(f"{config['name']}: {precision.describe(chosen, session.device)}")
    if session.remote:
        from ray.train.huggingface.transformers import RayTrainReportCallback, prepare_trainer

        trainer.add_callback(RayTrainReportCallback())
        trainer = prepare_trainer(trainer)
        if session.rank == 0:  # the Trainer's MLflow callback logs into the active run, on rank 0 only
            mlflow.set_tracking_uri(config["mlflow_uri"])
            mlflow.start_run(run_id=config["mlflow_run_id"])
    if session.rank == 0:
        mlflow.log_param("precision_chosen", chosen)
    try:
        with session.restored() as directory:
            if directory is not None:  # Ray Train's, holding the Trainer's checkpoint
                checkpoint = directory / RayTrainReportCallback.CHECKPOINT_NAME
                step = json.loads((checkpoint / "trainer_state.json").read_text())["global_step"]
                session.say(f"resuming from {directory} (step {step})")
                checkpoint = str(checkpoint)
            else:
                checkpoint, step = training.resume_point(trainer_dir) if not session.remote else (None, 0)
            fitted = _train(trainer, tokenizer, checkpoint, step, Path(config["outputs"]))
    finally:
        if session.remote and session.rank == 0:
            mlflow.end_run(status="RUNNING")  # the driver still owns the stage run and ends it
    if session.rank == 0:
        Path(config["fitted"]).write_text(json.dumps(asdict(fitted)))
