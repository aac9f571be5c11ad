"""Training-time log-probs are those of the distribution `generate` sampled from (shared/ppo-notes.md, item 10).

Prompts of clearly different lengths are left-padded by different amounts, so the positions a forward
pass over prompt + response gives each token matter. The Llama-style scratch model uses rotary
embeddings, which see only differences of positions: a padding offset shared by a row's tokens cancels
there. A GPT-2-style model adds a learned embedding of each absolute position, so there any position off
by the padding changes every log-prob.
"""

import copy

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from rlhf import generation, models
from rlhf.stages.rl.config import PpoStage
from rlhf.ppo import algorithm as A
from rlhf.ppo import roles as R
from rlhf.ppo import rollout as rollouts

TEMPERATURE = 0.7
MAX_NEW_TOKENS = 12
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def gpt2_model(tiny_model, tmp_path_factory):
    """A 2-layer GPT-2 with learned absolute position embeddings, on the tiny model's tokenizer. Weights drawn
    wider than GPT-2's 0.02 so its distributions are far from uniform and log-probs differ between positions."""
    _, tokenizer, _ = tiny_model
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_embd=32, n_layer=2, n_head=2, initializer_range=0.3,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=tokenizer.eos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("gpt2")
    GPT2LMHeadModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _prompts(tiny_model):
    """A one-word prompt and two long ones: a dozen or more padding tokens on the short rows."""
    _, _, prompts = tiny_model
    long = prompts[0][0]["content"]
    return [[{"role": "user", "content": "Hi"}], [{"role": "user", "content": " ".join([long] * 3)}], prompts[1]]


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_training_logprobs_are_the_sampling_distributions_of_generate(tiny_model, gpt2_model, architecture):
    directory = tiny_model[0] if architecture == "llama" else gpt2_model
    rl = PpoStage(temperature=TEMPERATURE, max_new_tokens=MAX_NEW_TOKENS)
    torch.manual_seed(0)
    actor = R.actor(directory, rl, CPU).eval()  # the policy as the RL loop holds it: a LoRA adapter on the model
    tokenizer = models.load_tokenizer(directory, padding_side="left")
    texts = [generation.render(tokenizer, p) for p in _prompts(tiny_model)]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    query, query_mask = batch["input_ids"], batch["attention_mask"]
    lengths = query_mask.sum(-1)
    assert lengths.max() - lengths.min() >= 10, lengths  # left padding differs a lot between the rows

    sampling = generation.sampling_config(tokenizer, MAX_NEW_TOKENS, TEMPERATURE)
    recording = copy.deepcopy(sampling)
    recording.update(output_scores=True, return_dict_in_generate=True)  # the engine's sampling, its scores kept
    models.unwrapped(actor).generation_config = recording  # nothing from the model's own defaults
    torch.manual_seed(1)
    with torch.no_grad():
        out = actor.generate(**batch, generation_config=recording)
    response = out.sequences[:, query.shape[1]:]
    mask, _ = A.response_mask(response, tokenizer.eos_token_id)
    # generate's scores are the processed logits it sampled from: here the logits divided by the temperature
    sampled = torch.stack([torch.log_softmax(s.float(), -1) for s in out.scores], dim=1)
    generated = torch.gather(sampled, -1, response.unsqueeze(-1)).squeeze(-1)

    with torch.no_grad():
        trained = A.token_logprobs(R.response_logits(actor, query, query_mask, response), response, TEMPERATURE)

    assert mask.sum() >= 2 * MAX_NEW_TOKENS  # many compared tokens, in several rows
    difference = ((trained - generated) * mask).abs().max().item()
    assert difference < 1e-4, difference
    # the check can see a change in the distribution: the logits at temperature 1 differ by far more
    untempered = A.token_logprobs(R.response_logits(actor, query, query_mask, response), response, 1.0)
    assert ((untempered - generated) * mask).abs().max().item() > 100 * max(difference, 1e-6)


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_a_prompt_run_once_for_its_responses_gives_what_running_it_for_each_one_gives(tiny_model, gpt2_model, architecture):
    """GRPO's groups: sampling and scoring run each prompt once and copy its keys and values to its responses."""
    directory = tiny_model[0] if architecture == "llama" else gpt2_model
    rl = PpoStage(temperature=TEMPERATURE, max_new_tokens=MAX_NEW_TOKENS)
    torch.manual_seed(0)
    actor = R.actor(directory, rl, CPU).eval()
    tokenizer = models.load_tokenizer(directory, padding_side="left")
    sampling = generation.sampling_config(tokenizer, MAX_NEW_TOKENS, TEMPERATURE)
    prompts, repeats = _prompts(tiny_model), 3
    runs = []
    for given, each in ((prompts, repeats), ([p for p in prompts for _ in range(repeats)], 1)):
        torch.manual_seed(1)
        query, query_mask, response, mask, _ = rollouts.generate(actor, tokenizer, given, sampling, CPU, each)
        with torch.no_grad():
            runs.append((query, query_mask, response, R.response_logits(actor, query, query_mask, response, each), mask))
    (query, query_mask, response, shared, mask), (*alone, logits, _) = runs
    for a, b in zip((query, query_mask, response), alone):
        assert torch.equal(a, b)
    assert mask.sum(-1).min() >= 2 and query_mask.sum(-1).unique().numel() == 3  # responses of several tokens, padding differs
    difference = ((shared - logits) * mask.unsqueeze(-1)).abs().max().item()
    assert difference < 1e-4, difference
