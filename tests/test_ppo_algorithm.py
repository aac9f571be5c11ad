"""PPO maths against numbers worked out by hand (see shared/ppo-notes.md for the list)."""

import math

import pytest
import torch

from rlhf.ppo import algorithm as A
from rlhf.ppo.methods import POLICY_LOSSES

clip_loss = POLICY_LOSSES["clip"]


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_per_token_reward_is_kl_penalty_plus_score_on_the_last_real_token():
    kl = t([0.1, 0.2, 0.3, 0.4])
    mask = t([1, 1, 1, 0])  # EOS at index 2, padding after
    rewards, non_score = A.per_token_rewards(torch.tensor([2.0]), kl, mask, beta=0.5)
    assert non_score[0].tolist() == pytest.approx([-0.05, -0.1, -0.15, 0.0])
    assert rewards[0].tolist() == pytest.approx([-0.05, -0.1, -0.15 + 2.0, 0.0])
    # a truncated response (no EOS) gets its score on its final token
    rewards, _ = A.per_token_rewards(torch.tensor([1.0]), kl, t([1, 1, 1, 1]), beta=0.0)
    assert rewards.tolist() == [[0.0, 0.0, 0.0, 1.0]]


def test_kl_estimators():
    logp, ref = t([math.log(0.5)]), t([math.log(0.25)])
    mask = t([1.0])
    assert A.kl_estimate(logp, ref, mask, "k1").item() == pytest.approx(math.log(2))
    # k3 = (r - 1) - log r with r = p_ref / p = 0.5
    assert A.kl_estimate(logp, ref, mask, "k3").item() == pytest.approx(-0.5 + math.log(2))
    assert A.kl_estimate(logp, ref, t([0.0]), "k3").item() == 0.0
    with pytest.raises(ValueError):
        A.kl_estimate(logp, ref, mask, "k9")


def test_kl_controller_fixed_and_adaptive():
    fixed = A.KLController(0.1, target=None)
    fixed.update(kl=100.0, n_steps=32)
    assert fixed.beta == 0.1
    adaptive = A.KLController(0.1, target=6.0, horizon=10000)
    adaptive.update(kl=9.0, n_steps=32)  # error 0.5 clipped to 0.2
    assert adaptive.beta == pytest.approx(0.1 * (1 + 0.2 * 32 / 10000))
    adaptive.update(kl=5.4, n_steps=100)  # error -0.1
    assert adaptive.beta == pytest.approx(0.1 * (1 + 0.2 * 32 / 10000) * (1 - 0.1 * 100 / 10000))
    restored = A.KLController(1.0)
    restored.load_state_dict(adaptive.state_dict())
    assert restored.beta == adaptive.beta and restored.target == 6.0
    floored = A.KLController(0.05, target=6.0, horizon=16, min_beta=0.04)
    floored.update(kl=0.0, n_steps=16)  # 0.05 -> 0.04 -> 0.032, held at the floor
    floored.update(kl=0.0, n_steps=16)
    assert floored.beta == 0.04
    floored.update(kl=12.0, n_steps=16)
    assert floored.beta == pytest.approx(0.04 * 1.2)


def test_score_normalisation_clipping_and_missing_eos_penalty():
    scores = torch.tensor([3.0, -1.0, 23.0])
    assert A.normalise_scores(scores, mean=1.0, std=2.0, clip=None).tolist() == [1.0, -1.0, 11.0]
    assert A.normalise_scores(scores, mean=1.0, std=2.0, clip=5.0).tolist() == [1.0, -1.0, 5.0]
    ended = torch.tensor([True, False, True])
    assert A.apply_missing_eos_penalty(scores, ended, -2.0).tolist() == [3.0, -2.0, 23.0]
    assert A.apply_missing_eos_penalty(scores, ended, None).tolist() == [3.0, -1.0, 23.0]


def test_gae_right_to_left_with_padding_zeroed():
    rewards = t([0.0, 0.0, 1.0, 9.0])  # the 9 sits under padding and must not count
    values = t([0.5, 0.4, 0.8, 7.0])
    mask = t([1, 1, 1, 0])
    advantages, returns = A.gae(rewards, values, mask, gamma=1.0, lam=0.95)
    # deltas: d2 = 1 + 0 - 0.8 = 0.2; d1 = 0 + 0.8 - 0.4 = 0.4; d0 = 0 + 0.4 - 0.5 = -0.1
    a2 = 0.2
    a1 = 0.4 + 0.95 * a2
    a0 = -0.1 + 0.95 * a1
    assert advantages[0].tolist() == pytest.approx([a0, a1, a2, 0.0])
    assert returns[0].tolist() == pytest.approx([a0 + 0.5, a1 + 0.4, a2 + 0.8, 0.0])


def test_masked_whitening_uses_only_real_tokens():
    values = t([1.0, 2.0, 3.0, 100.0])
    mask = t([1, 1, 1, 0])
    whitened = A.masked_whiten(values, mask)
    # mean 2, unbiased var 1 over the three real tokens
    assert whitened[0].tolist() == pytest.approx([-1.0, 0.0, 1.0, 0.0], abs=1e-6)
    assert A.masked_mean(values, mask).item() == 2.0 and A.masked_var(values, mask).item() == pytest.approx(1.0)


def test_clipped_policy_loss_by_hand():
    old = t([0.0, 0.0])
    new = t([math.log(1.5), math.log(0.5)])  # ratios 1.5 and 0.5
    mask = t([1, 1])
    out = clip_loss(new, old, t([1.0, 1.0]), mask, 0.2)
    # token 0: max(-1.5, -1.2) = -1.2 (clipped); token 1: max(-0.5, -0.8) = -0.5 (unclipped)
    assert out.per_token[0].tolist() == pytest.approx([-1.2, -0.5])
    assert out.clip_fraction.item() == pytest.approx(0.5)
    assert out.ratio_mean.item() == pytest.approx(1.0)
    assert out.approx_kl.item() == pytest.approx(0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2) / 2)
    negative = clip_loss(new, old, t([-1.0, -1.0]), mask, 0.2)
    # token 0: max(1.5, 1.2) = 1.5; token 1: max(0.5, 0.8) = 0.8 (clipped)
    assert negative.per_token[0].tolist() == pytest.approx([1.5, 0.8])


def test_clipped_value_loss_by_hand():
    old, new, returns = t([1.0, 1.0]), t([2.0, 1.1]), t([3.0, 0.0])
    loss, clip_fraction = A.value_loss(new, old, returns, t([1, 1]), clip=0.2)
    # token 0: unclipped (2-3)^2 = 1, clipped (1.2-3)^2 = 3.24 -> 3.24; token 1: (1.1)^2 = 1.21 both
    assert loss.item() == pytest.approx(0.5 * (3.24 + 1.21) / 2)
    assert clip_fraction.item() == pytest.approx(0.5)


def test_logprobs_and_entropy_use_the_temperature():
    logits = t([2.0, 0.0, -1.0]).unsqueeze(0)  # [batch 1, length 1, vocab 3]
    tokens = torch.tensor([[0]])
    scaled = torch.log_softmax(logits / 0.5, -1)
    assert A.token_logprobs(logits, tokens, 0.5).item() == pytest.approx(scaled[0, 0, 0].item(), abs=1e-6)
    assert A.entropy(logits, 1.0).item() == pytest.approx(-(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_logprobs_and_entropy_equal_the_full_log_softmax(monkeypatch, dtype):
    monkeypatch.setattr(A, "CHUNK_ELEMENTS", 3 * 2 * 11)  # blocks of 2 positions over a batch of 3: 4 blocks of 7
    full = torch.randn(3, 8, 11, generator=torch.Generator().manual_seed(0)).to(dtype).requires_grad_()
    logits = full[:, :-1]  # the view response_logits returns: not contiguous
    tokens = torch.randint(0, 11, (3, 7), generator=torch.Generator().manual_seed(1))
    weights = torch.randn(3, 7, generator=torch.Generator().manual_seed(2))
    logp = A.token_logprobs(logits, tokens, 0.7)
    (grad,) = torch.autograd.grad((logp * weights).sum(), full)
    want_logp = torch.log_softmax(logits.float() / 0.7, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    (want_grad,) = torch.autograd.grad((want_logp * weights).sum(), full)
    assert logp.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(logp, want_logp)
    torch.testing.assert_close(grad, want_grad)
    scaled = torch.log_softmax(logits.detach().float() / 0.7, -1)
    torch.testing.assert_close(A.entropy(logits, 0.7), -(scaled.exp() * scaled).sum(-1))


def test_logprobs_keep_no_vocabulary_wide_tensor_for_the_backward_but_the_logits():
    logits = torch.randn(2, 5, 50, requires_grad=True) * 1.0
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        A.token_logprobs(logits, torch.zeros(2, 5, dtype=torch.long), 0.7)
    wide = [x for x in saved if x.shape[-1] == 50]
    assert len(wide) == 1 and wide[0].data_ptr() == logits.data_ptr()


def test_response_mask_stops_after_the_first_eos():
    eos = 1
    responses = torch.tensor([[5, 6, 1, 0, 0], [5, 1, 7, 1, 0], [5, 6, 7, 8, 9]])
    mask, ended = A.response_mask(responses, eos)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert ended.tolist() == [True, True, False]


# ---------------------------------------------------------------- critic-free estimators


def test_sequence_reward_subtracts_beta_times_the_summed_kl_of_real_tokens():
    kl, mask = t([0.5, 1.0, 3.0], [2.0, 0.0, 0.0]), t([1, 1, 0], [1, 0, 0])
    assert A.sequence_rewards(torch.tensor([1.0, 2.0]), kl, mask, beta=0.1).tolist() == pytest.approx([0.85, 1.8])


def test_reinforce_returns_to_go_sum_the_rewards_ahead_and_ignore_padding():
    rewards, mask = t([-0.1, -0.2, 1.0, 5.0]), t([1, 1, 1, 0])  # the 5 sits under padding
    assert A.returns_to_go(rewards, mask)[0].tolist() == pytest.approx([0.7, 0.8, 1.0, 0.0])
    assert A.returns_to_go(rewards, mask, gamma=0.5)[0].tolist() == pytest.approx([-0.1 - 0.1 + 0.25, -0.2 + 0.5, 1.0, 0.0])


def test_the_k3_kl_term_pulls_the_policy_towards_the_reference():
    logp = torch.tensor([[math.log(0.5), math.log(0.5), 0.0]], requires_grad=True)
    ref, mask = t([math.log(0.25), math.log(0.5), 0.0]), t([1, 1, 0])
    loss = A.masked_mean(A.kl_estimate(logp, ref, mask, "k3"), mask)
    assert loss.item() == pytest.approx((-0.5 + math.log(2) + 0.0) / 2)
    loss.backward()
    # d k3 / d logp = 1 - r with r = p_ref / p: 0.5 where the policy is above the reference, 0 where equal
    assert logp.grad[0].tolist() == pytest.approx([0.25, 0.0, 0.0])
