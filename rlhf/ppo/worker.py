"""The RL loop of PPO and its critic-free relatives, on every Ray Train worker or in a process of its own (`rlhf/session.py`).

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
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from rlhf import generation, gold, models, precision, progress, training
from rlhf.blocks import Lora
from rlhf.data.formats import text_of
from rlhf.errors import InputError
from rlhf.ppo import algorithm as A
from rlhf.ppo import rollout as rollouts
from rlhf.ppo.roles import Roles
from rlhf.ppo.roles import load as load_roles
from rlhf.ppo.rollout import PromptSampler
from rlhf.ppo.update import over_workers, update
from rlhf.seeding import seed_everything


def train_loop(config: dict, session) -> None:
    """One worker's loop (`rlhf/session.py` says where); `config` holds paths, ids and the stage's block."""
    setup_started = time.monotonic()
    run = _Run(config, session)
    finished = time.monotonic()
    for iteration in range(run.start, run.rl.iterations):
        # after a (re)start, what the worker spent before its first iteration: models, normalisation samples
        timings = {"seconds_setup": finished - setup_started} if iteration == run.start else {}
        prompts, texts, rollout, rewards = run.roll_out(timings)

        clock = time.monotonic()
        train_stats, timings["seconds_sync"] = update(run.roles, run.optimisers, run.schedulers, rollout, run.rl,
                                                      run.kl_control.beta, run.precision, run.world)
        timings["seconds_train"] = time.monotonic() - clock

        metrics = run.measure(prompts, texts, rollout, rewards, train_stats, timings, time.monotonic() - finished)
        run.kl_control.update(metrics["kl"], run.rl.batch_size * run.rl.samples_per_prompt)  # n counts responses, as in TRL and OpenRLHF
        run.history.append({"iteration": iteration + 1, **metrics})
        if run.rank == 0:
            run.report(iteration + 1, metrics, prompts, texts, rollout)
        if (iteration + 1) % run.rl.checkpoint_every == 0 or iteration + 1 == run.rl.iterations:
            run.checkpoint(iteration + 1, metrics)
        finished = time.monotonic()


class _Run:
    """One worker's models, optimisers and position in the run, restored from the newest checkpoint if any."""

    def __init__(self, config: dict, session):
        training.reset_peak_rss()  # where this process ran other work before
        self.session, self.stage, self.seed = session, config["stage"], config["seed"]
        self.rank, self.world, self.device = session.rank, session.world, session.device
        session.say(f"{self.stage}: worker {self.rank} of {self.world} {session.place} ({self.device})")
        self.rl = rl = config["rl"].model_copy(update={"precision": precision.choose(config["rl"].precision, self.device)})
        self._say(f"{self.stage}: {precision.describe(rl.precision, self.device)}")
        torch.set_num_threads(config["threads"])
        seed_everything(self.seed)  # the same LoRA initialisation on every worker, as data parallelism needs
        critic_lora = Lora.model_validate(config["critic_lora"]) if config["critic_lora"] else None
        self.roles = load_roles(Path(config["policy_model"]), Path(config["reward_model"]), rl, critic_lora, self.device)
        self.prompts = config["prompts"]
        self.gold = gold.named(config["gold"])
        self.sampling = generation.sampling_config(self.roles.tokenizer, rl.max_new_tokens, rl.temperature)
        seed_everything(self.seed * 1000 + self.rank)  # but each worker samples its own rollouts

        steps = rl.iterations * rl.epochs * rl.minibatches
        rates = {"policy": rl.learning_rate, "critic": getattr(rl, "critic_learning_rate", None)}
        # fused: one kernel per tensor, 5x faster than foreach on a fully trained small critic, the same update up to rounding
        self.optimisers = {name: torch.optim.AdamW(params, lr=rates[name], weight_decay=0.0, fused=True)
                           for name, params in self.roles.trainable().items()}
        self.schedulers = {name: torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 - step / steps)
                           for name, opt in self.optimisers.items()}
        self.kl_control = A.KLController(rl.kl.beta, rl.kl.target, rl.kl.horizon, rl.kl.min_beta)
        self.sampler = PromptSampler(len(self.prompts), self.seed)
        self.history: list[dict] = []
        self.start = self.restored_from = 0
        with session.restored() as directory:
            state = torch.load(directory / "state.pt", weights_only=False) if directory is not None else None
        if state is not None:
            self._restore(state, directory)
        else:
            self.normalisation = rollouts.normalisation(self.roles, self.prompts, self.sampling, self.precision, rl, self.seed,
                                                        self.rank, self.world)
            self._say(f"{self.stage}: starting policy's scores: mean {self.normalisation['mean']:+.3f}, "
                      f"std {self.normalisation['std']:.3f} over {self.normalisation['count']} samples")
        self.roles.on_score_scale(self.normalisation, fresh=state is None)
        self.logger = _MlflowLogger(config["mlflow_uri"], config["mlflow_run_id"], self.stage) if self.rank == 0 else None
        if self.logger is not None:
            self.logger.client.log_param(self.logger.run_id, "precision_chosen", rl.precision)
        gc.collect()
        gc.freeze()  # what setup loaded lives to the end: later collections need not walk it

    def precision(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.rl.precision == "bf16")

    def _say(self, line: str) -> None:
        if self.rank == 0:
            self.session.say(line)

    def _restore(self, state: dict, directory: Path) -> None:
        if len(state["rng"]) != self.world:  # the stage fingerprint covers the worker count: a hand-made mix-up
            raise InputError(f"{directory}: written by {len(state['rng'])} workers, resumed by {self.world}: each worker's "
                             "shard and random stream would change; resume with the same ray.num_workers or start afresh")
        _trainable_load(self.roles.actor, state["policy"])
        if self.roles.critic is not None:
            _trainable_load(self.roles.critic, state["critic"])
        for name in self.optimisers:
            self.optimisers[name].load_state_dict(state["optimisers"][name])
            self.schedulers[name].load_state_dict(state["schedulers"][name])
        self.kl_control.load_state_dict(state["kl"])
        self.normalisation = state["normalisation"]
        self.sampler.position = state["sampler_position"]
        self.history, self.start = state["history"], state["iteration"]
        self.restored_from = self.start
        _set_rng(state["rng"][self.rank], self.device)
        self._say(f"{self.stage}: resuming at iteration {self.start} from {directory}")

    def roll_out(self, timings: dict):
        """This worker's shard of the next prompt batch, sampled, scored and turned into advantages."""
        roles, rl = self.roles, self.rl
        shard = [self.prompts[i] for i in self.sampler.take(rl.batch_size)[self.rank :: self.world]]
        prompts = [p for p in shard for _ in range(rl.samples_per_prompt)]  # a prompt's group stays together

        clock = time.monotonic()
        with self.precision():
            query, query_mask, response, mask, ended = rollouts.generate(roles.actor, roles.tokenizer, shard, self.sampling,
                                                                         self.device, rl.samples_per_prompt)
        texts, _ = generation.decode(roles.tokenizer, response)
        timings["seconds_generate"] = time.monotonic() - clock

        clock = time.monotonic()
        with self.precision():
            rollout = rollouts.score(roles, query, query_mask, response, mask, ended, rl, rl.samples_per_prompt)
            rollout.scores = roles.scores(prompts, texts)
        rewards = rollouts.advantages(rollout, self.normalisation, self.kl_control.beta, rl, self.world)
        timings["seconds_score"] = time.monotonic() - clock
        return prompts, texts, rollout, rewards

    def measure(self, prompts, texts, rollout, rewards, train_stats: dict, timings: dict, seconds: float) -> dict:
        """The iteration's metrics, over all workers."""
        scores, kl, non_score = rewards
        local = {
            "score": rollout.scores.mean(),
            "score_normalised": scores.mean(),
            "non_score_reward": non_score.sum(-1).mean(),
            "reward_total": (scores + non_score.sum(-1)).mean(),
            "kl": kl.sum(-1).mean(),
            "eos_share": rollout.ended.float().mean(),
            "response_length": rollout.mask.sum(-1).mean(),
            "peak_rss_mb": torch.tensor(training.peak_rss_mb()),
            **train_stats,
            **{k: torch.tensor(v) for k, v in timings.items()},
            "seconds_iteration": torch.tensor(seconds),  # since the previous iteration ended: its logging and checkpoint included
        }
        if self.gold is not None:
            local["gold"] = torch.tensor([self.gold(text_of(p), t) for p, t in zip(prompts, texts)]).mean()
        metrics = over_workers(local, self.world, self.device, mean=True) | over_workers(train_stats, self.world, self.device, mean=False)
        return metrics | {
            "beta": self.kl_control.beta,
            "learning_rate": self.schedulers["policy"].get_last_lr()[0],
            "kl_estimator_k3": float(self.rl.kl.estimator == "k3"),
            "restored_from": float(self.restored_from),  # > 0 after a restart: the checkpoint's iteration
        }

    def report(self, iteration: int, metrics: dict, prompts, texts, rollout) -> None:
        rl = self.rl
        self.logger.log(metrics, iteration)
        progress.report("iterations", iteration, rl.iterations, score=metrics["score"], kl=metrics["kl"],
                        **({"gold": metrics["gold"]} if "gold" in metrics else {}))
        self.session.say(
            f"{self.stage} {iteration}/{rl.iterations}: score {metrics['score']:+.3f}"
            + (f" gold {metrics['gold']:+.3f}" if "gold" in metrics else "")
            + f" kl {metrics['kl']:.2f} beta {metrics['beta']:.3f} len {metrics['response_length']:.1f}"
            + f" ({metrics['seconds_generate']:.1f}s gen, {metrics['seconds_score']:.1f}s score, {metrics['seconds_train']:.1f}s train"
            + (f" of which {metrics['seconds_sync']:.1f}s gradient sync)" if self.world > 1 else ")")
        )
        if iteration % rl.samples_every == 0 or iteration == rl.iterations:
            self.logger.samples(prompts, texts, rollout.scores.tolist(), iteration)

    def checkpoint(self, iteration: int, metrics: dict) -> None:
        rng_states = [None] * self.world
        if self.world > 1:
            dist.all_gather_object(rng_states, _get_rng(self.device))
        else:
            rng_states[0] = _get_rng(self.device)
        roles = self.roles
        state = {
            "iteration": iteration,
            "policy": _trainable_state(roles.actor),
            "critic": _trainable_state(roles.critic) if roles.critic is not None else None,
            "optimisers": {name: opt.state_dict() for name, opt in self.optimisers.items()},
            "schedulers": {name: s.state_dict() for name, s in self.schedulers.items()},
            "kl": self.kl_control.state_dict(),
            "normalisation": self.normalisation,
            "sampler_position": self.sampler.position,
            "rng": rng_states,
            "history": self.history,
        }
        with self.session.checkpoint(metrics, iteration) as directory:
            if directory is not None:
                _write_checkpoint(directory, state, roles, iteration == self.rl.iterations)


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
