"""The final policy as an MLflow model in the `transformers` flavour: a chat model, weights in safetensors.

Logged by the PPO stage, registered as `<pipeline>-policy` by the evaluation
when its gates pass (alias `candidate`), promoted to `champion` from the CLI.
Loading it needs transformers, not this project, and runs no pickled code:

    policy = mlflow.pyfunc.load_model("models:/demo-policy@champion")
    policy.predict({"messages": [{"role": "user", "content": "..."}], "max_tokens": 40, "temperature": 1.0})
"""

from __future__ import annotations

import shutil
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException


def log_policy(model, tokenizer, max_new_tokens: int) -> str:
    """Log the merged policy into the active run; returns the model URI."""
    info = mlflow.transformers.log_model(
        {"model": model, "tokenizer": tokenizer},
        name="policy",
        task="llm/v1/chat",  # OpenAI-style chat requests, rendered with the policy's own chat template
        model_config={"do_sample": True, "max_new_tokens": max_new_tokens},  # sampled, as the policy was trained
        pip_requirements=[f"{p}=={_version(p)}" for p in ("torch", "transformers", "tokenizers", "mlflow")],
    )
    return info.model_uri


def register(model_uri: str, name: str) -> str:
    """Register the model and point the `candidate` alias at the new version; returns the version."""
    version = mlflow.register_model(model_uri, name).version
    mlflow.MlflowClient().set_registered_model_alias(name, "candidate", version)
    return str(version)


def version_of(model_uri: str) -> str:
    """The version `models:/NAME@ALIAS` points at; LookupError when there is none."""
    name, _, alias = model_uri.removeprefix("models:/").partition("@")
    try:
        return str(mlflow.MlflowClient().get_model_version_by_alias(name, alias).version)
    except MlflowException as exc:
        raise LookupError(f"no version of {name!r} has the alias {alias!r} ({exc.message})") from None


def download(model_uri: str, directory: Path) -> Path:
    """A registered policy as a directory `models.load_causal_lm` reads: its weights and its tokenizer."""
    local = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(directory)))
    for part in (local / "components" / "tokenizer").iterdir():  # the flavour keeps the tokenizer beside the weights
        shutil.copy(part, local / "model")
    return local / "model"


def promote(name: str, version: str) -> None:
    mlflow.MlflowClient().set_registered_model_alias(name, "champion", version)


def _version(package: str) -> str:
    from importlib import metadata

    return metadata.version(package).split("+")[0]
