"""``attnsurgeon apply``: a recipe of insertions applied to its model, profiled or written out."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ..core.errors import AttnSurgeonError
from .app import app, command
from .options import (
    _EXTENSIONS,
    ForceOpt,
    FormatOpt,
    InputSizeOpt,
    JsonOpt,
    MemoryEfficientOpt,
    RecipeBatchSizesOpt,
    RecipeDeviceOpt,
    RecipeDtypeOpt,
    RecipeMaxTimeOpt,
    RecipeMinTimeOpt,
    RecipeModeOpt,
    ThreadsOpt,
    _profile_overrides,
)
from .render import _escape, _stdout, _Steps, emit_json, print_export, print_report, progress
from .render_profile import print_profile

# --------------------------------------------------------------------------- recipes and sweeps

RecipeArg = Annotated[str, typer.Argument(help="A YAML recipe (see recipes/).", show_default=False, metavar="RECIPE")]
ApplyOutOpt = Annotated[
    Path | None,
    typer.Option("--out", "-o", help=f"Write the modified model ({_EXTENSIONS}).", show_default="nothing written"),
]
AlsoProfileOpt = Annotated[
    bool, typer.Option("--profile", help="Also profile base vs modified with the recipe's settings.")
]


@app.command()
@command
def apply(
    recipe: RecipeArg,
    out: ApplyOutOpt = None,
    format_: FormatOpt = None,
    force: ForceOpt = False,
    do_profile: AlsoProfileOpt = False,
    device: RecipeDeviceOpt = None,
    dtype: RecipeDtypeOpt = None,
    batch_size: RecipeBatchSizesOpt = None,
    mode: RecipeModeOpt = None,
    threads: ThreadsOpt = None,
    min_time: RecipeMinTimeOpt = None,
    max_time: RecipeMaxTimeOpt = None,
    input_size: InputSizeOpt = None,
    json_out: JsonOpt = False,
    memory_efficient: MemoryEfficientOpt = False,
) -> None:
    """Apply a recipe: its model and insertions (stacked in order); optionally profile and write it.

    Example: attnsurgeon apply recipes/eca-resnet50.yaml --profile
    """
    from ..planning.recipes import read_recipe

    spec = read_recipe(recipe)
    if spec.is_sweep:
        raise AttnSurgeonError(
            f"'{recipe}' is a sweep recipe (several configurations): run `attnsurgeon sweep {recipe} --out DIR`"
        )
    if out is not None:
        from ..saving.export import check_target

        check_target(out, format_, force)
    try:
        with progress(f"Loading {spec.model} …"):
            from ..saving.saved import load_model

            loaded = load_model(spec.model, **spec.load_args())
        with progress("Inserting …"):
            from ..rewriting.apply import apply_plan

            model_out, report = apply_plan(
                loaded,
                spec.insertions,
                input_size=input_size or spec.input_size,
                target=spec.target,
                memory_efficient=memory_efficient or spec.memory_efficient,
            )
    except AttnSurgeonError as exc:  # say which file the problem comes from
        raise AttnSurgeonError(f"{recipe}: {exc}") from exc
    written = profiled = None
    if out is not None:
        with progress(f"Writing {out} and checking it …"):
            from ..saving.export import export as do_export

            written = do_export(model_out, out, format=format_, force=force)
    if do_profile:
        settings = {
            **(spec.profile or {}),
            **_profile_overrides(device, dtype, batch_size, mode, threads, min_time, max_time),
        }
        from ..profiling import profile as run_profile

        with _Steps() as steps:
            profiled = run_profile(
                loaded,
                plan=spec.insertions,
                input_size=report.input_size,
                target=report.target,
                progress=steps,
                memory_efficient=memory_efficient or spec.memory_efficient,
                **settings,
            )
    _show(recipe, spec, report, written, profiled, json_out)


def _show(recipe: str, spec: Any, report: Any, written: Any, profiled: Any, json_out: bool) -> None:
    """The recipe's name, what was inserted, written and measured: tables, or one JSON object."""
    if json_out:
        emit_json(
            {
                "recipe": spec.name or recipe,
                **report.to_dict(),
                "profile": profiled.to_dict() if profiled else None,
                "export": written.to_dict() if written else None,
            }
        )
        return
    if spec.name or spec.description:
        _stdout().print(
            f"[bold]{_escape(spec.name or recipe)}[/]" + (f" — {_escape(spec.description)}" if spec.description else "")
        )
    print_report(report)
    if written:
        print_export(written)
    if profiled:
        print_profile(profiled)
