"""The typed blocks stage configs are built from: the base of every block, data sources, model sources,
adapters and precision.

Every model forbids unknown keys, so a typo is an error that names its dotted
path and the keys allowed there instead of a silently ignored setting. Nothing
here imports torch: loading `pipelines.yaml` stays quick.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from rlhf.errors import InputError
from rlhf.store import digest_tree


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StageConfig(Strict):
    """A block under `stages:`; the stage graph (`rlhf/graph.py`) says which stage it configures.

    `pipeline` in the methods is the whole validated pipeline (`rlhf/pipeline.py`): what other stages
    provide is asked of `pipeline.stages`, never by a stage's name."""

    def also_reads(self) -> tuple[str, ...]:
        """Upstream stages the block names itself, beyond those the graph declares."""
        return ()

    def check(self, name: str, pipeline) -> None:
        """Rules that involve other blocks; a ValueError names the dotted key."""

    def starts_from_policy(self) -> bool:
        """Whether the stage trains from the policy another stage provides, which must then be a plain model."""
        return False

    def own_model(self) -> ScratchModel | PretrainedModel | None:
        """The model the block names itself (one to build or load, a starting policy); None: another stage's policy."""
        return None

    def external_inputs(self) -> dict[str, str]:
        """Digests of the files the stage reads from outside the store: part of its fingerprint."""
        return {}

    def live_inputs(self, site) -> dict[str, str]:
        """Digests of what changes between runs with no change of config (the judgements in the label store,
        the newest reward model of the home): part of its fingerprint. `site` is `rlhf.site.Site`."""
        return {}

    def waiting(self, site) -> str | None:
        """Why the stage cannot start yet although its upstream is complete (too few judgements), or None.
        A run stops there without error, and the next run continues."""
        return None

    def reads_judgements(self) -> bool:
        return False


# ----------------------------------------------------------------- data sources


class SyntheticReviewsSource(Strict):
    """The demo task: seeded product reviews with a known gold reward."""

    source: Literal["synthetic_reviews"] = Field(description="synthetic_reviews")
    examples: int = Field(20000, ge=10, description="instruction examples to generate")
    positive_share: float = Field(0.25, ge=0, le=1, description="share of positive reviews")


class FileSource(Strict):
    """A local jsonl, json, parquet or csv file."""

    source: Literal["file"] = Field(description="file")
    path: Path = Field(description="the file, relative to the pipelines file")
    format: Literal["auto", "jsonl", "json", "parquet", "csv"] = Field("auto", description="auto: from the suffix (.jsonl, .json, .parquet, .csv)")
    on_invalid: Literal["error", "drop"] = Field(
        "error", description="an invalid row stops the stage (error) or is dropped and counted"
    )


class HubSource(Strict):
    """A data set on the Hugging Face hub, through `datasets.load_dataset`."""

    source: Literal["hub"] = Field(description="hub")
    name: str = Field(description="the data set's hub id, e.g. Anthropic/hh-rlhf")
    subset: str | None = Field(None, description="the data set's configuration, if it has several")
    split: str = Field("train", description="the split to read")
    revision: str | None = Field(None, description="a branch, tag or commit of the data set (null: the newest)")
    on_invalid: Literal["error", "drop"] = Field("error", description="an invalid row stops the stage (error) or is dropped and counted")


InstructionSource = Annotated[
    Union[SyntheticReviewsSource, FileSource, HubSource], Field(discriminator="source")
]
PreferenceSource = Annotated[Union[FileSource, HubSource], Field(discriminator="source")]


# ----------------------------------------------------------------------- models


class ScratchModel(Strict):
    """A byte-level BPE tokenizer trained on the stage's text and a Llama-style model from random weights."""

    init: Literal["scratch"] = Field(description="scratch")
    vocab_size: int = Field(1024, ge=300, description="the BPE tokenizer's vocabulary, trained on the stage's text")
    hidden_size: int = Field(128, ge=8, description="width of the Llama-style model")
    layers: int = Field(4, ge=1, description="transformer layers")
    heads: int = Field(4, ge=1, description="attention heads (key-value heads alike)")
    intermediate_size: int = Field(512, ge=8, description="width of each MLP")
    max_positions: int = Field(256, ge=16, description="longest sequence, in tokens")


class PretrainedModel(Strict):
    """A model from a local directory, a hub id (`HF_HUB_OFFLINE` respected) or a folder inside a Python package."""

    init: Literal["pretrained"] = Field(description="pretrained")
    path: str = Field(description="a directory, a hub id, or `package:NAME` for the folder of an installed package")
    gguf_file: str | None = Field(None, description="a GGUF file in `path`, dequantised once and cached under the home")
    revision: str | None = Field(None, description="a branch, tag or commit of a hub model (null: the newest)")
    trust_remote_code: bool = Field(False, description="run the model's own code from the hub; only for models you trust")
    pickled_weights: bool = Field(False, description="also load *.bin weights (torch pickles, which can run code); safetensors only by default")


ModelSource = Annotated[Union[ScratchModel, PretrainedModel], Field(discriminator="init")]


class Lora(Strict):
    r: int = Field(16, ge=1, description="the rank of the low-rank update")
    alpha: int = Field(32, ge=1, description="its scale: the update is multiplied by alpha / r")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter's input while training (RL stages turn it off)")
    target_modules: list[str] | Literal["all-linear"] = Field("all-linear", description="the layers adapted: all-linear, or a list of module names such as [q_proj, v_proj]")


class LoraAdapter(Lora):
    """LoRA (Hu et al. 2021): low-rank updates to the weights, merged into the model after training."""

    type: Literal["lora"] = Field(description="lora")


class PromptTuning(Strict):
    """Prompt tuning (Lester et al. 2021): trained embeddings of virtual tokens before the input."""

    type: Literal["prompt_tuning"] = Field(description="prompt_tuning")
    virtual_tokens: int = Field(20, ge=1, description="trained embeddings put before the input")
    init_text: str | None = Field(None, description="start the virtual tokens from this text's embeddings (else random)")


class PrefixTuning(Strict):
    """Prefix tuning (Li and Liang 2021): trained keys and values of virtual tokens at every layer."""

    type: Literal["prefix_tuning"] = Field(description="prefix_tuning")
    virtual_tokens: int = Field(20, ge=1, description="trained keys and values at every layer")
    projection: bool = Field(False, description="reparameterise the prefix through a two-layer MLP while training")
    projection_hidden_size: int | None = Field(None, ge=1, description="the MLP's width; null: the model's hidden size")


class PTuning(Strict):
    """P-tuning (Liu et al. 2021): virtual token embeddings produced by a small trained encoder."""

    type: Literal["p_tuning"] = Field(description="p_tuning")
    virtual_tokens: int = Field(20, ge=1, description="virtual tokens the encoder produces")
    encoder: Literal["MLP", "LSTM"] = Field("MLP", description="the encoder that produces them: MLP or LSTM")
    encoder_hidden_size: int | None = Field(None, ge=1, description="null: the model's hidden size")


Adapter = Annotated[Union[LoraAdapter, PromptTuning, PrefixTuning, PTuning], Field(discriminator="type")]


# auto: bf16 where the hardware computes it natively, for a pretrained model; fp32 otherwise (`rlhf/precision.py`)
Precision = Literal["auto", "fp32", "bf16"]


def given_reward_model(path: Path | None) -> dict[str, str]:
    """The digest of a reward model a stage is given instead of a reward stage's."""
    if path is None:
        return {}
    if not (path / "config.json").is_file():
        raise InputError(f"reward_model: {path} is not a saved model directory (no config.json)")
    return {"reward_model": digest_tree(path)}
