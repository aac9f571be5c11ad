from pathlib import Path

import pytest
import torch

from rlhf import generation, models
from rlhf.blocks import PretrainedModel, ScratchModel
from rlhf.config import load_pipeline
from rlhf.errors import InputError
from rlhf.pairs import gold_scorer, label
from rlhf.synthetic_reviews import generate_examples, gold_reward

SCRATCH = ScratchModel(init="scratch", vocab_size=400, hidden_size=32, layers=2, heads=2, intermediate_size=64)


@pytest.fixture(scope="module")
def tokenizer():
    examples = generate_examples(500, 0.25, seed=0)
    return models.train_tokenizer((e["prompt"] + " " + e["completion"] for e in examples), 400)


def test_tokenizer_has_distinct_pad_and_eos_and_single_role_tokens(tokenizer):
    assert tokenizer.pad_token == models.PAD and tokenizer.eos_token == models.EOS
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    for token in models.ROLE_TOKENS:
        assert len(tokenizer(token, add_special_tokens=False).input_ids) == 1
    assert len(tokenizer) <= 400


def test_chat_template_renders_the_prompt_as_a_prefix_ending_in_the_assistant_tag(tokenizer):
    prompt = [{"role": "user", "content": "Review the lamp."}]
    rendered = generation.render(tokenizer, prompt)
    full = generation.render(tokenizer, prompt, "The lamp is great.")
    assert rendered == "<|user|>Review the lamp.<|assistant|>"
    assert full == rendered + "The lamp is great.<|eos|>"
    ids = tokenizer(full, add_special_tokens=False).input_ids
    assert ids[: len(tokenizer(rendered, add_special_tokens=False).input_ids)] == tokenizer(rendered, add_special_tokens=False).input_ids
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Review the lamp.The lamp is great."


def test_scratch_model_size_follows_the_config(tokenizer):
    demo = ScratchModel(init="scratch")
    model = models.build_model(demo, tokenizer, seed=0)
    # per layer: 4 attention projections + 3 MLP projections + 2 norms; tied embeddings
    per_layer = 4 * 128 * 128 + 3 * 128 * 512 + 2 * 128
    assert model.num_parameters() == len(tokenizer) * 128 + 4 * per_layer + 128
    assert 0.9e6 < model.num_parameters() < 1.3e6


def test_provision_saves_once_and_reloads_the_same_model(tokenizer, tmp_path: Path):
    texts = [e["completion"] for e in generate_examples(200, 0.25, seed=0)]
    base = models.provision(SCRATCH, texts, seed=0, where="stages.sft.model", into=tmp_path / "base", home=tmp_path)
    first = (base / "model.safetensors").read_bytes()
    models.provision(SCRATCH, ["other text"], seed=1, where="stages.sft.model", into=base, home=tmp_path)  # already there: kept
    assert (base / "model.safetensors").read_bytes() == first
    loaded = models.load_tokenizer(base)
    assert loaded.chat_template == models.CHAT_TEMPLATE and loaded.pad_token == models.PAD
    assert models.load_causal_lm(base).config.hidden_size == 32


def test_a_bf16_checkpoint_loads_in_fp32_unless_asked_and_its_lm_head_reads_the_kept_positions_as_one_block(
        tokenizer, tmp_path: Path):
    models.build_model(ScratchModel(init="scratch"), tokenizer, seed=0).to(torch.bfloat16).save_pretrained(tmp_path)
    for dtype in (None, torch.bfloat16):
        model = models.load_causal_lm(tmp_path, dtype)
        seen = []
        model.get_output_embeddings().register_forward_pre_hook(lambda module, args: seen.append(args[0].is_contiguous()))
        ids = torch.randint(5, len(tokenizer), (3, 9))
        with torch.no_grad():
            kept = model(input_ids=ids, logits_to_keep=4).logits  # a strided view of the last 4 positions, as RL asks
            whole = model(input_ids=ids).logits[:, -4:]
        assert seen == [True, True] and kept.dtype == (dtype or torch.float32)
        torch.testing.assert_close(kept, whole)


def test_a_missing_pretrained_model_is_an_input_error_naming_the_key(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputError, match=r"^stages.sft.model.path: cannot load .*no-such-model"):
        models.pretrained_dir(PretrainedModel(init="pretrained", path=str(tmp_path / "no-such-model")), tmp_path, "stages.sft.model")


def test_sampling_is_seeded_and_scoring_is_per_pair(tokenizer):
    model = models.build_model(SCRATCH, tokenizer, seed=0)
    prompts = [[{"role": "user", "content": "Review the lamp."}]] * 3
    first, ended = generation.sample(model, tokenizer, prompts, 8, 1.0, seed=5)
    assert len(first) == len(ended) == 3
    assert first == generation.sample(model, tokenizer, prompts, 8, 1.0, seed=5)[0]
    assert first != generation.sample(model, tokenizer, prompts, 8, 1.0, seed=6)[0]


def test_several_responses_per_prompt_are_those_of_the_prompt_given_that_many_times(tokenizer):
    """Pairs sample each prompt once with `repeats`: the same responses as the prompt repeated, in batches that
    split a prompt's responses neither way, across prompts of different lengths (different left padding)."""
    model = models.build_model(SCRATCH, tokenizer, seed=0)
    prompts = [[{"role": "user", "content": text}] for text in ("Review the lamp.", "Hi", "Review the chair, the desk and the shelf.")]
    twice = [p for p in prompts for _ in range(2)]
    for batch_size in (2, 4, 128):
        shared, ended = generation.sample(model, tokenizer, prompts, 8, 1.0, seed=5, batch_size=batch_size, repeats=2)
        assert (shared, ended) == generation.sample(model, tokenizer, twice, 8, 1.0, seed=5, batch_size=batch_size)
    assert shared[0] != shared[1]  # a prompt's two responses are two samples


def test_pair_labelling_orders_by_gold_and_drops_near_ties():
    prompt = [{"role": "user", "content": "Review the lamp."}]
    good, bad = "The lamp is great. Overall it feels superb.", "Overall it feels terrible. The design looks bad."
    for first, second in ((good, bad), (bad, good)):
        pair = label(prompt, first, second, tuple(gold_scorer(gold_reward)([prompt] * 2, [first, second])), min_gap=0.25)
        assert pair["chosen"][0]["content"] == good and pair["rejected"][0]["content"] == bad
        assert pair["chosen_score"] == pytest.approx(1.25) and pair["rejected_score"] == pytest.approx(-1.25)
    near = "The lamp is great. The design looks superb."  # gold 1.25 as well
    assert label(prompt, good, near, (1.25, 1.25), min_gap=0.25) is None
    assert label(prompt, good, near, (1.25, 1.25), min_gap=0.0) is not None
    assert label(prompt, good, good, (1.25, 1.25), min_gap=0.0) is None  # identical responses say nothing


def test_schema_rules_for_the_training_stages(project: Path):
    with pytest.raises(InputError, match="train it fully"):
        load_pipeline(
            project / "pipelines.yaml", "tiny",
            ["stages.sft.model.init=scratch", "stages.sft.learning_rate=0.01", "stages.sft.adapter={type: lora, r: 8}"],
        )
    with pytest.raises(InputError, match="stages.reward.model is required when no stage of the pipeline provides a policy"):
        load_pipeline(project / "pipelines.yaml", "tiny", ["stages.reward.pairs.source=data", "stages.reward.learning_rate=0.01"])
