"""Sampling, decoding and scoring in batches, with the same settings everywhere.

Prompts are rendered with the chat template and left-padded. Sampling uses an
explicit generation config (plain temperature: top_k 0, top_p 1, no
penalties) with the model's own `generation_config` set aside, so what is
sampled is the distribution the log-probabilities describe, whatever
defaults a pretrained checkpoint ships. Responses are decoded up to their
first EOS only, and scored as the chat template renders them, in PPO,
reward training and evaluation alike.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from transformers import GenerationConfig

from rlhf import models, progress
from rlhf.data.formats import Messages


def render(tokenizer, prompt: Messages, response: str | None = None) -> str:
    if response is None:
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": response}], tokenize=False)


def sampling_config(tokenizer, max_new_tokens: int, temperature: float) -> GenerationConfig:
    return GenerationConfig(
        do_sample=True,
        temperature=temperature,
        top_k=0,
        top_p=1.0,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


@contextmanager
def _only(model, config: GenerationConfig):
    """`generate` fills unset fields from the model's generation_config; swap in ours so nothing comes from there."""
    target = models.unwrapped(model)
    saved, target.generation_config = target.generation_config, config
    try:
        yield
    finally:
        target.generation_config = saved


def generate(model, batch, config: GenerationConfig, repeats: int = 1) -> torch.Tensor:
    """The generated tokens only: [batch x repeats, <= max_new_tokens], padded after each response's EOS, a prompt's
    `repeats` responses consecutive. Their prompt runs through the model once, not once per response."""
    prompt_length = batch["input_ids"].shape[1]
    if repeats > 1 and prompt_length > 1:
        # all but the last prompt token: generate computes the positions the cache lacks, and samples from there
        ids, mask = batch["input_ids"], batch["attention_mask"]
        _, cache = prefill(model, ids[:, :-1], mask[:, :-1], repeats)
        batch = {"input_ids": ids.repeat_interleave(repeats, 0), "attention_mask": mask.repeat_interleave(repeats, 0),
                 "cache": cache}
    elif repeats > 1:
        batch = {key: value.repeat_interleave(repeats, 0) for key, value in batch.items()}
    with _only(model, config):
        out = model.generate(**batch, generation_config=config)
    return out[:, prompt_length:]


def prefill(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, repeats: int):
    """The logits at each (left-padded) prompt's last position, and its keys and values, each repeated `repeats`
    times: what a batch of each prompt `repeats` times over computes, at a `repeats`-th of the cost."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions(attention_mask), use_cache=True,
                logits_to_keep=1)
    out.cache.batch_repeat_interleave(repeats)
    return out.logits.repeat_interleave(repeats, 0), out.cache


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as `generate` uses them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def decode(tokenizer, generated: torch.Tensor) -> tuple[list[str], list[bool]]:
    """Each response's text before its first EOS, and whether it has one.

    Never decodes padding, and never mistakes padding for text or text for
    padding when the padding token is the EOS token.
    """
    eos = tokenizer.eos_token_id
    texts, ended = [], []
    for row in generated.tolist():
        cut = row.index(eos) if eos in row else len(row)
        texts.append(tokenizer.decode(row[:cut], skip_special_tokens=True))
        ended.append(cut < len(row))
    return texts, ended


@torch.no_grad()
def sample(
    model, tokenizer, prompts: list[Messages], max_new_tokens: int, temperature: float, seed: int, batch_size: int = 128,
    phase: str | None = None, repeats: int = 1,
) -> tuple[list[str], list[bool]]:
    """`repeats` sampled responses per prompt, consecutive, and whether each ended with EOS; `batch_size` counts
    responses; `phase` names it on the progress display."""
    model.eval()
    tokenizer.padding_side = "left"
    config = sampling_config(tokenizer, max_new_tokens, temperature)
    responses, ended = [], []
    step = max(1, batch_size // repeats)
    with torch.random.fork_rng(devices=[model.device] if model.device.type == "cuda" else []):  # callers' streams stay untouched
        torch.manual_seed(seed)
        for start in range(0, len(prompts), step):
            texts = [render(tokenizer, p) for p in prompts[start : start + step]]
            batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            decoded, finished = decode(tokenizer, generate(model, batch, config, repeats))
            responses += decoded
            ended += finished
            if phase:
                progress.report(phase, len(responses), len(prompts) * repeats)
    return responses, ended


@torch.no_grad()
def score(reward_model, tokenizer, prompts: list[Messages], responses: list[str], max_length: int, batch_size: int = 64) -> list[float]:
    """Reward-model scores of (prompt, response) pairs, with the reward model's own tokenizer.

    Left padding keeps the truncation and the scored last token at the end of the rendered turn.
    """
    reward_model.eval()
    tokenizer.padding_side = "left"
    tokenizer.truncation_side = "left"
    scores = []
    for start in range(0, len(prompts), batch_size):
        texts = [render(tokenizer, p, r) for p, r in zip(prompts[start : start + batch_size], responses[start : start + batch_size])]
        batch = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length, add_special_tokens=False)
        logits = reward_model(**batch.to(reward_model.device)).logits
        scores += logits[:, 0].float().tolist()
    return scores
