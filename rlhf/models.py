"""Model provisioning, used by every stage: build from scratch, load pretrained, or load a stage's output.

A scratch model gets a byte-level BPE tokenizer trained on the stage's text
(pad and EOS tokens, role tokens, a chat template) and a small Llama-style
model. Whatever a stage trains is saved with its tokenizer, so later stages
load one directory and never rebuild anything.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
from filelock import FileLock
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from rlhf.blocks import PretrainedModel, ScratchModel
from rlhf.errors import InputError
from rlhf.store import digest_tree

log = logging.getLogger("rlhf")

PAD, EOS = "<|pad|>", "<|eos|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")

# Assistant turns end with the tokenizer's EOS; the generation prompt is the assistant tag, so
# the rendered prompt is a prefix of prompt + completion (TRL's completion mask needs that).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "<|{{ message['role'] }}|>{{ message['content'] }}"
    "{%- if message['role'] == 'assistant' -%}{{ eos_token }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)
# For a pretrained tokenizer without a chat template: role names as plain text, which any
# vocabulary spells, and the tokenizer's own EOS closing each assistant turn.
PLAIN_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}"
    "{%- if message['role'] == 'assistant' -%}{{ eos_token }}{%- endif -%}"
    "{{ '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}Assistant:{%- endif -%}"
)
_HUB_FILES = ["*.json", "*.jinja", "*.txt", "*.model", "*.tiktoken", "*.py"]  # config, tokenizer, code; weights chosen below
_PROBE = [{"role": "user", "content": "Hello?"}, {"role": "assistant", "content": "Hi."}]


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


def provision(config: ScratchModel | PretrainedModel, texts: Iterable[str], seed: int, where: str, into: Path, home: Path) -> Path:
    """The directory of the stage's starting model and tokenizer.

    A scratch model is built and saved to `into` once per attempt, so a resumed
    attempt loads exactly the model it began with; a pretrained one is
    prepared once per home (`pretrained_dir`).
    """
    if isinstance(config, PretrainedModel):
        return pretrained_dir(config, home, where)
    if not (into / "config.json").exists():
        tokenizer = train_tokenizer(texts, config.vocab_size)
        model = build_model(config, tokenizer, seed)
        _save_whole(model, tokenizer, into)
    return into


def unwrapped(model):
    """The model under a peft wrapper, or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off in every layer, LoRA's included, as TRL does for RL: log-probs taken in eval mode and
    again in train mode must agree, or the first update's ratio is not 1. Attention dropout is a float on
    the attention modules of Llama-like models, not a Dropout layer."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def save_adapter(model, into: Path) -> None:
    """A peft adapter, its config byte-stable: peft writes `target_modules` from a set, in an order that
    changes with each process's hash seed, and the stage's output digest would change with it."""
    model.save_pretrained(into)
    path = into / "adapter_config.json"
    config = json.loads(path.read_text())
    for key in ("target_modules", "modules_to_save"):
        if isinstance(config.get(key), list):
            config[key] = sorted(config[key])
    path.write_text(json.dumps(config, indent=2, sort_keys=True))


def _save_whole(model, tokenizer, into: Path) -> None:
    """Save into a sibling and rename: a crash leaves the model complete or absent, never half written."""
    partial = into.with_name(into.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(into, ignore_errors=True)  # what an older, interrupted attempt left
    partial.rename(into)


def pretrained_dir(config: PretrainedModel, home: Path, where: str) -> Path:
    """A directory `from_pretrained` loads the model and its usable tokenizer from.

    A local directory or hub snapshot whose tokenizer needs nothing is used as
    it is. A GGUF file is dequantised, and a tokenizer without a padding token
    or chat template completed, once: the result is cached under
    `<home>/models/`, keyed by the file's digest (GGUF) or by path and revision.
    """
    source = _source_dir(config, where)
    if config.gguf_file is None:
        tokenizer = _load(AutoTokenizer, source, config, where)
        if tokenizer.pad_token is not None and tokenizer.chat_template is not None:
            _check_eos(tokenizer, where)
            return source
        key = hashlib.sha256(f"{source}@{config.revision}".encode()).hexdigest()[:16]
    else:
        if not (source / config.gguf_file).is_file():
            raise InputError(f"{where}.gguf_file: {config.gguf_file!r} is not a file in {source}")
        key = "gguf-" + digest_tree(source / config.gguf_file)[:16]
    cached = home / "models" / key
    cached.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{cached}.lock"):  # two runs on one home prepare it once
        if not (cached / "config.json").exists():
            _prepare(source, config, where, cached)
    return cached


def _prepare(source: Path, config: PretrainedModel, where: str, into: Path) -> None:
    log.info("preparing %s%s once for this home in %s", source, f" ({config.gguf_file})" if config.gguf_file else "", into)
    tokenizer = _load(AutoTokenizer, source, config, where)
    model = _load(AutoModelForCausalLM, source, config, where)
    if getattr(model, "hf_quantizer", None) is not None:  # dequantised GGUF: save plain weights
        model.hf_quantizer = None
        del model.config.quantization_config
    _check_eos(tokenizer, where)
    if tokenizer.pad_token is None:  # many causal LMs ship without one; padding is masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        tokenizer.chat_template = PLAIN_CHAT_TEMPLATE
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    _save_whole(model, tokenizer, into)


def _source_dir(config: PretrainedModel, where: str) -> Path:
    """`package:NAME` -> the package's folder (found without importing it); a hub id -> its local snapshot."""
    if config.path.startswith("package:"):
        name = config.path.removeprefix("package:")
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise InputError(f"{where}.path: no installed package {name!r} (see the README for how to install it)")
        return Path(spec.submodule_search_locations[0])
    if Path(config.path).expanduser().is_dir():
        return Path(config.path).expanduser().resolve()
    from huggingface_hub import snapshot_download

    wanted = [*_HUB_FILES, config.gguf_file or "*.safetensors"]
    try:
        snapshot = Path(snapshot_download(config.path, revision=config.revision, allow_patterns=wanted))
        if config.gguf_file is None and config.pickled_weights and not any(snapshot.glob("*.safetensors")):  # older repos
            snapshot = Path(snapshot_download(config.path, revision=config.revision, allow_patterns=[*wanted, "*.bin"]))
    except Exception as exc:  # offline misses, unknown repos and bad ids all land here
        raise InputError(f"{where}.path: cannot load {config.path!r}: {exc}".replace("\n", " ")) from None
    return snapshot


def _load(cls, source: Path, config: PretrainedModel, where: str):
    kwargs = {"revision": config.revision, "trust_remote_code": config.trust_remote_code}
    if config.gguf_file:
        kwargs["gguf_file"] = config.gguf_file
    elif cls is not AutoTokenizer and not config.pickled_weights:
        if not any(source.glob("*.safetensors")) and any(source.glob("*.bin")):
            raise InputError(
                f"{where}.path: {config.path!r} has only pickled weights (*.bin), and loading those can run code; "
                f"convert them to safetensors, or set {where}.pickled_weights: true if you trust where they come from"
            )
        kwargs["use_safetensors"] = True
    try:
        return cls.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise InputError(f"{where}.path: cannot load {config.path!r}: {exc}".replace("\n", " ")) from None


def _check_eos(tokenizer, where: str) -> None:
    if tokenizer.eos_token is None:
        raise InputError(
            f"{where}.path: the tokenizer has no EOS token, so a response could never end; "
            "choose a model whose tokenizer defines eos_token"
        )


def load_tokenizer(directory: Path, padding_side: str = "right"):
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.padding_side = padding_side
    return tokenizer


# Models this project saved, or a reward model a pipeline names: safetensors only, never pickles.
PROMPT_ADAPTER = "prompt"  # inside a saved policy: a prompt-learning adapter to apply to its weights


def load_causal_lm(directory: Path, dtype: torch.dtype | None = None):
    """`dtype`: the weights' dtype as loaded, whatever the checkpoint's (default fp32: a bf16 hub checkpoint
    trains in fp32 unless a stage's precision says bf16); loading in bf16 never holds an fp32 copy."""
    model = AutoModelForCausalLM.from_pretrained(directory, use_safetensors=True, dtype=dtype or torch.float32)
    model.get_output_embeddings().register_forward_pre_hook(_contiguous_input)
    if (Path(directory) / PROMPT_ADAPTER).is_dir():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, Path(directory) / PROMPT_ADAPTER)
    return model


def _contiguous_input(module, args):
    """The LM head's input as one block. `logits_to_keep` hands it a strided view of the last positions, and a
    bf16 product on such a view took 0.9-1.1 s and 0.9 GB over SmolLM2's 49k-token head on a CPU, against 7-100 ms
    and no more than its output for the same rows copied (torch 2.13, AVX512-BF16; in fp32 a third slower)."""
    return (args[0].contiguous(), *args[1:])


def load_reward_model(directory: Path, dtype: torch.dtype | None = None):
    """A saved reward model (one output, pooling on its own padding token), its weights in `dtype` (default fp32)."""
    return AutoModelForSequenceClassification.from_pretrained(directory, num_labels=1, use_safetensors=True,
                                                              dtype=dtype or torch.float32)


def new_reward_model(base: Path, dtype: torch.dtype | None = None):
    """A reward model on a causal LM's weights (score head starts random), in `dtype` (default fp32), and the
    tokenizer it scores with.

    The sequence-classification head scores the rightmost token that is not
    padding. When padding is also a token the chat template writes (pad equal
    to EOS, as in SmolLM2, Llama and Qwen), that would skip a real end of
    turn, so the reward model pads with a special token the template never
    writes, or with a new one (its embedding grows by a row nobody samples).
    """
    tokenizer = load_tokenizer(base)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, use_safetensors=True,
                                                               dtype=dtype or torch.float32)
    written = set(tokenizer.apply_chat_template(_PROBE, tokenize=True, return_dict=False))
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id in written:
        spare = [t.content for i, t in sorted(tokenizer.added_tokens_decoder.items()) if t.special and i not in written]
        if spare:
            tokenizer.pad_token = spare[0]
        else:
            tokenizer.add_special_tokens({"pad_token": PAD})
            model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
