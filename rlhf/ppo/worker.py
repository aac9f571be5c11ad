"""The PPO loop that runs on every Ray Train worker.

Before the first iteration, samples of the starting policy under PPO's own
sampling settings fix the mean and standard deviation that normalise the
reward model's scores. Each iteration: draw the global prompt batch and take
this worker's shard; generate; decode each response up to its EOS and score
the text with the frozen reward model, rendered by its own tokenizer as in
reward training and evaluation; compute log-probs of the policy, of the
reference (the same weights with the adapter disabled) and values of the
critic; turn scores and KL into per-token rewards and GAE advantages; then
several epochs of clipped PPO updates over shuffled minibatches (gradients
accumulated over micro-batches, all-reduced across workers). Rank 0 logs to
MLflow and writes checkpoints; every worker's RNG state goes into them.
"""

from __future__ import annotations

import json
import logging
import random
import resource
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from rlhf import generation, gold, models
from rlhf.config import Lora, PpoStage
from rlhf.data.formats import text_of
from rlhf.generation import render
from rlhf.ppo import algorithm as A
from rlhf.seeding import seed_everything
from rlhf.training import lora_config


@dataclass
class Rollout:
    """One worker's batch: token ids and everything computed from them before the update."""

    query: torch.Tensor  # [b, P] left-padded prompt ids
    query_mask: torch.Tensor
    response: torch.Tensor  # [b, R]
    mask: torch.Tensor  # [b, R] response tokens up to and including EOS
    ended: torch.Tensor
    scores: torch.Tensor  # raw reward-model scores
    logp: torch.Tensor
    ref_logp: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None


class PromptSampler:
    """Deterministic epochs of shuffled prompts; its position is part of a checkpoint."""

    def __init__(self, count: int, seed: int):
        self.count, self.seed, self.position = count, seed, 0

    def take(self, n: int) -> list[int]:
        indices = []
        for _ in range(n):
            epoch, offset = divmod(self.position, self.count)
            order = np.random.default_rng([self.seed, epoch]).permutation(self.count)
            indices.append(int(order[offset]))
            self.position += 1
        return indices


def train_loop(config: dict) -> None:
    """Ray Train entry point; `config` holds only plain values (paths, ids, the stage block)."""
    import ray
    import ray.train

    logging.getLogger("ray.train").setLevel(logging.WARNING)  # per-report INFO lines drown the progress lines
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    print(f"ppo: worker {rank} of {world} on Ray node {ray.get_runtime_context().get_node_id()}", flush=True)
    ppo = PpoStage.model_validate(config["ppo"])
    torch.set_num_threads(config["threads"])
    seed_everything(config["seed"])  # the same LoRA initialisation on every worker, as data parallelism needs
    device = torch.device("cuda" if config["use_gpu"] else "cpu")

    policy_dir, reward_dir = Path(config["policy_model"]), Path(config["reward_model"])
    tokenizer = models.load_tokenizer(policy_dir, padding_side="left")
    reward_tokenizer = models.load_tokenizer(reward_dir, padding_side="left")
    policy = _policy(policy_dir, ppo, device)
    critic = _critic(reward_dir, policy_dir, tokenizer, reward_tokenizer, config["critic_lora"], ppo, device)
    reward_model = models.load_reward_model(reward_dir).to(device).eval()
    reward_model.requires_grad_(False)
    prompts = config["prompts"]
    gold_reward = gold.named(config["gold"])
    sampling = generation.sampling_config(tokenizer, ppo.max_new_tokens, ppo.temperature)

    def precision():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=ppo.precision == "bf16")

    def scores_of(batch_prompts, texts) -> torch.Tensor:
        with precision():
            raw = generation.score(reward_model, reward_tokenizer, batch_prompts, texts, max_length=None)
        return torch.tensor(raw, device=device)

    seed_everything(config["seed"] * 1000 + rank)  # but each worker samples its own rollouts

    steps = ppo.iterations * ppo.epochs * ppo.minibatches
    policy_params = [p for p in policy.parameters() if p.requires_grad]
    critic_params = [p for p in critic.parameters() if p.requires_grad]
    optimisers = {
        "policy": torch.optim.AdamW(policy_params, lr=ppo.learning_rate, weight_decay=0.0),
        "critic": torch.optim.AdamW(critic_params, lr=ppo.critic_learning_rate, weight_decay=0.0),
    }
    schedulers = {
        name: torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 - step / steps) for name, opt in optimisers.items()
    }
    kl_control = A.KLController(ppo.kl.beta, ppo.kl.target, ppo.kl.horizon)
    sampler = PromptSampler(len(prompts), config["seed"])
    history: list[dict] = []
    start = restored_from = 0

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = torch.load(Path(directory) / "state.pt", weights_only=False)
        _trainable_load(policy, state["policy"])
        _trainable_load(critic, state["critic"])
        for name in optimisers:
            optimisers[name].load_state_dict(state["optimisers"][name])
            schedulers[name].load_state_dict(state["schedulers"][name])
        kl_control.load_state_dict(state["kl"])
        normalisation = state["normalisation"]
        sampler.position = state["sampler_position"]
        history, start = state["history"], state["iteration"]
        restored_from = start
        _set_rng(state["rng"][rank])
        if rank == 0:
            print(f"ppo: resuming at iteration {start} from {checkpoint.path}", flush=True)
    else:
        normalisation = _normalisation(policy, tokenizer, prompts, scores_of, sampling, precision, ppo, config["seed"], rank, world)
        if rank == 0:
            print(f"ppo: starting policy's scores: mean {normalisation['mean']:+.3f}, std {normalisation['std']:.3f} "
                  f"over {normalisation['count']} samples", flush=True)

    logger = _MlflowLogger(config["mlflow_uri"], config["mlflow_run_id"]) if rank == 0 else None
    for iteration in range(start, ppo.iterations):
        batch = sampler.take(ppo.batch_size)[rank::world]
        batch_prompts = [prompts[i] for i in batch]
        timings = {}

        clock = time.monotonic()
        with precision():
            query, query_mask, response, mask, ended = _generate(policy, tokenizer, batch_prompts, sampling, ppo, device)
        texts, _ = generation.decode(tokenizer, response)
        timings["seconds_generate"] = time.monotonic() - clock

        clock = time.monotonic()
        with precision():
            rollout = _score(policy, critic, query, query_mask, response, mask, ended, ppo)
        rollout.scores = scores_of(batch_prompts, texts)
        scores = A.normalise_scores(rollout.scores, normalisation["mean"], normalisation["std"], ppo.reward_clip)
        scores = A.apply_missing_eos_penalty(scores, rollout.ended, ppo.missing_eos_penalty)
        kl = A.kl_estimate(rollout.logp, rollout.ref_logp, ppo.kl.estimator) * rollout.mask
        rewards, non_score = A.per_token_rewards(scores, kl, rollout.mask, kl_control.beta)
        rollout.advantages, rollout.returns = A.gae(rewards, rollout.values, rollout.mask, ppo.gamma, ppo.lam)
        rollout.advantages = A.masked_whiten(rollout.advantages, rollout.mask)
        timings["seconds_score"] = time.monotonic() - clock

        clock = time.monotonic()
        train_stats = _update(policy, critic, optimisers, schedulers, policy_params, critic_params, rollout, ppo, precision, world)
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
        }
        if gold_reward is not None:
            local["gold"] = torch.tensor([gold_reward(text_of(p), t) for p, t in zip(batch_prompts, texts)]).mean()
        metrics = _all_reduce_mean(local, world)
        metrics |= {
            "beta": kl_control.beta,
            "learning_rate": schedulers["policy"].get_last_lr()[0],
            "kl_estimator_k3": float(ppo.kl.estimator == "k3"),
            "restored_from": float(restored_from),  # > 0 after a restart: the checkpoint's iteration
        }
        kl_control.update(metrics["kl"], ppo.batch_size)
        history.append({"iteration": iteration + 1, **metrics})

        if rank == 0:
            logger.log(metrics, iteration + 1)
            print(
                f"ppo {iteration + 1}/{ppo.iterations}: score {metrics['score']:+.3f}"
                + (f" gold {metrics['gold']:+.3f}" if "gold" in metrics else "")
                + f" kl {metrics['kl']:.2f} beta {metrics['beta']:.3f} len {metrics['response_length']:.1f}"
                + f" ({metrics['seconds_generate']:.1f}s gen, {metrics['seconds_score']:.1f}s score, {metrics['seconds_train']:.1f}s train)",
                flush=True,
            )
            if (iteration + 1) % ppo.samples_every == 0 or iteration + 1 == ppo.iterations:
                logger.samples(batch_prompts, texts, rollout.scores.tolist(), iteration + 1)

        last = iteration + 1 == ppo.iterations
        if (iteration + 1) % ppo.checkpoint_every == 0 or last:
            rng_states = [None] * world
            dist.all_gather_object(rng_states, _get_rng()) if world > 1 else rng_states.__setitem__(0, _get_rng())
            state = {
                "iteration": iteration + 1,
                "policy": _trainable_state(policy),
                "critic": _trainable_state(critic),
                "optimisers": {name: opt.state_dict() for name, opt in optimisers.items()},
                "schedulers": {name: s.state_dict() for name, s in schedulers.items()},
                "kl": kl_control.state_dict(),
                "normalisation": normalisation,
                "sampler_position": sampler.position,
                "rng": rng_states,
                "history": history,
            }
            _report(metrics, state, policy, critic, tokenizer, rank, last)


# ---------------------------------------------------------------- models


def _policy(policy_dir: Path, ppo: PpoStage, device):
    from peft import get_peft_model

    policy = get_peft_model(models.load_causal_lm(policy_dir), lora_config(ppo.lora, "CAUSAL_LM")).to(device)
    if ppo.gradient_checkpointing:
        policy.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return policy


def _critic(reward_dir: Path, policy_dir: Path, tokenizer, reward_tokenizer, lora: dict | None, ppo: PpoStage, device):
    """A trainable copy of the reward model; its score head, applied at every position, gives values.

    The critic reads the policy's tokens, so it starts from the reward model
    only when every policy token means the same to it; otherwise from the
    policy's own weights with a new value head.
    """
    reward_vocab = reward_tokenizer.get_vocab()
    if all(reward_vocab.get(token) == index for token, index in tokenizer.get_vocab().items()):
        critic = models.load_reward_model(reward_dir)
    else:
        print("ppo: the reward model's tokenizer differs from the policy's: the critic starts from the policy", flush=True)
        critic = models.load_reward_model(policy_dir)
    if lora is not None:
        from peft import get_peft_model

        critic = get_peft_model(critic, lora_config(Lora.model_validate(lora), "SEQ_CLS", modules_to_save=["score"]))
    if ppo.gradient_checkpointing:
        backbone = critic.get_base_model() if hasattr(critic, "get_base_model") else critic
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return critic.to(device)


def _values(critic, input_ids, attention_mask, position_ids) -> torch.Tensor:
    base = critic.get_base_model() if hasattr(critic, "get_base_model") else critic
    hidden = getattr(base, base.base_model_prefix)(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state
    return base.score(hidden).squeeze(-1).float()


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as `generate` uses them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


# ---------------------------------------------------------------- rollout


@torch.no_grad()
def _generate(policy, tokenizer, prompts, sampling, ppo: PpoStage, device):
    """Prompt ids and mask, response ids at a fixed width, the response mask (through EOS), and whether each ended."""
    policy.eval()
    texts = [render(tokenizer, p) for p in prompts]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    response = generation.generate(policy, batch, sampling)
    mask, ended = A.response_mask(response, tokenizer.eos_token_id)
    width = ppo.max_new_tokens - response.shape[1]  # fixed width keeps shapes equal across workers
    response = torch.nn.functional.pad(response, (0, width), value=tokenizer.pad_token_id)
    mask = torch.nn.functional.pad(mask, (0, width), value=0.0)
    return batch["input_ids"], batch["attention_mask"], response, mask, ended


@torch.no_grad()
def _normalisation(policy, tokenizer, prompts, scores_of, sampling, precision, ppo: PpoStage, seed: int, rank: int, world: int) -> dict:
    """Mean and std of the reward model's scores on the starting policy's samples, over all workers.

    The LoRA adapter starts at zero, so the policy is still the starting policy here.
    """
    drawn = np.random.default_rng([seed, 7]).choice(len(prompts), ppo.normalisation_samples).tolist()[rank::world]
    totals = torch.zeros(3, dtype=torch.float64)
    for start in range(0, len(drawn), ppo.batch_size):
        batch_prompts = [prompts[i] for i in drawn[start : start + ppo.batch_size]]
        with precision():
            response = _generate(policy, tokenizer, batch_prompts, sampling, ppo, policy.device)[2]
        scores = scores_of(batch_prompts, generation.decode(tokenizer, response)[0]).double().cpu()
        totals += torch.stack([torch.tensor(float(len(scores)), dtype=torch.float64), scores.sum(), (scores**2).sum()])
    if world > 1:
        dist.all_reduce(totals)
    count, total, squares = totals.tolist()
    mean = total / count
    std = max(squares / count - mean**2, 0.0) ** 0.5
    return {"mean": mean, "std": std or 1.0, "count": int(count)}


def _sequence(query, query_mask, response, mask):
    input_ids = torch.cat([query, response], dim=1)
    attention_mask = torch.cat([query_mask, mask.long()], dim=1)
    return input_ids, attention_mask, _positions(attention_mask)


def _response_logits(model, query, query_mask, response, mask):
    input_ids, attention_mask, positions = _sequence(query, query_mask, response, mask)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=False).logits
    return logits[:, query.shape[1] - 1 : -1]


@torch.no_grad()
def _score(policy, critic, query, query_mask, response, mask, ended, ppo: PpoStage) -> Rollout:
    """Log-probs of policy and reference and the critic's values; the scores are filled in from the text."""
    policy.eval()
    critic.eval()
    input_ids, attention_mask, positions = _sequence(query, query_mask, response, mask)
    logp = A.token_logprobs(_response_logits(policy, query, query_mask, response, mask), response, ppo.temperature)
    with policy.disable_adapter():
        ref_logp = A.token_logprobs(_response_logits(policy, query, query_mask, response, mask), response, ppo.temperature)
    values = _values(critic, input_ids, attention_mask, positions)[:, query.shape[1] - 1 : -1]
    return Rollout(query, query_mask, response, mask, ended, None, logp * mask, ref_logp * mask, values * mask)


# ---------------------------------------------------------------- update


def _update(
    policy, critic, optimisers, schedulers, policy_params, critic_params, rollout: Rollout, ppo: PpoStage, precision, world: int
) -> dict:
    """`epochs` passes of clipped PPO over shuffled minibatches; one optimiser step per minibatch.

    A minibatch is processed in micro-batches whose losses are weighted by
    their share of its response tokens, so the accumulated gradient equals
    the whole minibatch's.
    """
    policy.train()
    critic.train()
    size = rollout.query.shape[0]
    per_minibatch = max(1, size // ppo.minibatches)
    per_micro = ppo.micro_batch_size or per_minibatch
    sums: dict[str, torch.Tensor] = {}
    count = 0
    for _ in range(ppo.epochs):
        order = torch.randperm(size)
        for start in range(0, per_minibatch * ppo.minibatches, per_minibatch):
            minibatch = order[start : start + per_minibatch]
            tokens = rollout.mask[minibatch].sum().clamp(min=1)
            optimisers["policy"].zero_grad(set_to_none=False)
            optimisers["critic"].zero_grad(set_to_none=False)
            step: dict[str, torch.Tensor] = {}
            for micro in minibatch.split(per_micro):
                query, query_mask, response, mask = (
                    rollout.query[micro], rollout.query_mask[micro], rollout.response[micro], rollout.mask[micro]
                )
                weight = mask.sum() / tokens
                with precision():
                    logits = _response_logits(policy, query, query_mask, response, mask)
                logp = A.token_logprobs(logits, response, ppo.temperature)
                pg = A.policy_loss(logp, rollout.logp[micro], rollout.advantages[micro], mask, ppo.clip_ratio)
                (pg.loss * weight).backward()

                input_ids, attention_mask, positions = _sequence(query, query_mask, response, mask)
                with precision():
                    values = _values(critic, input_ids, attention_mask, positions)[:, query.shape[1] - 1 : -1]
                vf_loss, vf_clip = A.value_loss(values, rollout.values[micro], rollout.returns[micro], mask, ppo.clip_value)
                (vf_loss * weight).backward()

                with torch.no_grad():
                    for key, value in (
                        ("policy_loss", pg.loss),
                        ("policy_clip_fraction", pg.clip_fraction),
                        ("approx_kl", pg.approx_kl),
                        ("ratio_mean", pg.ratio_mean),
                        ("ratio_var", pg.ratio_var),
                        ("value_loss", vf_loss),
                        ("value_clip_fraction", vf_clip),
                        ("entropy", A.masked_mean(A.entropy(logits, ppo.temperature), mask)),
                    ):
                        step[key] = step.get(key, 0.0) + weight * value.detach().float()

            _all_reduce_grads(policy_params, world)
            step["policy_grad_norm"] = torch.nn.utils.clip_grad_norm_(policy_params, ppo.max_grad_norm)
            optimisers["policy"].step()
            schedulers["policy"].step()
            _all_reduce_grads(critic_params, world)
            torch.nn.utils.clip_grad_norm_(critic_params, ppo.max_grad_norm)
            optimisers["critic"].step()
            schedulers["critic"].step()
            for key, value in step.items():
                sums[key] = sums.get(key, 0.0) + value.detach().float()
            count += 1
    return {key: value / count for key, value in sums.items()}


def _all_reduce_grads(params, world: int) -> None:
    if world == 1:
        return
    grads = [p.grad for p in params]
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= world
    for grad, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        grad.copy_(synced)


def _all_reduce_mean(local: dict[str, torch.Tensor], world: int) -> dict[str, float]:
    keys = sorted(local)
    stacked = torch.stack([torch.as_tensor(local[k], dtype=torch.float64).reshape(()).cpu() for k in keys])
    if world > 1:
        dist.all_reduce(stacked)
        stacked /= world
    return {k: float(v) for k, v in zip(keys, stacked)}


# ---------------------------------------------------------------- state


def _trainable_state(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters() if p.requires_grad}


def _trainable_load(model, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def _get_rng() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def _set_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def _report(metrics: dict, state: dict, policy, critic, tokenizer, rank: int, last: bool) -> None:
    """Rank 0 writes the checkpoint (the final one also holds adapter, critic, tokenizer); all ranks report."""
    import ray.train
    from ray.train import Checkpoint

    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as directory:
        torch.save(state, Path(directory) / "state.pt")
        if last:
            policy.save_pretrained(Path(directory) / "adapter")
            critic_model = critic.merge_and_unload() if hasattr(critic, "merge_and_unload") else critic
            critic_model.save_pretrained(Path(directory) / "critic")
            tokenizer.save_pretrained(Path(directory) / "critic")
            (Path(directory) / "history.json").write_text(json.dumps(state["history"]))
            (Path(directory) / "normalisation.json").write_text(json.dumps(state["normalisation"]))
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(directory))


class _MlflowLogger:
    """Rank 0's link to the stage's MLflow run, given explicitly: driver env vars don't reach remote workers."""

    def __init__(self, uri: str, run_id: str):
        from mlflow import MlflowClient

        self.client, self.run_id = MlflowClient(uri), run_id

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(f"ppo/{k}", v, now, step) for k, v in metrics.items()]
        for start in range(0, len(batch), 200):
            self.client.log_batch(self.run_id, metrics=batch[start : start + 200])

    def samples(self, prompts, responses, scores, step: int) -> None:
        table = {"prompt": [text_of(p) for p in prompts], "response": responses, "score": scores}
        self.client.log_table(self.run_id, table, artifact_file=f"ppo/samples/iteration_{step:04d}.json")
