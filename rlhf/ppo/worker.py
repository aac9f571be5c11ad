"""The RL loop of PPO and its critic-free relatives, on every Ray Train worker or in this process (`session.py`).

Before the first iteration, samples of the starting policy under the stage's
own sampling settings fix the mean and standard deviation that normalise the
reward model's scores. Each iteration: draw the global prompt batch and take
this worker's shard; generate (`samples_per_prompt` responses per prompt);
decode each response up to its EOS and score the text with the frozen reward
model; compute log-probs of actor and reference and, for PPO, the critic's
values; turn scores and KL into advantages by the stage's estimator
(`rollout.py`); then several epochs of clipped updates over shuffled
minibatches (`update.py`). Every loss is a mean over the minibatch's
response tokens on all workers together and gradients are summed across
workers, so any worker count takes the step one worker would take on the
same samples. Rank 0 logs to MLflow and writes checkpoints; every worker's
RNG state (CPU and CUDA) goes into them.
"""

from __future__ import annotations

import gc
import json
import logging
import random
import resource
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from pydantic import TypeAdapter

from rlhf import generation, gold, models, progress
from rlhf.config import Lora, RlConfig, RlStage
from rlhf.data.formats import text_of
from rlhf.errors import InputError
from rlhf.ppo import algorithm as A
from rlhf.ppo import rollout as rollouts
from rlhf.ppo.roles import Roles
from rlhf.ppo.roles import load as load_roles
from rlhf.ppo.rollout import PromptSampler
from rlhf.ppo.session import RaySession
from rlhf.ppo.update import over_workers, update
from rlhf.seeding import seed_everything


def train_loop(config: dict, session=None) -> None:
    """Ray Train entry point (or, with a `LocalSession`, this process); `config` holds only plain values
    (paths, ids, the stage block)."""
    setup_started = time.monotonic()
    if session is None:
        logging.getLogger("ray.train").setLevel(logging.WARNING)  # per-report INFO lines drown the progress lines
        session = RaySession()
    rank, world, device = session.rank, session.world, session.device
    stage = config["stage"]
    session.say(f"{stage}: worker {rank} of {world} {session.place} ({device})")
    rl: RlStage = TypeAdapter(RlConfig).validate_python(config["rl"])
    torch.set_num_threads(config["threads"])
    seed_everything(config["seed"])  # the same LoRA initialisation on every worker, as data parallelism needs

    critic_lora = Lora.model_validate(config["critic_lora"]) if config["critic_lora"] else None
    roles = load_roles(Path(config["policy_model"]), Path(config["reward_model"]), rl, critic_lora, device)
    prompts = config["prompts"]
    gold_reward = gold.named(config["gold"])
    sampling = generation.sampling_config(roles.tokenizer, rl.max_new_tokens, rl.temperature)

    def precision():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=rl.precision == "bf16")

    seed_everything(config["seed"] * 1000 + rank)  # but each worker samples its own rollouts

    steps = rl.iterations * rl.epochs * rl.minibatches
    rates = {"policy": rl.learning_rate, "critic": getattr(rl, "critic_learning_rate", None)}
    # fused: one kernel per tensor, 5x faster than foreach on a fully trained small critic, the same update up to rounding
    optimisers = {name: torch.optim.AdamW(params, lr=rates[name], weight_decay=0.0, fused=True)
                  for name, params in roles.trainable().items()}
    schedulers = {
        name: torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 - step / steps) for name, opt in optimisers.items()
    }
    kl_control = A.KLController(rl.kl.beta, rl.kl.target, rl.kl.horizon)
    sampler = PromptSampler(len(prompts), config["seed"])
    history: list[dict] = []
    start = restored_from = 0

    with session.restored() as directory:
        state = torch.load(directory / "state.pt", weights_only=False) if directory is not None else None
    if state is not None and len(state["rng"]) != world:  # the stage fingerprint covers the worker count: a hand-made mix-up
        raise InputError(f"{directory}: written by {len(state['rng'])} workers, resumed by {world}: each worker's shard and "
                         "random stream would change; resume with the same ray.num_workers or start afresh")
    if state is not None:
        _trainable_load(roles.actor, state["policy"])
        if roles.critic is not None:
            _trainable_load(roles.critic, state["critic"])
        for name in optimisers:
            optimisers[name].load_state_dict(state["optimisers"][name])
            schedulers[name].load_state_dict(state["schedulers"][name])
        kl_control.load_state_dict(state["kl"])
        normalisation = state["normalisation"]
        sampler.position = state["sampler_position"]
        history, start = state["history"], state["iteration"]
        restored_from = start
        _set_rng(state["rng"][rank], device)
        if rank == 0:
            session.say(f"{stage}: resuming at iteration {start} from {directory}")
    else:
        normalisation = rollouts.normalisation(roles, prompts, sampling, precision, rl, config["seed"], rank, world)
        if rank == 0:
            session.say(f"{stage}: starting policy's scores: mean {normalisation['mean']:+.3f}, std {normalisation['std']:.3f} "
                        f"over {normalisation['count']} samples")

    roles.on_score_scale(normalisation, fresh=state is None)

    logger = _MlflowLogger(config["mlflow_uri"], config["mlflow_run_id"], stage) if rank == 0 else None
    gc.collect()
    gc.freeze()  # what setup loaded lives to the end: later collections need not walk it
    finished = time.monotonic()
    for iteration in range(start, rl.iterations):
        shard = [prompts[i] for i in sampler.take(rl.batch_size)[rank::world]]
        batch_prompts = [p for p in shard for _ in range(rl.samples_per_prompt)]  # a prompt's group stays together
        # after a (re)start, what the worker spent before its first iteration: models, normalisation samples
        timings = {"seconds_setup": finished - setup_started} if iteration == start else {}

        clock = time.monotonic()
        with precision():
            query, query_mask, response, mask, ended = rollouts.generate(roles.actor, roles.tokenizer, batch_prompts, sampling, device)
        texts, _ = generation.decode(roles.tokenizer, response)
        timings["seconds_generate"] = time.monotonic() - clock

        clock = time.monotonic()
        with precision():
            rollout = rollouts.score(roles, query, query_mask, response, mask, ended, rl)
            rollout.scores = roles.scores(batch_prompts, texts)
        scores, kl, non_score = rollouts.advantages(rollout, normalisation, kl_control.beta, rl, world)
        timings["seconds_score"] = time.monotonic() - clock

        clock = time.monotonic()
        train_stats, timings["seconds_sync"] = update(roles, optimisers, schedulers, rollout, rl, kl_control.beta, precision, world)
        timings["seconds_train"] = time.monotonic() - clock

        local = {
            "score": rollout.scores.mean(),
            "score_normalised": scores.mean(),
            "non_score_reward": non_score.sum(-1).mean(),
            "reward_total": (scores + non_score.sum(-1)).mean(),
            "kl": kl.sum(-1).mean(),
            "eos_share": rollout.ended.float().mean(),
            "response_length": rollout.mask.sum(-1).mean(),
            "peak_rss_mb": torch.tensor(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            **train_stats,
            **{k: torch.tensor(v) for k, v in timings.items()},
            # since the previous iteration ended: its logging and checkpoint included
            "seconds_iteration": torch.tensor(time.monotonic() - finished),
        }
        if gold_reward is not None:
            local["gold"] = torch.tensor([gold_reward(text_of(p), t) for p, t in zip(batch_prompts, texts)]).mean()
        metrics = over_workers(local, world, device, mean=True) | over_workers(train_stats, world, device, mean=False)
        metrics |= {
            "beta": kl_control.beta,
            "learning_rate": schedulers["policy"].get_last_lr()[0],
            "kl_estimator_k3": float(rl.kl.estimator == "k3"),
            "restored_from": float(restored_from),  # > 0 after a restart: the checkpoint's iteration
        }
        kl_control.update(metrics["kl"], rl.batch_size * rl.samples_per_prompt)  # n counts responses, as in TRL and OpenRLHF
        history.append({"iteration": iteration + 1, **metrics})

        if rank == 0:
            logger.log(metrics, iteration + 1)
            progress.report("iterations", iteration + 1, rl.iterations, score=metrics["score"], kl=metrics["kl"],
                            **({"gold": metrics["gold"]} if "gold" in metrics else {}))
            session.say(
                f"{stage} {iteration + 1}/{rl.iterations}: score {metrics['score']:+.3f}"
                + (f" gold {metrics['gold']:+.3f}" if "gold" in metrics else "")
                + f" kl {metrics['kl']:.2f} beta {metrics['beta']:.3f} len {metrics['response_length']:.1f}"
                + f" ({metrics['seconds_generate']:.1f}s gen, {metrics['seconds_score']:.1f}s score, {metrics['seconds_train']:.1f}s train"
                + (f" of which {metrics['seconds_sync']:.1f}s gradient sync)" if world > 1 else ")")
            )
            if (iteration + 1) % rl.samples_every == 0 or iteration + 1 == rl.iterations:
                logger.samples(batch_prompts, texts, rollout.scores.tolist(), iteration + 1)

        last = iteration + 1 == rl.iterations
        if (iteration + 1) % rl.checkpoint_every == 0 or last:
            rng_states = [None] * world
            dist.all_gather_object(rng_states, _get_rng(device)) if world > 1 else rng_states.__setitem__(0, _get_rng(device))
            state = {
                "iteration": iteration + 1,
                "policy": _trainable_state(roles.actor),
                "critic": _trainable_state(roles.critic) if roles.critic is not None else None,
                "optimisers": {name: opt.state_dict() for name, opt in optimisers.items()},
                "schedulers": {name: s.state_dict() for name, s in schedulers.items()},
                "kl": kl_control.state_dict(),
                "normalisation": normalisation,
                "sampler_position": sampler.position,
                "rng": rng_states,
                "history": history,
            }
            with session.checkpoint(metrics, iteration + 1) as directory:
                if directory is not None:
                    _write_checkpoint(directory, state, roles, last)
        finished = time.monotonic()


# ---------------------------------------------------------------- state


def _trainable_state(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters() if p.requires_grad}


def _trainable_load(model, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def _get_rng(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def _write_checkpoint(directory: Path, state: dict, roles: Roles, last: bool) -> None:
    """The state to resume from; the final checkpoint also holds adapter, critic, tokenizer and history."""
    torch.save(state, directory / "state.pt")
    if last:
        models.save_adapter(roles.actor, directory / "adapter")
        if roles.critic is not None:
            critic = roles.critic.merge_and_unload() if hasattr(roles.critic, "merge_and_unload") else roles.critic
            critic.save_pretrained(directory / "critic")
            roles.tokenizer.save_pretrained(directory / "critic")
        (directory / "history.json").write_text(json.dumps(state["history"]))
        (directory / "normalisation.json").write_text(json.dumps(state["normalisation"]))


class _MlflowLogger:
    """Rank 0's link to the stage's MLflow run, given explicitly: driver env vars don't reach remote workers."""

    def __init__(self, uri: str, run_id: str, stage: str):
        from mlflow import MlflowClient

        self.client, self.run_id, self.stage = MlflowClient(uri), run_id, stage

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(f"{self.stage}/{k}", v, now, step) for k, v in metrics.items()]
        for start in range(0, len(batch), 200):
            self.client.log_batch(self.run_id, metrics=batch[start : start + 200])

    def samples(self, prompts, responses, scores, step: int) -> None:
        table = {"prompt": [text_of(p) for p in prompts], "response": responses, "score": scores}
        self.client.log_table(self.run_id, table, artifact_file=f"{self.stage}/samples/iteration_{step:04d}.json")
