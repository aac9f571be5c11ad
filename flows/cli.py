"""The `rlhf` command line. Exit codes: 0 done, 1 a stage failed, 2 bad config or input."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table
from typer._click.exceptions import NoArgsIsHelpError
from typer.exceptions import TyperException

from flows.label_cli import label_app
from rlhf import home as rlhf_home
from rlhf import stage_log
from rlhf.blocks import FileSource
from rlhf.config import load_file, load_pipeline
from rlhf.data import prepare
from rlhf.data.formats import CONVERTERS
from rlhf.data.sources import describe
from rlhf.errors import InputError, StageFailed
from rlhf.graph import GRAPH

# Commands import what needs MLflow, Prefect or Ray when they run: `rlhf --help` and shell completion
# must not wait for them (MLflow alone takes about 5 s to import on 2 cores).

app = typer.Typer(
    help="Run and inspect RLHF pipelines (data -> SFT -> reward model -> PPO, GRPO, Dr. GRPO, RLOO, REINFORCE++ or DPO -> evaluation).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console(width=None if sys.stdout.isatty() else 120)  # rich's 80 columns off a terminal fold the summary
state: dict = {}
app.add_typer(label_app, name="label")


def _complete_pipelines(incomplete: str) -> list[str]:
    try:
        names = load_file(rlhf_home.default_config()).pipelines
    except Exception:  # a broken file must not spill a traceback into the shell
        return []
    return [name for name in names if name.startswith(incomplete)]


def _complete_stages(incomplete: str) -> list[str]:
    return [stage for stage in GRAPH if stage.startswith(incomplete)]


ConfigOption = Annotated[
    Optional[Path], typer.Option("--config", help="pipelines file", show_default="./pipelines.yaml, else the project's")
]
SetOption = Annotated[
    Optional[list[str]],
    typer.Option("--set", metavar="KEY=VALUE", help="override a pipeline key, e.g. stages.data.eval_fraction=0.1"),
]
PipelineArg = Annotated[
    Optional[str], typer.Argument(help="pipeline name", show_default="the file's `default:`", autocompletion=_complete_pipelines)
]


@app.callback()
def _options(
    ctx: typer.Context,
    home: Annotated[
        Optional[Path], typer.Option("--home", envvar="RLHF_HOME", help="artifacts, MLflow store, Prefect home", show_default="./.rlhf")
    ] = None,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="also show on the console what libraries and Ray workers print (always in each stage's stage.log)")
    ] = False,
) -> None:
    # checked here, before any command: a home that is a file would end each one in a traceback of its own
    source = ctx.get_parameter_source("home")
    state["home"] = rlhf_home.resolve(home, "RLHF_HOME" if source and source.name == "ENVIRONMENT" else "--home")
    if verbose:
        os.environ[stage_log.VERBOSE] = "1"
    else:  # e.g. MLflow's lines as it creates its database
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")


def _config(config: Path | None) -> Path:
    return config or rlhf_home.default_config()


def _check_given_models(config: Path, name: str, pipeline) -> None:
    """Digest what the stages read from outside the store (a given reward model): a bad path is named by file
    and dotted key now, not as a bare `reward_model:` after the stages before it have run. The data files are
    read row by row by `validate` and by the stage that provides the data."""
    data = pipeline.stages.providing("data")
    for stage in [stage for stage in pipeline.stages.present() if stage not in data]:
        block = pipeline.stages.block(stage)
        try:
            block.external_inputs()
        except InputError as exc:
            key, _, why = str(exc).partition(": ")
            if key not in type(block).model_fields:  # the message does not start with one of the block's keys
                key, why = "", str(exc)
            dotted = ".".join(filter(None, ("pipelines", name, "stages", stage, key)))
            raise InputError(f"{config}: '{dotted}': {why}") from None


@app.command()
def run(
    pipeline: PipelineArg = None,
    from_stage: Annotated[Optional[str], typer.Option("--from", help="run this stage and all after it again", autocompletion=_complete_stages)] = None,
    only: Annotated[
        Optional[str],
        typer.Option("--only", autocompletion=_complete_stages, help="run just this stage, reused if complete (its upstream must be complete); with --from the same stage, forced"),
    ] = None,
    overrides: SetOption = None,
    config: ConfigOption = None,
) -> None:
    """Run a pipeline; completed stages whose inputs did not change are reused."""
    from flows.plan import plan

    config = _config(config)
    name, parsed = load_pipeline(config, pipeline, overrides or [])  # fail fast, before Prefect starts
    plan(parsed.stages.present(), from_stage, only)
    _check_given_models(config, name, parsed)
    rlhf_home.prepare(state["home"])
    logging.getLogger("rlhf").setLevel(logging.INFO)
    from flows.run import run_pipeline

    result = run_pipeline(
        name, parsed, overrides=overrides or [], from_stage=from_stage, only=only, config_file=config, home=state["home"]
    )
    _summary(result)


@app.command()
def serve(
    pipelines: Annotated[Optional[list[str]], typer.Argument(help="pipelines to serve", show_default="all with a schedule")] = None,
    config: ConfigOption = None,
) -> None:
    """Serve each pipeline's `schedule:` as a Prefect deployment until stopped (needs PREFECT_API_URL).

    Scheduled runs share this home with `rlhf run`: each reuses the other's completed stages.
    """
    config = _config(config)
    rlhf_home.prepare(state["home"])
    logging.getLogger("rlhf").setLevel(logging.INFO)
    from flows.serve import serve as serve_deployments

    serve_deployments(config, state["home"], pipelines or [])


def _summary(result: dict) -> None:
    from rlhf.tracking import is_local, run_link, tracking_uri

    if not result["stages"]:  # a scheduled run with nothing new to train on
        console.print(result["waiting"])
        return
    table = Table(title=f"pipeline {result['pipeline']}")
    for column in ("stage", "action", "seconds", "headline", "MLflow run"):
        table.add_column(column, overflow="fold")
    for record in result["stages"]:
        headline = f"{record.headline[0]} = {_number(record.headline[1])}" if record.headline else ""
        table.add_row(record.stage, record.action, f"{record.seconds:.1f}", headline, record.run_id)
    console.print(table)
    ran = [r for r in result["stages"] if r.action != "reused"]
    if ran:
        console.print(f"stage logs: {' '.join(str(r.outputs.parent / stage_log.FILE_NAME) for r in ran)}", soft_wrap=True)
    from flows.report import evaluation_lines

    for line in evaluation_lines(result["stages"], result["pipeline"]):
        console.print(line, style="bold red" if line.startswith("WARNING") else None)
    if result["waiting"]:
        console.print(result["waiting"], style="bold")
    console.print(f"MLflow parent run: {result['parent_run']} (report.md attached)")
    link = run_link(result["experiment"], result["parent_run"])
    local = is_local(tracking_uri(state["home"]))
    console.print(f"dashboard: rlhf --home {state['home']} ui  ->  {link}" if local else f"dashboard: {link}")
    if api := os.environ.get("PREFECT_API_URL"):
        console.print(f"Prefect flow run: {api.removesuffix('/').removesuffix('/api')}/runs/flow-run/{result['flow_run']}")


def _number(value: float) -> str:
    return f"{int(value):,}" if float(value).is_integer() else f"{value:.4g}"


@app.command()
def status(pipeline: PipelineArg = None, overrides: SetOption = None, config: ConfigOption = None) -> None:
    """One row per stage: state, fingerprint, finished at, headline metric, MLflow run id."""
    from flows.plan import stage_states

    config = _config(config)
    name, parsed = load_pipeline(config, pipeline, overrides or [])
    _check_given_models(config, name, parsed)  # the stage fingerprints digest them
    table = Table(title=f"pipeline {name}  (home {state['home']})")
    for column in ("stage", "state", "fingerprint", "finished at", "headline", "MLflow run"):
        table.add_column(column, no_wrap=column in ("state", "fingerprint"))
    for row in stage_states(state["home"], name, parsed):
        table.add_row(*row)
    console.print(table)


@app.command("list")
def list_pipelines(config: ConfigOption = None) -> None:
    """Pipelines and their stages."""
    parsed = load_file(_config(config))
    for name, pipeline in parsed.pipelines.items():
        marker = " (default)" if name == parsed.default else ""
        console.print(f"[bold]{name}[/bold]{marker}: {' -> '.join(pipeline.stages.present())}")
        if pipeline.description:
            console.print(f"  {pipeline.description.strip()}")
        if schedule := pipeline.schedule:
            when = f"cron '{schedule.cron}'" if schedule.cron else f"every {schedule.interval} s"
            extra = f", --set {' '.join(schedule.overrides)}" if schedule.overrides else ""
            console.print(f"  schedule: {when} ({schedule.timezone}){extra}{'' if schedule.active else ', paused'}")


@app.command()
def validate(config: ConfigOption = None) -> None:
    """Check the pipelines file and every row of the data files it names; starts no server, trains nothing."""
    path = _config(config)
    parsed = load_file(path)
    checked = set()
    for name, pipeline in parsed.pipelines.items():
        _check_given_models(path, name, pipeline)  # the data files are read in full below
        sources = [(role, getattr(pipeline.stages.block(stage), role)) for stage in pipeline.stages.providing("data") for role in CONVERTERS]
        for role, source in sources:
            if not isinstance(source, FileSource) or (role, describe(source)) in checked:
                continue
            checked.add((role, describe(source)))
            examples, dropped, rows, where = prepare.read_examples(source, role, pipeline.seed)
            skipped = f", {sum(dropped.values())} dropped ({', '.join(f'{k} {v}' for k, v in dropped.items())})" if dropped else ""
            console.print(f"{where}: {rows} rows, {len(examples)} usable as {role}{skipped}")
    console.print(f"{path}: ok ({len(parsed.pipelines)} pipelines: {', '.join(parsed.pipelines)})")


@app.command()
def promote(
    pipeline: Annotated[str, typer.Argument(help="pipeline whose registered policy to promote")],
    version: Annotated[str, typer.Argument(help="registered model version")],
    config: ConfigOption = None,
) -> None:
    """Point the `champion` alias of `<PIPELINE>-policy` at VERSION.

    With a human gate (`stages.evaluate.registry.min_human_win_rate`), only once enough people's judgements
    of its evaluation's candidate-against-baseline pairs prefer it; their win rate is logged to the evaluation's
    MLflow run and its pipeline run either way.
    """
    from mlflow.exceptions import MlflowException

    from rlhf import registry, tracking

    name, parsed = load_pipeline(_config(config), pipeline, [])
    tracking.configure(state["home"])
    _check_human_gate(name, parsed, version)
    try:
        registry.promote(f"{name}-policy", version)
    except MlflowException as exc:
        raise InputError(f"promote {name} {version}: {exc.message}") from None
    console.print(f"{name}-policy version {version} is now 'champion'")


def _check_human_gate(name: str, pipeline, version: str) -> None:
    from rlhf import tracking
    from rlhf.labels.gate import verdict
    from rlhf.site import Site

    gates = [pipeline.stages.block(stage).registry for stage in pipeline.stages.providing("evaluation")]
    gate = next((g for g in gates if g is not None and g.min_human_win_rate is not None), None)
    if gate is None:
        return
    found = verdict(Site(state["home"], name, pipeline.labels).store(), name, version)
    rate = found["win_rate"]
    if found["evaluation_run"]:
        tracking.log_with_parent(found["evaluation_run"], {"evaluate.human_judgements": float(found["judgements"])}
                                 | ({"evaluate.human_win_rate": rate} if rate is not None else {}))
    if found["judgements"] < gate.min_human_judgements or rate is None or rate < gate.min_human_win_rate:
        shown = "no win rate yet" if rate is None else f"win rate {rate:.2f}"
        raise InputError(
            f"promote {name} {version}: people judged it against its baseline {found['judgements']} times ({shown}: "
            f"{found['wins']} wins, {found['losses']} losses, {found['ties']} ties); the gate needs "
            f"{gate.min_human_judgements} judgements and a win rate of {gate.min_human_win_rate:.2f}"
        )
    console.print(f"people prefer it: win rate {rate:.2f} over {found['judgements']} judgements")


@app.command()
def ui(port: Annotated[int, typer.Option(help="port on 127.0.0.1")] = 5000) -> None:
    """Start the MLflow UI on 127.0.0.1 over this home's tracking store, until Ctrl-C or SIGTERM."""
    from rlhf.tracking import TRAINING_VIEW, is_local, tracking_uri

    uri = tracking_uri(state["home"])
    if not is_local(uri):
        console.print(f"tracking server in use: open {uri}")
        return
    mlflow_bin = shutil.which("mlflow") or str(Path(sys.executable).parent / "mlflow")
    # one web worker and none of MLflow's job runners (8 processes, about 1.4 GB), in a process group
    # of their own, so that stopping this command stops every one of them
    server = subprocess.Popen(
        [mlflow_bin, "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env=os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        start_new_session=True,
    )
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    console.print(f"MLflow UI on http://127.0.0.1:{port}/#/experiments?{TRAINING_VIEW} over {uri}")
    try:
        server.wait()
    except KeyboardInterrupt:
        pass
    finally:
        _stop_group(server)


def _stop_group(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):  # stragglers of the group, the server's workers included
        os.killpg(process.pid, signal.SIGKILL)


def main() -> None:
    # Registered first so it runs last: the message stays the final line, after
    # Prefect's temporary server has said that it stopped.
    pending: list[str] = []
    atexit.register(lambda: pending and print(pending[0], file=sys.stderr))
    try:
        code = app(standalone_mode=False)  # typer returns exit codes here, 130 after Ctrl-C
    except typer.Abort:  # end of input at a prompt
        sys.exit(1)
    except TyperException as usage:  # typer's own click: unknown option or command, missing value
        context = getattr(usage, "ctx", None)
        if isinstance(usage, NoArgsIsHelpError):
            print(context.get_help())
        else:
            where = f" (see `{context.command_path} --help`)" if context is not None else ""
            print(f"error: {usage.format_message()}{where}", file=sys.stderr)
        sys.exit(usage.exit_code)
    except (InputError, StageFailed) as error:
        pending.append("error: " + " ".join(str(error).splitlines()))  # one line, whatever the message holds
        sys.exit(error.exit_code)
    if code == 130:
        pending.append("interrupted: run the same command again to resume; completed stages are reused "
                       "and an interrupted stage resumes from its last checkpoint")
    sys.exit(code or 0)
