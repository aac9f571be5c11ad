"""`rlhf label`: the page where people judge pairs, its annotators, import and export, simulated annotators.

A pipeline's queue is named after the pipeline. The label store, the web stack and the database driver
load inside the commands (about 1.5 s), so `rlhf --help` stays quick.
"""

from __future__ import annotations

import contextlib
import ipaddress
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from rlhf import home as rlhf_home
from rlhf.config import load_pipeline
from rlhf.errors import InputError
from rlhf.gold import named

console = Console(width=None if sys.stdout.isatty() else 120)  # as flows.cli: rich folds at 80 columns off a terminal


class _ServeByDefault(TyperGroup):
    """`rlhf label [PIPELINE] [OPTIONS]` with no subcommand is `rlhf label serve [PIPELINE] [OPTIONS]`: a
    positional PIPELINE on the group itself would swallow the name of every subcommand."""

    def parse_args(self, ctx, args):
        if not args or (args[0] not in self.commands and args[0] not in ctx.help_option_names):
            args = ["serve", *args]
        return super().parse_args(ctx, args)


label_app = typer.Typer(
    cls=_ServeByDefault,
    help="Serve the page where people judge pairs of responses (with no subcommand: `serve`), manage its "
    "annotators, import and export judgements, simulate annotators.",
)

PipelineArg = Annotated[Optional[str], typer.Argument(help="pipeline whose queue (named after it) to use", show_default="the file's `default:`")]
PipelineOption = Annotated[
    Optional[str], typer.Option("--pipeline", "-p", help="pipeline whose queue (named after it) to use", show_default="the file's `default:`")
]
ConfigOption = Annotated[
    Optional[Path], typer.Option("--config", help="pipelines file", show_default="./pipelines.yaml, else the project's")
]
FormatOption = Annotated[
    Optional[str],
    typer.Option("--format", "-f", help="label-studio (Label Studio's pairwise JSON) or jsonl (one judgement a line)", show_default="by the file's suffix"),
]
GoldRateOption = Annotated[
    float, typer.Option("--gold-rate", min=0.0, max=1.0, help="share of pairs shown that are gold checks with a known answer")
]
SeedOption = Annotated[Optional[int], typer.Option("--seed", help="seed of the order pairs are served in", show_default="random")]


def _pipeline(ctx: typer.Context, pipeline: str | None, config: Path | None):
    """(queue, parsed pipeline, home) for a command; the home as `rlhf --home` resolved it."""
    home = rlhf_home.resolve(ctx.find_root().params.get("home"))
    name, parsed = load_pipeline(config or rlhf_home.default_config(), pipeline, [])
    return name, parsed, home


def _store_url(home: Path, pipeline) -> str:
    """The one place that decides which label store a pipeline uses: RLHF_LABELS_URL, else its `labels.url`,
    else SQLite under the home (as the stages that read the judgements decide)."""
    from rlhf.labels.store import store_url

    return store_url(home, pipeline.labels.url)


def _shown(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


@contextlib.contextmanager
def _store(home: Path, pipeline) -> Iterator:
    from sqlalchemy.exc import SQLAlchemyError

    from rlhf.labels.store import LabelStore

    url = _store_url(home, pipeline)
    try:
        store = LabelStore(url)
    except (SQLAlchemyError, OSError) as exc:  # a wrong URL, a server that is down, a file we may not write
        raise InputError(f"label store {_shown(url)}: {' '.join(str(exc).split())[:300]}") from None
    try:
        yield store
    finally:
        store.close()


@label_app.command()
def serve(
    ctx: typer.Context,
    pipeline: PipelineArg = None,
    host: Annotated[str, typer.Option(help="address to bind; anything but loopback exposes the page (and its tokens, sent without TLS) to the network")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="port to listen on")] = 8765,
    gold_rate: GoldRateOption = 0.1,
    seed: SeedOption = None,
    config: ConfigOption = None,
) -> None:
    """Serve the labelling page of the pipeline's queue until Ctrl-C."""
    from rlhf.labels.server import serve as serve_page

    queue, parsed, home = _pipeline(ctx, pipeline, config)
    with _store(home, parsed) as store:
        if not _loopback(host):
            console.print(f"WARNING: binding {host}: anyone who can reach it sees the page; use TLS in front of it", style="bold red")
        console.print(f"label page of queue '{queue}' on http://{host}:{port}/?token=... over {_shown(_store_url(home, parsed))}")
        console.print("personal links: rlhf label add-annotator NAME [--owner]; statistics: /stats?token=... (owners)")
        serve_page(store, queue, host=host, port=port, gold_rate=gold_rate, seed=seed)


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@label_app.command("add-annotator")
def add_annotator(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="the annotator's name, unique in the store")],
    owner: Annotated[bool, typer.Option("--owner", help="may also see /stats (judgements, gold accuracy, agreement)")] = False,
    url: Annotated[Optional[str], typer.Option("--url", help="where the page is served, for the printed link", show_default="the pipeline's labels.page")] = None,
    pipeline: PipelineOption = None,
    config: ConfigOption = None,
) -> None:
    """Add an annotator and print their personal link (the token is shown once; the store keeps only its hash)."""
    _, parsed, home = _pipeline(ctx, pipeline, config)
    with _store(home, parsed) as store:
        token = _new_annotator(store, name, owner)
    console.print(f"{(url or parsed.labels.page).rstrip('/')}/?token={token}", soft_wrap=True)


def _new_annotator(store, name: str, owner: bool) -> str:
    from rlhf.labels.store import LabelError

    try:
        return store.add_annotator(name, owner=owner)
    except LabelError as exc:
        raise InputError(f"add-annotator {name}: {exc}") from None


@label_app.command("import")
def import_file(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="judgements to read: .jsonl (one a line) or .json (Label Studio's export)")],
    fmt: FormatOption = None,
    pipeline: PipelineOption = None,
    config: ConfigOption = None,
) -> None:
    """Import judgements into the pipeline's queue, all or none; an annotator's second judgement of a pair is skipped."""
    from rlhf.labels.exchange import import_judgements

    queue, parsed, home = _pipeline(ctx, pipeline, config)
    with _store(home, parsed) as store:
        counts = import_judgements(store, file, fmt, queue=queue)
    console.print(f"{file} -> queue '{queue}': " + ", ".join(f"{key.replace('_', ' ')} {value}" for key, value in counts.items()))


@label_app.command("export")
def export_file(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="where to write: .jsonl (one judgement a line) or .json (Label Studio tasks)")],
    fmt: FormatOption = None,
    purpose: Annotated[Optional[str], typer.Option("--purpose", help="only judgements of items for this purpose: train or gate", show_default="all")] = None,
    pipeline: PipelineOption = None,
    config: ConfigOption = None,
) -> None:
    """Export the judgements of the pipeline's queue, with their pairs, annotators, comments and times."""
    from rlhf.labels.exchange import export_judgements
    from rlhf.labels.store import PURPOSES

    if purpose is not None and purpose not in PURPOSES:
        raise InputError(f"--purpose {purpose}: not one of {', '.join(PURPOSES)}")
    queue, parsed, home = _pipeline(ctx, pipeline, config)
    with _store(home, parsed) as store:
        try:
            count = export_judgements(store, queue, file, fmt, purpose=purpose)
        except OSError as exc:
            raise InputError(f"{file}: cannot write it: {exc.strerror or exc}") from None
    console.print(f"{count} judgements of queue '{queue}' -> {file}")


@label_app.command()
def stats(ctx: typer.Context, pipeline: PipelineArg = None, config: ConfigOption = None) -> None:
    """The queue's numbers, as /stats shows them: judgements and gold accuracy per annotator, agreement, size."""
    queue, parsed, home = _pipeline(ctx, pipeline, config)
    with _store(home, parsed) as store:
        numbers = store.stats(queue)
    q, agreement = numbers["queue"], numbers["agreement"]
    console.print(f"queue '{queue}': {q['items']} items ({q['gold_items']} gold checks), {q['pending']} pending, "
                  f"{q['judged_items']} judged, {q['judgements']} judgements")
    table = Table(title="annotators")
    for column in ("annotator", "judgements", "gold checks judged", "correct", "gold accuracy"):
        table.add_column(column)
    for a in numbers["annotators"]:
        table.add_row(a["name"], str(a["judgements"]), str(a["gold_judged"]), str(a["gold_correct"]), _number(a["gold_accuracy"]))
    console.print(table)
    console.print(f"agreement: Cohen's kappa (mean over pairs) {_number(agreement['cohen_kappa'])}, Fleiss' kappa "
                  f"{_number(agreement['fleiss_kappa'])}, items judged by two or more: {agreement['overlapping_items']}")
    for pair in agreement["pairs"]:
        console.print(f"  {pair['a']} / {pair['b']}: {pair['items']} items, kappa {_number(pair['kappa'])}")


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


@label_app.command()
def simulate(
    ctx: typer.Context,
    pipeline: PipelineArg = None,
    annotators: Annotated[int, typer.Option("--annotators", min=1, max=1000, help="simulated annotators sim-1..N, judging at once")] = 3,
    judgements: Annotated[int, typer.Option("--judgements", min=1, help="stop after this many judgements in all (or when the queue runs out)")] = 100,
    temperature: Annotated[float, typer.Option("--temperature", min=0.0, help="Bradley-Terry noise: P(A) = sigmoid((gold_a - gold_b) / T); 0 always follows gold")] = 0.1,
    seed: Annotated[int, typer.Option("--seed", help="seed of the simulated choices and of the serving order")] = 0,
    think_ms: Annotated[float, typer.Option("--think-ms", min=0.0, help="each annotator's pause before a decision")] = 0.0,
    tie_margin: Annotated[float, typer.Option("--tie-margin", min=0.0, help="gold rewards closer than this are judged a tie")] = 0.0,
    url: Annotated[Optional[str], typer.Option("--url", help="judge through a page already served there (over the same store)", show_default="serve one in this process")] = None,
    gold_rate: GoldRateOption = 0.1,
    config: ConfigOption = None,
) -> None:
    """Judge the pipeline's queue through the HTTP API with simulated annotators, from its task's gold reward."""
    from rlhf.labels.server import serving
    from rlhf.labels.simulate import simulate as run_simulation

    queue, parsed, home = _pipeline(ctx, pipeline, config)
    gold = named(parsed.stages.block("data").gold()) if "data" in parsed.stages.present() else None
    if gold is None:
        raise InputError(f"pipeline {queue}: its data stage names no gold reward (stages.data.gold_reward), which simulated annotators judge by")
    with _store(home, parsed) as store:
        tokens = [_new_annotator(store, name, False) for name in _simulated_names(annotators)]
        with contextlib.nullcontext(url) if url else serving(store, queue, gold_rate=gold_rate, seed=seed) as base:
            result = run_simulation(base, tokens, gold, temperature=temperature, seed=seed, limit=judgements, think_ms=think_ms,
                                    tie_margin=tie_margin)
    latency = result["latency_ms"]
    noise = "-" if result["noise"] is None else f"{result['noise']:.3f}"
    console.print(f"{result['judgements']} judgements by {annotators} simulated annotators in {result['seconds']:.1f} s "
                  f"({result['per_second']:.1f}/s; p50 {_ms(latency['p50'])}, p95 {_ms(latency['p95'])}); "
                  f"label noise {noise} (share against the gold order), {result['ties']} ties"
                  + ("; the queue ran out" if result["exhausted"] else ""))


def _simulated_names(count: int) -> list[str]:
    """sim-1..N; an existing one is given a new token, so a second simulation continues their work."""
    return [f"sim-{n}" for n in range(1, count + 1)]


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms"
