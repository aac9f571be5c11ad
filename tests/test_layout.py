"""The layers: the engine (`rlhf/`) never imports orchestration, and a training worker never loads Prefect."""

import subprocess
import sys

from conftest import ROOT

# what a Ray Train worker of SFT imports: the loop it runs and the recipe whose `make_trainer` it unpickles
WORKER = """
import sys
import rlhf.trl_fit, rlhf.session, rlhf.stages.sft.recipe
print(sorted({name.split(".")[0] for name in sys.modules} & {"prefect", "flows", "tasks"}))
"""


def test_a_training_worker_imports_no_prefect_and_no_orchestration():
    done = subprocess.run([sys.executable, "-c", WORKER], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_the_engine_imports_neither_flows_nor_tasks():
    imports = subprocess.run([sys.executable, str(ROOT.parent / "shared" / "tools" / "imports.py")], cwd=ROOT,
                             capture_output=True, text=True) if (ROOT.parent / "shared").exists() else None
    offenders = [path for path in (ROOT / "rlhf").rglob("*.py")
                 for line in path.read_text().splitlines() if line.strip().startswith(("from flows", "import flows",
                                                                                        "from tasks", "import tasks"))]
    assert offenders == []
    if imports is not None:  # the project's own checkout: the shared tool also finds no circle
        assert imports.returncode == 0 and " 0 circle(s)" in imports.stdout, imports.stdout[:2000]
