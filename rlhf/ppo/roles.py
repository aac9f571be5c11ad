"""The models of an RL run, by role: the actor, its reference, the critic (PPO only) and the reward model.

The actor is the starting policy with a LoRA adapter; its reference is the
same weights with the adapter switched off, so it costs no memory. The
critic is a trainable copy of the reward model whose score head, applied at
every position, gives values; a critic-free method loads none. The reward
model is frozen and scores decoded text with its own tokenizer, as in
reward training and evaluation. A LoRA critic over the reward model's own
weights is the reward model too, with its adapter switched off: one base
in memory for both.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf import generation, models, precision
from rlhf.blocks import Lora
from rlhf.stages.rl.config import RlStage
from rlhf.training import peft_config


@dataclass
class Roles:
    actor: torch.nn.Module
    critic: torch.nn.Module | None
    reward: torch.nn.Module | None  # None: the critic's base, its adapter off, is the reward model
    tokenizer: object  # the actor's, left-padding
    reward_tokenizer: object
    value_offset: float = 0.0  # added to the critic's head output (`on_score_scale`)

    def reference(self) -> AbstractContextManager:
        """While open, the actor computes as the reference policy."""
        return self.actor.disable_adapter()

    @torch.no_grad()
    def scores(self, prompts: list, texts: list[str]) -> torch.Tensor:
        with self._reward_model() as reward:
            raw = generation.score(reward, self.reward_tokenizer, prompts, texts, max_length=None)
        return torch.tensor(raw, device=self.actor.device)

    @contextmanager
    def _reward_model(self):
        if self.reward is not None:
            yield self.reward
            return
        with self.critic.disable_adapter():
            yield self.critic

    def values(self, query, query_mask, response) -> torch.Tensor:
        return values(self.critic, query, query_mask, response) + self.value_offset

    @torch.no_grad()
    def on_score_scale(self, normalisation: dict, fresh: bool) -> None:
        """Put the critic on the scale of its targets. It starts as the reward model, whose raw scores have
        the normalisation's mean and std on the starting policy's samples, while the returns it learns are
        built from normalised scores: at the start its head's weights are divided by the std (restored
        weights already were), and its output is offset by -mean / std, as InstructGPT folds a bias into
        its reward model. The saved critic's head is the scaled one; add the same offset to its output."""
        if self.critic is None:
            return
        if fresh:
            head = models.unwrapped(self.critic).score
            trained = head.modules_to_save["default"] if hasattr(head, "modules_to_save") else head  # not the reward model's
            for param in trained.parameters():
                param.div_(normalisation["std"])
        self.value_offset = -normalisation["mean"] / normalisation["std"]

    def trainable(self) -> dict[str, list[torch.nn.Parameter]]:
        models_ = {"policy": self.actor} | ({"critic": self.critic} if self.critic is not None else {})
        return {name: [p for p in model.parameters() if p.requires_grad] for name, model in models_.items()}


def load(policy_dir: Path, reward_dir: Path, rl: RlStage, critic_lora: Lora | None, device: torch.device) -> Roles:
    """In this order: the LoRA initialisations draw from the seeded generator."""
    tokenizer = models.load_tokenizer(policy_dir, padding_side="left")
    reward_tokenizer = models.load_tokenizer(reward_dir, padding_side="left")
    frozen = precision.dtype(rl.precision)  # loaded so: never an fp32 copy of a frozen base
    policy = actor(policy_dir, rl, device, frozen)
    critic_base = None
    if rl.has_critic:
        critic_base = reward_dir if _same_tokens(tokenizer, reward_tokenizer) else policy_dir
    critic = _critic(critic_base, critic_lora, rl, device, frozen) if critic_base is not None else None
    # a LoRA critic over the reward model's own weights is the reward model with its adapter off
    reward = None if critic_lora is not None and critic_base == reward_dir else models.load_reward_model(reward_dir, frozen).to(device)
    if reward is not None:
        reward.eval().requires_grad_(False)
    for model in filter(None, (policy, critic, reward)):  # the reference is the actor without its adapter
        models.disable_dropout(model)
    if rl.precision == "bf16":
        for model in filter(None, (policy, critic, reward)):
            precision.attention(_hold_in_bf16(model), rl.precision, device)
    return Roles(policy, critic, reward, tokenizer, reward_tokenizer)


def _hold_in_bf16(model: torch.nn.Module) -> torch.nn.Module:
    """Frozen weights held in bf16, as a bf16 checkpoint loads: half the memory, no rounding copy per matmul,
    and a bf16 residual stream, which halves what the element-wise operations move. Trainable weights (LoRA,
    a critic's head or all of a full critic) are fp32 and autocast rounds them; buffers (rotary frequencies)
    stay fp32. peft would cast a LoRA layer's bf16 input up to its adapter's fp32 for autocast to round it
    back: the same values, two copies."""
    for param in model.parameters():
        param.data = param.data.to(torch.float32 if param.requires_grad else torch.bfloat16)
    for module in model.modules():
        if hasattr(module, "cast_input_dtype_enabled"):
            module.cast_input_dtype_enabled = False
    return model


def actor(policy_dir: Path, rl: RlStage, device: torch.device, frozen: torch.dtype | None = None):
    from peft import get_peft_model

    policy = get_peft_model(models.load_causal_lm(policy_dir, frozen), peft_config(rl.lora, "CAUSAL_LM")).to(device)
    if rl.gradient_checkpointing:
        policy.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return policy


def _same_tokens(tokenizer, reward_tokenizer) -> bool:
    """Whether every policy token means the same to the reward model. The critic reads the policy's tokens, so
    it starts from the reward model only then; otherwise from the policy's own weights with a new value head."""
    reward_vocab = reward_tokenizer.get_vocab()
    if all(reward_vocab.get(token) == index for token, index in tokenizer.get_vocab().items()):
        return True
    print("rl: the reward model's tokenizer differs from the policy's: the critic starts from the policy", flush=True)
    return False


def _critic(base: Path, lora: Lora | None, rl: RlStage, device, frozen: torch.dtype | None):
    critic = models.load_reward_model(base, frozen if lora is not None else None)  # a full critic trains in fp32
    if lora is not None:
        from peft import get_peft_model

        critic = get_peft_model(critic, peft_config(lora, "SEQ_CLS", modules_to_save=["score"]))
    if rl.gradient_checkpointing:
        models.unwrapped(critic).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return critic.to(device)


# ---------------------------------------------------------------- forward passes over prompt + response


def sequence(query, query_mask, response):
    """Prompt and response as one sequence. Tokens after a response's EOS stay visible: attention is causal,
    so no position up to the EOS can see them, and an all-ones mask keeps the fast causal attention path."""
    input_ids = torch.cat([query, response], dim=1)
    attention_mask = torch.cat([query_mask, torch.ones_like(response)], dim=1)
    return input_ids, attention_mask, generation.positions(attention_mask)


def response_logits(model, query, query_mask, response, repeats: int = 1):
    """Logits that predict each response token; the LM head never runs at the other prompt positions. With
    `repeats`, rows come in runs of that many responses to one prompt, and the prompt runs once per run."""
    input_ids, attention_mask, position_ids = sequence(query, query_mask, response)
    if repeats > 1:
        first, cache = generation.prefill(model, query[::repeats], query_mask[::repeats], repeats)
        if response.shape[1] == 1:
            return first
        # the last response token predicts nothing, so it never runs
        rest = model(input_ids=response[:, :-1], attention_mask=attention_mask[:, :-1],
                     position_ids=position_ids[:, query.shape[1] : -1], cache=cache, use_cache=True).logits
        return torch.cat([first, rest], dim=1)
    keep = response.shape[1] + 1
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                   logits_to_keep=keep).logits
    return logits[:, :-1]


def values(critic, query, query_mask, response) -> torch.Tensor:
    """The critic's value at each response token (the position before it)."""
    input_ids, attention_mask, position_ids = sequence(query, query_mask, response)
    base = models.unwrapped(critic)
    hidden = getattr(base, base.base_model_prefix)(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state
    return base.score(hidden).squeeze(-1).float()[:, query.shape[1] - 1 : -1]
