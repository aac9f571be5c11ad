"""Model provisioning, used by every stage: build from scratch, load pretrained, or load a stage's output.

A scratch model gets a byte-level BPE tokenizer trained on the stage's text
(pad and EOS tokens, role tokens, a chat template) and a small Llama-style
model. Whatever a stage trains is saved with its tokenizer, so later stages
load one directory and never rebuild anything.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from rlhf.config import PretrainedModel, ScratchModel
from rlhf.errors import InputError

log = logging.getLogger("rlhf")

PAD, EOS = "<|pad|>", "<|eos|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")

# Assistant turns end with EOS; the generation prompt is the assistant tag, so
# the rendered prompt is a prefix of prompt + completion (TRL's completion mask needs that).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "<|{{ message['role'] }}|>{{ message['content'] }}"
    "{%- if message['role'] == 'assistant' -%}<|eos|>{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, EOS, *ROLE_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token=PAD, eos_token=EOS, extra_special_tokens=list(ROLE_TOKENS)
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(config: ScratchModel, tokenizer: PreTrainedTokenizerFast, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_hidden_layers=config.layers,
            num_attention_heads=config.heads,
            num_key_value_heads=config.heads,
            max_position_embeddings=config.max_positions,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=None,
            tie_word_embeddings=True,
        )
    )
    log.info("built a %s-parameter Llama-style model from scratch", f"{model.num_parameters():,}")
    return model


def provision(config: ScratchModel | PretrainedModel, texts: Iterable[str], seed: int, where: str, into: Path) -> Path:
    """Make the stage's starting model and tokenizer and save them to `into`; returns `into`.

    Saved once per attempt, so a resumed attempt loads exactly the model it began with.
    """
    if (into / "config.json").exists():
        return into
    if isinstance(config, ScratchModel):
        tokenizer = train_tokenizer(texts, config.vocab_size)
        model = build_model(config, tokenizer, seed)
    else:
        tokenizer, model = load_pretrained(config, where)
    into.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(into)
    tokenizer.save_pretrained(into)
    return into


def load_pretrained(config: PretrainedModel, where: str):
    kwargs = {"revision": config.revision, "trust_remote_code": config.trust_remote_code}
    try:
        tokenizer = AutoTokenizer.from_pretrained(config.path, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(config.path, **kwargs)
    except (OSError, ValueError) as exc:
        raise InputError(f"{where}.path: cannot load {config.path!r}: {exc}".replace("\n", " ")) from None
    if tokenizer.pad_token is None:  # many causal LMs ship without one; padding is masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        tokenizer.chat_template = CHAT_TEMPLATE
    model.config.pad_token_id = tokenizer.pad_token_id
    return tokenizer, model


def load_tokenizer(directory: Path, padding_side: str = "right"):
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.padding_side = padding_side
    return tokenizer


def load_causal_lm(directory: Path):
    return AutoModelForCausalLM.from_pretrained(directory)


def load_reward_model(directory: Path, pad_token_id: int):
    """A sequence-classification model with one output; from a causal LM its score head starts random."""
    model = AutoModelForSequenceClassification.from_pretrained(directory, num_labels=1)
    model.config.pad_token_id = pad_token_id
    return model
