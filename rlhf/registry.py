"""The final policy as an MLflow model: a pyfunc that loads the merged policy and generates.

Logged by the PPO stage, registered as `<pipeline>-policy` by the evaluation
when its gates pass (alias `candidate`), promoted to `champion` from the CLI.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd
from mlflow.models import infer_signature
from mlflow.pyfunc import PythonModel

PACKAGE_DIR = Path(__file__).resolve().parent


class PolicyModel(PythonModel):
    """`predict` takes a frame with a `prompt` column and returns one generated response per row."""

    def load_context(self, context) -> None:
        from rlhf import models

        self.tokenizer = models.load_tokenizer(Path(context.artifacts["policy"]))
        self.model = models.load_causal_lm(Path(context.artifacts["policy"]))

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> list[str]:
        from rlhf import generation

        params = {"max_new_tokens": 40, "temperature": 1.0, "seed": 0, **(params or {})}
        prompts = [[{"role": "user", "content": text}] for text in model_input["prompt"]]
        responses, _ = generation.sample(
            self.model, self.tokenizer, prompts, int(params["max_new_tokens"]), float(params["temperature"]), int(params["seed"])
        )
        return responses


def log_policy(policy_dir: Path, example_prompt: str, example_response: str) -> str:
    """Log the merged policy into the active run; returns the model URI."""
    example = pd.DataFrame({"prompt": [example_prompt]})
    info = mlflow.pyfunc.log_model(
        name="policy",
        python_model=PolicyModel(),
        artifacts={"policy": str(policy_dir)},
        code_paths=[str(PACKAGE_DIR)],
        input_example=example,
        signature=infer_signature(example, [example_response], params={"max_new_tokens": 40, "temperature": 1.0, "seed": 0}),
        pip_requirements=[f"{p}=={_version(p)}" for p in ("torch", "transformers", "tokenizers", "pandas", "mlflow")],
    )
    return info.model_uri


def register(model_uri: str, name: str) -> str:
    """Register the model and point the `candidate` alias at the new version; returns the version."""
    version = mlflow.register_model(model_uri, name).version
    mlflow.MlflowClient().set_registered_model_alias(name, "candidate", version)
    return str(version)


def promote(name: str, version: str) -> None:
    mlflow.MlflowClient().set_registered_model_alias(name, "champion", version)


def _version(package: str) -> str:
    from importlib import metadata

    return metadata.version(package).split("+")[0]
