"""``attnsurgeon sweep``: many configurations (and models) profiled locally or on Ray, resumable."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ..blocks import get_block
from ..core.errors import AttnSurgeonError
from ..core.lists import split_list
from ..core.positions import POSITIONS
from .app import app, command
from .insertion import ATTN_HELP, InsertionArgs, _takes, check_insertion_args, insertion_options
from .options import (
    ChannelsLastOpt,
    InputSizeOpt,
    JsonOpt,
    MemoryEfficientOpt,
    ModelArgsOpt,
    RecipeBatchSizesOpt,
    RecipeDeviceOpt,
    RecipeDtypeOpt,
    RecipeMaxTimeOpt,
    RecipeMinTimeOpt,
    RecipeModeOpt,
    RuntimeOpt,
    TargetCiOpt,
    TargetOpt,
    ThreadsOpt,
    _profile_overrides,
    parse_globs,
    parse_ints,
    parse_model_args,
    parse_runtimes,
)
from .render import _escape, _stderr, emit_json
from .render_sweep import _SweepProgress, print_sweep

if TYPE_CHECKING:
    from ..planning.recipes import Configuration, Recipe
    from ..sweeps.runner import SweepResult

SweepOutOpt = Annotated[
    Path,
    typer.Option(
        "--out", "-o", help="Folder for sweep.json, rows.jsonl, results.csv/.json and plot.png.", show_default=False
    ),
]
SweepModelArg = Annotated[
    str | None,
    typer.Argument(
        help="A model name, or a sweep recipe (.yaml) with its configurations (or --models instead).",
        show_default=False,
        metavar="MODEL|RECIPE",
    ),
]
SweepAttnOpt = Annotated[
    str | None,
    typer.Option(
        "--attn",
        "-a",
        help=f"Attention blocks to sweep, a comma-separated list of {ATTN_HELP} "
        "(none with --replace); required without a sweep recipe.",
        show_default="none",
    ),
]
SweepPositionOpt = Annotated[
    str | None,
    typer.Option(
        "--position",
        "-p",
        help=f"Positions to sweep, a list of {','.join(POSITIONS)}. Default: each block's natural position.",
        show_default=False,
    ),
]
ResumeOpt = Annotated[
    bool, typer.Option("--resume", help="Finish an interrupted sweep in --out: finished rows are kept.")
]
StartOverOpt = Annotated[bool, typer.Option("--force", help="Start over in an --out folder that holds a sweep.")]
SweepModelsOpt = Annotated[
    str | None,
    typer.Option(
        "--models",
        help="Several models, crossed with the configurations: a list or globs (timm:resnet*,convnext_tiny; "
        "`list models` shows the names). Instead of MODEL, or to run a sweep recipe over them.",
        show_default="MODEL alone",
    ),
]
SweepRayOpt = Annotated[
    str | None,
    typer.Option(
        "--ray",
        metavar="[ADDRESS]",
        help="Run the rows as Ray tasks (pip install 'attnsurgeon\\[ray]'): --ray alone starts "
        "Ray on this machine; auto or ray://HEAD:10001 joins a cluster. Each row asks for --threads CPUs (1 if unset), "
        "or one GPU with --device cuda.",
        show_default="rows measured here, one after another",
    ),
]
SweepRayCpusOpt = Annotated[
    int | None,
    typer.Option(
        "--ray-cpus",
        min=1,
        help="CPUs the local Ray instance may use (rows at once: this over --threads).",
        show_default="all of this machine's",
    ),
]
RAY_LOCAL = "local"  # what `--ray` alone means (see _optional_ray_address)


@app.command()
@command
@insertion_options
def sweep(
    *,
    out: SweepOutOpt,
    model: SweepModelArg = None,
    attn: SweepAttnOpt = None,
    position: SweepPositionOpt = None,
    ins: InsertionArgs,  # --stages, --blocks, --init, the block options and --replace (declared once)
    device: RecipeDeviceOpt = None,
    dtype: RecipeDtypeOpt = None,
    batch_size: RecipeBatchSizesOpt = None,
    mode: RecipeModeOpt = None,
    threads: ThreadsOpt = None,
    channels_last: ChannelsLastOpt = False,
    min_time: RecipeMinTimeOpt = None,
    max_time: RecipeMaxTimeOpt = None,
    target_ci: TargetCiOpt = None,
    input_size: InputSizeOpt = None,
    target: TargetOpt = None,
    resume: ResumeOpt = False,
    force: StartOverOpt = False,
    models: SweepModelsOpt = None,
    model_arg: ModelArgsOpt = None,
    ray: SweepRayOpt = None,
    ray_cpus: SweepRayCpusOpt = None,
    json_out: JsonOpt = False,
    memory_efficient: MemoryEfficientOpt = False,
    runtime: RuntimeOpt = None,
) -> None:
    """Profile MODEL under every combination of --attn and --position (or a sweep recipe's configurations).

    Each row is written as soon as it is measured; an interrupted sweep keeps them, and --resume
    measures only the rest. A configuration that fails becomes a failed row with its reason.

    Example: attnsurgeon sweep resnet50 --attn se,eca,cbam --position standard,pre,post,identity --out sweeps/r50

    Zoo sweep on Ray: attnsurgeon sweep --models 'timm:resnet*,convnext_tiny' --attn se,eca --threads 1 --ray --out sweeps/zoo
    """  # noqa: E501 (the example is a command line to copy whole)
    if resume and force:
        raise AttnSurgeonError("--resume and --force conflict: --resume keeps the finished rows, --force discards them")
    options = ins.options
    model_args = parse_model_args(model_arg)
    if model is None and models is None:
        raise AttnSurgeonError("give a MODEL, a sweep RECIPE, or --models (a list or glob of models)")
    if model is not None and model.lower().endswith((".yaml", ".yml")):
        plan = _recipe_plan(model, attn, ins, options, input_size, memory_efficient, target)
    else:
        plan = _grid_plan(model, models, attn, position, ins, options, input_size, memory_efficient, target)
    plan.settings.update(
        _profile_overrides(device, dtype, batch_size, mode, threads, min_time, max_time, channels_last, target_ci)
    )
    if runtime is not None:  # a grid axis: every configuration measured in each runtime
        plan.settings["runtimes"] = parse_runtimes(runtime)
    swept = plan.spec.models or plan.spec.model
    if models is not None:  # --models overrides a recipe's
        swept = split_list(models) or []
    result = _run(swept, plan, out, model_args, resume=resume, force=force, ray=ray, ray_cpus=ray_cpus)
    if json_out:
        emit_json(
            {
                "folder": str(result.folder),
                "measured": result.measured,
                "plot": str(result.plot) if result.plot else None,
                "rows": result.rows,
            }
        )
        return
    print_sweep(result)


@dataclass
class _Plan:
    """What a sweep measures, from a sweep recipe or from the command line's grid."""

    spec: Recipe
    configurations: list[Configuration]
    settings: dict[str, Any]
    input_size: Any
    memory_efficient: bool
    target: str | list[str] | None


def _recipe_plan(
    model: str,
    attn: str | None,
    ins: InsertionArgs,
    options: dict[str, Any],
    input_size: Any,
    memory_efficient: bool,
    target: str | None,
) -> _Plan:
    """A sweep recipe's configurations and settings (a single recipe is a one-row sweep); the command
    line's --input-size, --memory-efficient and --target go first."""
    from ..planning.recipes import Configuration, read_recipe

    if attn or ins.stages or ins.blocks or options or ins.replace or ins.anchors:
        raise AttnSurgeonError(
            "give either a sweep recipe or --attn/--position/--after/--before/--stages/--blocks/"
            "--replace and block options, not both"
        )
    spec = read_recipe(model)
    if spec.weights is not None:
        raise AttnSurgeonError(f"{model}: a sweep measures cost, which weights do not change: drop 'weights'")
    configurations = spec.configurations
    if configurations is None:  # a single recipe is a one-row sweep
        configurations = [Configuration(spec.name or Path(model).stem, spec.insertions)]
    return _Plan(
        spec,
        configurations,
        dict(spec.profile or {}),
        input_size or spec.input_size,
        memory_efficient or spec.memory_efficient,
        target or spec.target,
    )


def _grid_plan(
    model: str | None,
    models: str | None,
    attn: str | None,
    position: str | None,
    ins: InsertionArgs,
    options: dict[str, Any],
    input_size: Any,
    memory_efficient: bool,
    target: str | None,
) -> _Plan:
    """The configurations of the command line: every --attn at every --position, with the insertion options."""
    from ..planning.recipes import parse_recipe

    if model is not None and models is not None:
        raise AttnSurgeonError("give MODEL or --models, not both (--models takes a list: resnet18,resnet50)")
    if not attn:
        raise AttnSurgeonError("--attn is required (a list such as se,eca,cbam), or give a sweep recipe")
    attns = parse_globs(attn, "--attn")
    positions = parse_globs(position, "--position") if position is not None else [None]
    unused = [k for k in options if not any(k in _takes(a) for a in attns)]
    if unused:
        raise AttnSurgeonError(f"none of {', '.join(attns)} takes {', '.join(unused)}")
    configurations = _grid(attns, positions, ins, options)
    spec = parse_recipe({"model": model or "", "configurations": configurations}, "the command line")
    assert spec.configurations is not None  # given above, so parsed
    return _Plan(spec, spec.configurations, {}, input_size, memory_efficient, target)


def _grid(
    attns: list[str], positions: Sequence[str | None], ins: InsertionArgs, options: dict[str, Any]
) -> list[dict[str, Any]]:
    """The grid of blocks x positions, as a sweep recipe's configurations; it leaves out what a block's
    kind does not allow (sk at pre), and says so."""
    init, replace, stages, blocks = ins.init, ins.replace, ins.stages, ins.blocks
    configurations: list[dict[str, Any]] = []
    skipped = []  # a grid of blocks x positions leaves out what a block's kind does not allow (sk at pre)
    for a in attns:  # block options go to the blocks that take them (--reduction: se and cbam, not eca)
        own = {k: v for k, v in options.items() if k in _takes(a)}
        for p in positions:
            if p and len(attns) > 1 and a != "none" and p not in get_block(a).positions:
                skipped.append(f"{a} at {p}")
                continue
            check_insertion_args(a, p, own, init, replace, **ins.anchors)
            name = "/".join([a] * (len(attns) > 1) + ([p] if p and len(positions) > 1 else [])) or a
            item: dict[str, Any] = {
                "attn": a,
                **({"position": p} if p else {}),
                "init": init,
                "options": own,
                **({"replace": True} if replace else {}),
                **ins.anchors,
            }
            if stages is not None:
                item["stages"] = parse_ints(stages, "--stages")
            if blocks is not None:
                item["blocks"] = parse_globs(blocks)
            configurations.append({"name": name, "insertions": [item]})
    if skipped:
        if not configurations:
            raise AttnSurgeonError(
                f"no block of --attn goes at any --position given ({', '.join(skipped)}): conv blocks "
                "(sk, splat) go only at conv, gates anywhere but conv; leave --position out for "
                "each block's natural position"
            )
        _stderr().print(
            f"[dim]note: left out {', '.join(skipped)}: a block's kind does not allow that position "
            "(conv blocks go only at conv, gates anywhere but conv)[/]"
        )
    return configurations


def _run(
    swept: str | list[str],
    plan: _Plan,
    out: Path,
    model_args: dict[str, Any],
    *,
    resume: bool,
    force: bool,
    ray: str | None,
    ray_cpus: int | None,
) -> SweepResult:
    """The sweep, measured with a progress bar; interrupted (Ctrl-C, SIGTERM), it says what it kept and
    exits with the status a shell expects."""
    from ..sweeps.runner import run_sweep

    try:
        with _SweepProgress() as bar:
            return run_sweep(
                swept,
                plan.configurations,
                out,
                settings=plan.settings,
                input_size=plan.input_size,
                model_kwargs={**plan.spec.model_kwargs, **model_args},
                target=plan.target,
                resume=resume,
                force=force,
                progress=bar,
                ray=ray,
                ray_cpus=ray_cpus,
                memory_efficient=plan.memory_efficient,
            )
    except (KeyboardInterrupt, SystemExit) as exc:  # Ctrl-C, or SIGTERM (a timeout, a batch job's limit)
        if isinstance(exc, SystemExit) and not exc.code:
            raise
        _say_interrupted(out, force)
        import signal

        # a SystemExit here is a termination: ours says 128 + SIGTERM, but where Ray's own handler
        # caught the signal it says 1, so the status is set here, as a shell expects it after SIGTERM
        raise typer.Exit(130 if isinstance(exc, KeyboardInterrupt) else 128 + signal.SIGTERM) from None


def _say_interrupted(out: Path, force: bool) -> None:
    """What an interrupted sweep left, and how to finish it."""
    from ..sweeps.runner import ROWS_FILE, SWEEP_FILE

    folder = out.expanduser()
    if not (folder / SWEEP_FILE).exists():
        _stderr().print("[yellow]interrupted[/] before the sweep started")
        return
    rows = folder / ROWS_FILE
    kept = sum(1 for line in rows.read_text().splitlines() if line.strip()) if rows.exists() else 0
    _stderr().print(
        f"[yellow]interrupted:[/] {kept} finished row{'s' * (kept != 1)} kept in {_escape(str(out))}; "
        "finish the sweep with the same arguments and --resume" + (" (in place of --force)" if force else "")
    )


def _optional_ray_address(argv: list[str]) -> list[str]:
    """``--ray`` takes an optional address: alone (last, or before another option or the model) it means a
    local Ray instance. An address is ``local``, ``auto``, ``SCHEME://...`` or ``HOST:PORT``."""
    import re

    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--ray":
            nxt = out[i + 1] if i + 1 < len(out) else None
            if nxt is None or not re.fullmatch(r"local|auto|\w[\w+.-]*://\S*|[\w.-]+:\d+", nxt):
                out.insert(i + 1, RAY_LOCAL)
    return out
