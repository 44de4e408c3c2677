"""``attnsurgeon sweep``: many configurations (and models) profiled locally or on Ray, resumable."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..blocks import get_block
from ..core.errors import AttnSurgeonError
from ..core.lists import split_list
from ..core.positions import POSITIONS
from .app import app, command
from .options import (
    ATTN_HELP,
    ChannelsLastOpt,
    InputSizeOpt,
    InsertionArgs,
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
    _takes,
    check_insertion_args,
    insertion_options,
    parse_globs,
    parse_ints,
    parse_model_args,
    parse_runtimes,
)
from .render import _escape, _stderr, _SweepProgress, emit_json, print_sweep

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
    out: Annotated[
        Path,
        typer.Option(
            "--out", "-o", help="Folder for sweep.json, rows.jsonl, results.csv/.json and plot.png.", show_default=False
        ),
    ],
    model: Annotated[
        str | None,
        typer.Argument(
            help="A model name, or a sweep recipe (.yaml) with its configurations (or --models instead).",
            show_default=False,
            metavar="MODEL|RECIPE",
        ),
    ] = None,
    attn: Annotated[
        str | None,
        typer.Option(
            "--attn",
            "-a",
            help=f"Attention blocks to sweep, a comma-separated list of {ATTN_HELP} "
            "(none with --replace); required without a sweep recipe.",
            show_default="none",
        ),
    ] = None,
    position: Annotated[
        str | None,
        typer.Option(
            "--position",
            "-p",
            help=f"Positions to sweep, a list of {','.join(POSITIONS)}. Default: each block's natural position.",
            show_default=False,
        ),
    ] = None,
    ins: InsertionArgs = None,  # --stages, --blocks, --init, the block options and --replace (declared once)
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
    resume: Annotated[
        bool, typer.Option("--resume", help="Finish an interrupted sweep in --out: finished rows are kept.")
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Start over in an --out folder that holds a sweep.")] = False,
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
    """
    from ..planning.recipes import parse_recipe, read_recipe

    if resume and force:
        raise AttnSurgeonError("--resume and --force conflict: --resume keeps the finished rows, --force discards them")
    options, init, replace, stages, blocks = ins.options, ins.init, ins.replace, ins.stages, ins.blocks
    model_args = parse_model_args(model_arg)
    if model is None and models is None:
        raise AttnSurgeonError("give a MODEL, a sweep RECIPE, or --models (a list or glob of models)")
    is_recipe = model is not None and model.lower().endswith((".yaml", ".yml"))
    if is_recipe:
        if attn or stages or blocks or options or replace or ins.anchors:
            raise AttnSurgeonError(
                "give either a sweep recipe or --attn/--position/--after/--before/--stages/--blocks/"
                "--replace and block options, not both"
            )
        spec = read_recipe(model)
        if spec.weights is not None:
            raise AttnSurgeonError(f"{model}: a sweep measures cost, which weights do not change: drop 'weights'")
        configurations = spec.configurations
        if configurations is None:  # a single recipe is a one-row sweep
            from ..planning.recipes import Configuration

            configurations = [Configuration(spec.name or Path(model).stem, spec.insertions)]
        settings = dict(spec.profile or {})
        size = input_size or spec.input_size
        memory_efficient = memory_efficient or spec.memory_efficient
        target = target or spec.target
    else:
        if model is not None and models is not None:
            raise AttnSurgeonError("give MODEL or --models, not both (--models takes a list: resnet18,resnet50)")
        if not attn:
            raise AttnSurgeonError("--attn is required (a list such as se,eca,cbam), or give a sweep recipe")
        attns = parse_globs(attn, "--attn")
        positions = parse_globs(position, "--position") if position is not None else [None]
        unused = [k for k in options if not any(k in _takes(a) for a in attns)]
        if unused:
            raise AttnSurgeonError(f"none of {', '.join(attns)} takes {', '.join(unused)}")
        configurations = []
        skipped = []  # a grid of blocks x positions leaves out what a block's kind does not allow (sk at pre)
        for a in attns:  # block options go to the blocks that take them (--reduction: se and cbam, not eca)
            own = {k: v for k, v in options.items() if k in _takes(a)}
            for p in positions:
                if p and len(attns) > 1 and a != "none" and p not in get_block(a).positions:
                    skipped.append(f"{a} at {p}")
                    continue
                check_insertion_args(a, p, own, init, replace, **ins.anchors)
                name = "/".join([a] * (len(attns) > 1) + [p] * (len(positions) > 1)) or a
                item = {
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
        spec = parse_recipe({"model": model or "", "configurations": configurations}, "the command line")
        configurations, settings, size = spec.configurations, {}, input_size
    settings.update(
        _profile_overrides(device, dtype, batch_size, mode, threads, min_time, max_time, channels_last, target_ci)
    )
    if runtime is not None:  # a grid axis: every configuration measured in each runtime
        settings["runtimes"] = parse_runtimes(runtime)
    from ..sweeps.runner import run_sweep

    swept = split_list(models) if models is not None else spec.models or spec.model  # --models overrides a recipe's
    try:
        with _SweepProgress() as bar:
            result = run_sweep(
                swept,
                configurations,
                out,
                settings=settings,
                input_size=size,
                model_kwargs={**spec.model_kwargs, **model_args},
                target=target,
                resume=resume,
                force=force,
                progress=bar,
                ray=ray,
                ray_cpus=ray_cpus,
                memory_efficient=memory_efficient,
            )
    except (KeyboardInterrupt, SystemExit) as exc:  # Ctrl-C, or SIGTERM (a timeout, a batch job's limit)
        if isinstance(exc, SystemExit) and not exc.code:
            raise
        _say_interrupted(out, force)
        import signal

        # a SystemExit here is a termination: ours says 128 + SIGTERM, but where Ray's own handler
        # caught the signal it says 1, so the status is set here, as a shell expects it after SIGTERM
        raise typer.Exit(130 if isinstance(exc, KeyboardInterrupt) else 128 + signal.SIGTERM) from None
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
