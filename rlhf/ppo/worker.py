"""The PPO loop that runs on every Ray Train worker.

Before the first iteration, samples of the starting policy under PPO's own
sampling settings fix the mean and standard deviation that normalise the
reward model's scores. Each iteration: draw the global prompt batch and take
this worker's shard; generate; decode each response up to its EOS and score
the text with the frozen reward model, rendered by its own tokenizer as in
reward training and evaluation; compute log-probs of the policy, of the
reference (the same weights with the adapter disabled) and values of the
critic; turn scores and KL into per-token rewards and GAE advantages,
whitened over the whole batch; then several epochs of clipped PPO updates
over shuffled minibatches. Every loss is a mean over the minibatch's
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
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from rlhf import generation, gold, models, progress
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
    import ray.train.torch

    setup_started = time.monotonic()
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # per-report INFO lines drown the progress lines
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    print(f"ppo: worker {rank} of {world} on Ray node {ray.get_runtime_context().get_node_id()} ({device})", flush=True)
    ppo = PpoStage.model_validate(config["ppo"])
    torch.set_num_threads(config["threads"])
    seed_everything(config["seed"])  # the same LoRA initialisation on every worker, as data parallelism needs

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
        "policy": torch.optim.AdamW(policy_params, lr=ppo.learning_rate, weight_decay=0.0, foreach=True),
        "critic": torch.optim.AdamW(critic_params, lr=ppo.critic_learning_rate, weight_decay=0.0, foreach=True),
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
        _set_rng(state["rng"][rank], device)
        if rank == 0:
            print(f"ppo: resuming at iteration {start} from {checkpoint.path}", flush=True)
    else:
        normalisation = _normalisation(policy, tokenizer, prompts, scores_of, sampling, precision, ppo, config["seed"], rank, world)
        if rank == 0:
            print(f"ppo: starting policy's scores: mean {normalisation['mean']:+.3f}, std {normalisation['std']:.3f} "
                  f"over {normalisation['count']} samples", flush=True)

    logger = _MlflowLogger(config["mlflow_uri"], config["mlflow_run_id"]) if rank == 0 else None
    gc.collect()
    gc.freeze()  # what setup loaded lives to the end: later collections need not walk it
    finished = time.monotonic()
    for iteration in range(start, ppo.iterations):
        batch = sampler.take(ppo.batch_size)[rank::world]
        batch_prompts = [prompts[i] for i in batch]
        # after a (re)start, what the worker spent before its first iteration: models, normalisation samples
        timings = {"seconds_setup": finished - setup_started} if iteration == start else {}

        clock = time.monotonic()
        with precision():
            query, query_mask, response, mask, ended = _generate(policy, tokenizer, batch_prompts, sampling, ppo, device)
        texts, _ = generation.decode(tokenizer, response)
        timings["seconds_generate"] = time.monotonic() - clock

        clock = time.monotonic()
        with precision():
            rollout = _score(policy, critic, query, query_mask, response, mask, ended, ppo)
        rollout.scores = scores_of(batch_prompts, texts)
        scores, kl, non_score = _advantages(rollout, normalisation, kl_control.beta, ppo, world)
        timings["seconds_score"] = time.monotonic() - clock

        clock = time.monotonic()
        train_stats, timings["seconds_sync"] = _update(
            policy, critic, optimisers, schedulers, policy_params, critic_params, rollout, ppo, precision, world
        )
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
        metrics = _over_workers(local, world, device, mean=True) | _over_workers(train_stats, world, device, mean=False)
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
            progress.report("iterations", iteration + 1, ppo.iterations, score=metrics["score"], kl=metrics["kl"],
                            **({"gold": metrics["gold"]} if "gold" in metrics else {}))
            print(
                f"ppo {iteration + 1}/{ppo.iterations}: score {metrics['score']:+.3f}"
                + (f" gold {metrics['gold']:+.3f}" if "gold" in metrics else "")
                + f" kl {metrics['kl']:.2f} beta {metrics['beta']:.3f} len {metrics['response_length']:.1f}"
                + f" ({metrics['seconds_generate']:.1f}s gen, {metrics['seconds_score']:.1f}s score, {metrics['seconds_train']:.1f}s train"
                + (f" of which {metrics['seconds_sync']:.1f}s gradient sync)" if world > 1 else ")"),
                flush=True,
            )
            if (iteration + 1) % ppo.samples_every == 0 or iteration + 1 == ppo.iterations:
                logger.samples(batch_prompts, texts, rollout.scores.tolist(), iteration + 1)

        last = iteration + 1 == ppo.iterations
        if (iteration + 1) % ppo.checkpoint_every == 0 or last:
            rng_states = [None] * world
            dist.all_gather_object(rng_states, _get_rng(device)) if world > 1 else rng_states.__setitem__(0, _get_rng(device))
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
        finished = time.monotonic()


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
    totals = torch.zeros(3, dtype=torch.float64, device=policy.device)
    for start in range(0, len(drawn), ppo.batch_size):
        batch_prompts = [prompts[i] for i in drawn[start : start + ppo.batch_size]]
        with precision():
            response = _generate(policy, tokenizer, batch_prompts, sampling, ppo, policy.device)[2]
        scores = scores_of(batch_prompts, generation.decode(tokenizer, response)[0])
        totals += A.masked_moments(scores, torch.ones_like(scores))
    count, total, squares = _summed(totals, world).tolist()
    mean = total / count
    std = max(squares / count - mean**2, 0.0) ** 0.5
    return {"mean": mean, "std": std or 1.0, "count": int(count)}


def _sequence(query, query_mask, response):
    """Prompt and response as one sequence. Tokens after a response's EOS stay visible: attention is causal,
    so no position up to the EOS can see them, and an all-ones mask keeps the fast causal attention path."""
    input_ids = torch.cat([query, response], dim=1)
    attention_mask = torch.cat([query_mask, torch.ones_like(response)], dim=1)
    return input_ids, attention_mask, _positions(attention_mask)


def _response_logits(model, query, query_mask, response):
    """Logits that predict each response token; the LM head never runs at the other prompt positions."""
    input_ids, attention_mask, positions = _sequence(query, query_mask, response)
    keep = response.shape[1] + 1
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=False, logits_to_keep=keep).logits
    return logits[:, :-1]


@torch.no_grad()
def _score(policy, critic, query, query_mask, response, mask, ended, ppo: PpoStage) -> Rollout:
    """Log-probs of policy and reference and the critic's values; the scores are filled in from the text."""
    policy.eval()
    critic.eval()
    input_ids, attention_mask, positions = _sequence(query, query_mask, response)
    logp = A.token_logprobs(_response_logits(policy, query, query_mask, response), response, ppo.temperature)
    with policy.disable_adapter():
        ref_logp = A.token_logprobs(_response_logits(policy, query, query_mask, response), response, ppo.temperature)
    values = _values(critic, input_ids, attention_mask, positions)[:, query.shape[1] - 1 : -1]
    return Rollout(query, query_mask, response, mask, ended, None, logp * mask, ref_logp * mask, values * mask)


def _advantages(rollout: Rollout, normalisation: dict, beta: float, ppo: PpoStage, world: int):
    """Fill in GAE advantages, whitened over every worker's tokens, and returns; (scores, kl, non-score rewards) for metrics."""
    scores = A.normalise_scores(rollout.scores, normalisation["mean"], normalisation["std"], ppo.reward_clip)
    scores = A.apply_missing_eos_penalty(scores, rollout.ended, ppo.missing_eos_penalty)
    kl = A.kl_estimate(rollout.logp, rollout.ref_logp, ppo.kl.estimator) * rollout.mask
    rewards, non_score = A.per_token_rewards(scores, kl, rollout.mask, beta)
    advantages, rollout.returns = A.gae(rewards, rollout.values, rollout.mask, ppo.gamma, ppo.lam)
    moments = _summed(A.masked_moments(advantages, rollout.mask), world)
    rollout.advantages = A.masked_whiten(advantages, rollout.mask, moments)
    return scores, kl, non_score


# ---------------------------------------------------------------- update


def _update(
    policy, critic, optimisers, schedulers, policy_params, critic_params, rollout: Rollout, ppo: PpoStage, precision, world: int
) -> tuple[dict, float]:
    """`epochs` passes of clipped PPO over shuffled minibatches; one optimiser step per minibatch.

    Losses are weighted by each micro-batch's share of the minibatch's
    response tokens on all workers, and gradients are summed across workers:
    the step is the whole minibatch's, whatever the micro-batch size or
    worker count. Returns each statistic's share from this worker (summed
    over workers, they are means over all minibatch tokens) and the seconds
    spent in the gradient all-reduce, waiting for slower workers included.
    """
    policy.train()
    critic.train()
    size = rollout.query.shape[0]
    per_minibatch = size // ppo.minibatches
    per_micro = ppo.micro_batch_size or per_minibatch
    minibatches = [
        order[start : start + per_minibatch]
        for order in (torch.randperm(size) for _ in range(ppo.epochs))
        for start in range(0, size, per_minibatch)
    ]
    tokens = _summed(torch.stack([rollout.mask[m].sum() for m in minibatches]), world).clamp(min=1)
    gradients = _flat_gradients(policy_params + critic_params)
    sums: dict[str, torch.Tensor] = {}
    sync = 0.0
    for minibatch, minibatch_tokens in zip(minibatches, tokens):
        optimisers["policy"].zero_grad(set_to_none=False)
        optimisers["critic"].zero_grad(set_to_none=False)
        step: dict[str, torch.Tensor] = {}
        for micro in minibatch.split(per_micro):
            query, query_mask, response, mask = (
                rollout.query[micro], rollout.query_mask[micro], rollout.response[micro], rollout.mask[micro]
            )
            weight = mask.sum() / minibatch_tokens
            with precision():
                logits = _response_logits(policy, query, query_mask, response)
            logp = A.token_logprobs(logits, response, ppo.temperature)
            pg = A.policy_loss(logp, rollout.logp[micro], rollout.advantages[micro], mask, ppo.clip_ratio)
            (pg.loss * weight).backward()

            input_ids, attention_mask, positions = _sequence(query, query_mask, response)
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

        clock = time.monotonic()
        _summed(gradients, world)
        sync += time.monotonic() - clock
        # the same on every worker after the sum; each reports its share like the other statistics
        step["policy_grad_norm"] = torch.nn.utils.clip_grad_norm_(policy_params, ppo.max_grad_norm) / world
        torch.nn.utils.clip_grad_norm_(critic_params, ppo.max_grad_norm)
        for name in ("policy", "critic"):
            optimisers[name].step()
            schedulers[name].step()
        for key, value in step.items():
            sums[key] = sums.get(key, 0.0) + value.detach().float()
    return {key: value / len(minibatches) for key, value in sums.items()}, sync


def _summed(tensor: torch.Tensor, world: int) -> torch.Tensor:
    """The sum of `tensor` over all workers (it must live on the process group's device)."""
    if world > 1:
        dist.all_reduce(tensor)
    return tensor


def _flat_gradients(params) -> torch.Tensor:
    """One buffer that holds every gradient, each parameter's `.grad` a view into it: a single all-reduce
    sums them all in place, with no copies in or out."""
    flat = torch.zeros(sum(p.numel() for p in params), device=params[0].device)
    for param, grad in zip(params, flat.split([p.numel() for p in params])):
        param.grad = grad.view_as(param)
    return flat


def _over_workers(local: dict, world: int, device, mean: bool) -> dict[str, float]:
    """Scalars summed, or averaged, over workers, in one all-reduce on the process group's device."""
    keys = sorted(local)
    stacked = _summed(torch.stack([torch.as_tensor(local[k], dtype=torch.float64, device=device).reshape(()) for k in keys]), world)
    if mean:
        stacked /= world
    return {k: float(v) for k, v in zip(keys, stacked.tolist())}


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
            models.save_adapter(policy, Path(directory) / "adapter")
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
