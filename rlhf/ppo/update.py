"""The update: `epochs` passes of the clipped surrogate over shuffled minibatches, one optimiser step each.

Losses are weighted by each micro-batch's share of the minibatch's response
tokens on all workers, and gradients are summed across workers: the step is
the whole minibatch's, whatever the micro-batch size or worker count. The
critic (PPO) learns its clipped value loss in the same pass; a stage with
the KL in its loss adds beta times the KL to the reference.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from rlhf.stages.rl.config import RlStage
from rlhf.ppo import algorithm as A
from rlhf.ppo.methods import AGGREGATIONS, POLICY_LOSSES, Aggregation
from rlhf.ppo.roles import Roles, response_logits
from rlhf.ppo.rollout import Rollout, summed


def update(roles: Roles, optimisers: dict, schedulers: dict, rollout: Rollout, rl: RlStage, beta: float, precision,
           world: int) -> tuple[dict, float]:
    """Returns each statistic's share from this worker (summed over workers, they are means over all
    minibatch tokens) and the seconds spent in the gradient all-reduce, waiting for slower workers included."""
    params = roles.trainable()
    for model in (roles.actor, roles.critic):
        if model is not None:
            model.train()
    minibatches = _minibatches(rollout.query.shape[0], rl, world, rollout.mask.device)
    aggregation = AGGREGATIONS[rl.loss_aggregation]
    units = aggregation.units(rollout.mask)
    # each minibatch's response tokens, and what its responses count for in the loss, over all workers
    totals = summed(torch.stack([torch.stack([rollout.mask[m].sum(), units[m].sum()]) for m in minibatches]), world).clamp(min=1)
    gradients = flat_gradients([p for group in params.values() for p in group])
    sums: dict[str, torch.Tensor] = {}
    sync = 0.0
    for minibatch, (minibatch_tokens, minibatch_units) in zip(minibatches, totals):
        for optimiser in optimisers.values():
            optimiser.zero_grad(set_to_none=False)
        step: dict[str, torch.Tensor] = {}
        micros = minibatch.split(rl.micro_batch_size or len(minibatch)) if len(minibatch) else ()  # a worker may hold none of its rows
        for micro in micros:
            shares = (rollout.mask[micro].sum() / minibatch_tokens, units[micro].sum() / minibatch_units)
            for key, value in _micro_step(roles, rollout, micro, shares, aggregation, rl, beta, precision).items():
                step[key] = step.get(key, 0.0) + value

        clock = time.monotonic()
        summed(gradients, world)
        sync += time.monotonic() - clock
        # the same on every worker after the sum; each reports its share like the other statistics
        step["policy_grad_norm"] = torch.nn.utils.clip_grad_norm_(params["policy"], rl.max_grad_norm) / world
        if "critic" in params:
            torch.nn.utils.clip_grad_norm_(params["critic"], rl.max_grad_norm)
        for name, optimiser in optimisers.items():
            optimiser.step()
            schedulers[name].step()
        for key, value in step.items():
            sums[key] = sums.get(key, 0.0) + value.detach().float()
    return {key: value / len(minibatches) for key, value in sums.items()}, sync


def _minibatches(size: int, rl: RlStage, world: int, device) -> list[torch.Tensor]:
    """Each epoch's minibatches, as this worker's rows of them. The order is drawn once for the whole batch, by
    rank 0 as one worker draws it, and shared: any worker count splits the batch into the minibatches one worker
    would, each worker taking its own rows of each (prompt j and its samples live on worker j % world)."""
    total = size * world  # every worker holds an equal shard
    orders = torch.stack([torch.randperm(total) for _ in range(rl.epochs)]) if _rank(world) == 0 else \
        torch.zeros(rl.epochs, total, dtype=torch.long)
    orders = summed(orders.to(device), world).cpu()  # rank 0's orders, on every worker
    prompt, sample = orders // rl.samples_per_prompt, orders % rl.samples_per_prompt
    mine, local = prompt % world == _rank(world), (prompt // world) * rl.samples_per_prompt + sample
    per_minibatch = total // rl.minibatches
    return [local[epoch, start : start + per_minibatch][mine[epoch, start : start + per_minibatch]]
            for epoch in range(rl.epochs) for start in range(0, total, per_minibatch)]


def _rank(world: int) -> int:
    return dist.get_rank() if world > 1 else 0


def _micro_step(roles: Roles, rollout: Rollout, micro, shares, aggregation: Aggregation, rl: RlStage, beta: float,
                precision) -> dict:
    """Backward of one micro-batch's share of the minibatch loss; its weighted statistics. `shares` are its part
    of the minibatch's tokens (statistics, the value loss) and of the units its loss aggregation counts."""
    query, query_mask, response, mask = rollout.query[micro], rollout.query_mask[micro], rollout.response[micro], rollout.mask[micro]
    token_share, loss_share = shares
    with precision():
        logits = response_logits(roles.actor, query, query_mask, response)
    logp = A.token_logprobs(logits, response, rl.temperature)
    pg = POLICY_LOSSES[rl.policy_loss](logp, rollout.logp[micro], rollout.advantages[micro], mask, rl.clip_ratio)
    losses = {"policy_loss": aggregation.reduce(pg.per_token, mask, rl.max_new_tokens)}
    loss = losses["policy_loss"]
    if rl.kl.in_loss:
        kl = A.kl_estimate(logp, rollout.ref_logp[micro], mask, rl.kl.estimator)
        losses["kl_loss"] = aggregation.reduce(kl, mask, rl.max_new_tokens)
        loss = loss + beta * losses["kl_loss"]
    (loss * loss_share).backward()
    stats = {"policy_clip_fraction": pg.clip_fraction, "approx_kl": pg.approx_kl, "ratio_mean": pg.ratio_mean,
             "ratio_var": pg.ratio_var, "entropy": A.masked_mean(A.entropy(logits.detach(), rl.temperature), mask)}

    if roles.critic is not None:
        with precision():
            predicted = roles.values(query, query_mask, response)
        vf_loss, vf_clip = A.value_loss(predicted, rollout.values[micro], rollout.returns[micro], mask, rl.clip_value)
        (vf_loss * token_share).backward()
        stats |= {"value_loss": vf_loss, "value_clip_fraction": vf_clip}
    return {key: token_share * value.detach().float() for key, value in stats.items()} | {
        key: loss_share * value.detach().float() for key, value in losses.items()}


def flat_gradients(params) -> torch.Tensor:
    """One buffer that holds every gradient, each parameter's `.grad` a view into it: a single all-reduce
    sums them all in place, with no copies in or out."""
    flat = torch.zeros(sum(p.numel() for p in params), device=params[0].device)
    for param, grad in zip(params, flat.split([p.numel() for p in params])):
        param.grad = grad.view_as(param)
    return flat


def over_workers(local: dict, world: int, device, mean: bool) -> dict[str, float]:
    """Scalars summed, or averaged, over workers, in one all-reduce on the process group's device."""
    keys = sorted(local)
    stacked = summed(torch.stack([torch.as_tensor(local[k], dtype=torch.float64, device=device).reshape(()) for k in keys]), world)
    if mean:
        stacked /= world
    return {k: float(v) for k, v in zip(keys, stacked.tolist())}
