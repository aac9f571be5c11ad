"""Sampling and scoring in batches, with the same settings everywhere.

Prompts are rendered with the chat template and left-padded; sampling uses
plain temperature (top_k 0, top_p 1), so the distribution sampled is the one
the log-probabilities describe.
"""

from __future__ import annotations

import torch

from rlhf.data.formats import Messages


def render(tokenizer, prompt: Messages, response: str | None = None) -> str:
    if response is None:
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": response}], tokenize=False)


@torch.no_grad()
def sample(
    model, tokenizer, prompts: list[Messages], max_new_tokens: int, temperature: float, seed: int, batch_size: int = 128
) -> tuple[list[str], list[bool]]:
    """One sampled response per prompt, decoded without special tokens, and whether each ended with EOS."""
    model.eval()
    tokenizer.padding_side = "left"
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    responses, ended = [], []
    for start in range(0, len(prompts), batch_size):
        texts = [render(tokenizer, p) for p in prompts[start : start + batch_size]]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        out = model.generate(
            **batch,
            do_sample=True,
            temperature=temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        generated = out[:, batch["input_ids"].shape[1] :]
        responses += tokenizer.batch_decode(generated, skip_special_tokens=True)
        ended += (generated == tokenizer.eos_token_id).any(-1).tolist()
    torch.random.set_rng_state(generator_state)
    return responses, ended


@torch.no_grad()
def score(reward_model, tokenizer, prompts: list[Messages], responses: list[str], max_length: int, batch_size: int = 64) -> list[float]:
    """Reward-model scores of (prompt, response) pairs."""
    reward_model.eval()
    tokenizer.padding_side = "left"  # keeps the truncation and the scored last token at the response end
    tokenizer.truncation_side = "left"
    scores = []
    for start in range(0, len(prompts), batch_size):
        texts = [render(tokenizer, p, r) for p, r in zip(prompts[start : start + batch_size], responses[start : start + batch_size])]
        batch = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length, add_special_tokens=False)
        logits = reward_model(**batch.to(reward_model.device)).logits
        scores += logits[:, 0].float().tolist()
    return scores
