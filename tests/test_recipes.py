"""Recipes and sweeps: validation with places, the shipped recipes against independent parameter
counts, a small sweep's CSV/JSON/PNG, interruption and resume, failed rows."""

import json
from pathlib import Path

import pytest
import timm
from timm.layers import make_divisible

import attnsurgeon
from attnsurgeon import AttnSurgeonError, apply_plan
from attnsurgeon.planning.recipes import parse_recipe, read_recipe
from attnsurgeon.sweeps.runner import run_sweep

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
FAST = {"min_run_time": 0.05, "max_run_time": 0.1}

# ResNet-50, independently of the tool: (bottleneck width, output channels, blocks) per stage
STAGES = [(64, 256, 3), (128, 512, 4), (256, 1024, 6), (512, 2048, 3)]
RESNET50 = sum(p.numel() for p in timm.create_model("resnet50").parameters())


def blocks():
    """(stage, input channels, width, output channels) of every bottleneck."""
    c_in = 64
    for s, (width, out, n) in enumerate(STAGES, 1):
        for _ in range(n):
            yield s, c_in, width, out
            c_in = out


def se(c, r=16, divisor=8, bias=True):
    h = make_divisible(c / r, divisor, round_limit=0.0)  # timm's own rounding rule
    return 2 * c * h + (h + c if bias else 0)


def cbam(c, r=16, k=7):
    h = make_divisible(c / r, 1, round_limit=0.0)
    return 2 * c * h + 2 * k * k + 2  # bias-free shared MLP, 2->1 spatial conv, its BN


def params_of(recipe, configuration=None):
    spec = read_recipe(RECIPES / recipe)
    plan = (
        spec.insertions
        if configuration is None
        else next(c for c in spec.configurations if c.name == configuration).insertions
    )
    _, report = apply_plan(attnsurgeon.load_model(spec.model), plan, input_size=64)
    return report.params["modified"]


# --------------------------------------------------------------------------- shipped recipes


@pytest.mark.slow
def test_se_resnet50_equals_timm_seresnet50():
    assert params_of("se-resnet50.yaml") == sum(p.numel() for p in timm.create_model("seresnet50").parameters())


@pytest.mark.slow
def test_reduction_ablation_matches_the_formula_and_the_paper():
    paper = {2: 45.7, 4: 35.7, 8: 30.7, 16: 28.1, 32: 26.9}  # millions, SENet's reduction-ratio table
    for r, reported in paper.items():
        ours = params_of("senet-reduction-ablation.yaml", f"reduction={r}")
        assert ours == RESNET50 + sum(se(c, r, divisor=1, bias=False) for _, _, _, c in blocks())
        assert abs(ours / 1e6 - reported) < 0.15


@pytest.mark.slow
def test_integration_ablation_matches_the_formula():
    at = {
        "standard": lambda i, w, o: o,
        "post": lambda i, w, o: o,
        "identity": lambda i, w, o: o,
        "pre": lambda i, w, o: i,
        "3x3": lambda i, w, o: w,
    }
    for position, channels in at.items():
        expected = RESNET50 + sum(se(channels(i, w, o)) for _, i, w, o in blocks())
        assert params_of("senet-integration-ablation.yaml", position) == expected, position
    assert abs(params_of("senet-integration-ablation.yaml", "3x3") / 1e6 - 25.8) < 0.15  # the paper's SE-3x3


@pytest.mark.slow
def test_stage_ablation_matches_the_formula():
    names = ["stage 2 (res2)", "stage 3 (res3)", "stage 4 (res4)", "stage 5 (res5)"]
    for stage, name in enumerate(names, 1):
        assert params_of("senet-stage-ablation.yaml", name) == RESNET50 + sum(
            se(o) for s, _, _, o in blocks() if s == stage
        )
    assert params_of("senet-stage-ablation.yaml", "all stages") == RESNET50 + sum(se(o) for *_, o in blocks())


@pytest.mark.slow
def test_eca_and_cbam_recipes_match_the_formula():
    kernels = {1: 3, 2: 5, 3: 5, 4: 7}
    assert params_of("eca-resnet50.yaml") == RESNET50 + sum(kernels[s] for s, *_ in blocks()) == RESNET50 + 80
    ours = params_of("cbam-resnet50.yaml")
    assert ours == RESNET50 + sum(cbam(o) for *_, o in blocks())
    assert abs(ours / 1e6 - 28.09) < 0.05  # the CBAM paper's ResNet-50 + CBAM


def test_stacked_recipe_matches_the_formula():
    eca_k = {256: 5, 512: 5}  # the adaptive rule: |log2(C)/2 + 1/2| rounded up to odd
    expected = (
        RESNET50
        + sum(eca_k[o] for s, _, _, o in blocks() if s <= 2)
        + sum(cbam(o) for s, _, _, o in blocks() if s >= 3)
    )
    assert params_of("eca-then-cbam-resnet50.yaml") == expected


def test_every_shipped_recipe_parses():
    files = sorted(RECIPES.glob("*.yaml"))
    assert len(files) >= 7
    for f in files:
        spec = read_recipe(f)
        assert spec.model.startswith(("timm:", "tv:")) and (spec.insertions or spec.configurations)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "model: resnet18\ninsertions:\n  - attn: se\n    postion: pre\n",
            "line 4: insertions[0].postion: unknown key 'postion'.*Did you mean: position",
        ),
        (
            "model: resnet18\ninsertions:\n  - attn: se\n    stages: three\n",
            "line 4: insertions[0].stages: expected a list of stage numbers",
        ),
        ("model: resnet18\ninsertions:\n  - attn: sse\n", "line 3: insertions[0].attn: unknown attention block 'sse'"),
        (
            "model: resnet18\ninsertions:\n  - attn: eca\n    options: {reduction: 4}\n",
            "insertions[0].options.reduction: 'eca' takes no option",
        ),
        (
            "model: resnet18\ninsertions:\n  - attn: se\n    keep_depth: true\n",
            "line 4: insertions[0].keep_depth: 'keep_depth' is a block option: "
            "write it under options (options: {keep_depth: true})",
        ),
        (
            "model: resnet18\ninsertions:\n  - attn: se\n    options: {bias: maybe}\n",
            "options.bias: se: bias must be true or false",
        ),
        ("model: 50\ninsertions: [{attn: se}]\n", "line 1: model: expected str, got int"),
        ("insertions: [{attn: se}]\n", "model: missing"),
        ("model: resnet18\ninsertions: [{attn: se}]\ngrid: {attn: [se]}\n", "exactly one of 'insertions'"),
        (
            "model: resnet18\ninsertions: [{attn: se}]\nprofile: {batch_sizes: [0]}\n",
            "profile.batch_sizes: expected positive integers",
        ),
        ("model: resnet18\ninsertions: [{attn: se}\n", "not valid YAML"),
        (
            "model: resnet18\nmodel: resnet50\ninsertions: [{attn: se}]\n",
            "line 2: 'model' is given twice (first on line 1)",
        ),
        (
            "model: resnet18\ninsertions: [{attn: se}]\nprofile: {dtype: float64}\n",
            "line 3: profile.dtype: expected one of",
        ),
        (
            "model: resnet18\ninsertions: [{attn: se}]\nprofile: {mode: trian}\n",
            "profile.mode: expected inference or train",
        ),
        (
            "model: resnet18\ninsertions:\n  - attn: se\n    options: {reduction: -2}\n",
            "options.reduction: se: reduction must be a number > 0",
        ),
        ("model: resnet18\ninsertions: [{attn: se]\n", "line 2, column"),
    ],
)
def test_validation_names_the_place(tmp_path, text, message):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(AttnSurgeonError) as err:
        read_recipe(path)
    for fragment in message.split(".*"):  # literal fragments, in order
        assert fragment in str(err.value), (fragment, str(err.value))
    assert str(err.value).startswith(str(path))


def test_yaml_is_read_safely(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.yaml"
    for payload in (
        f"!!python/object/apply:os.system ['touch {marker}']",
        f"!!python/object/apply:os.system 'touch {marker}'",
    ):
        path.write_text(f"model: {payload}\ninsertions: [{{attn: se}}]\n")
        with pytest.raises(AttnSurgeonError, match="line 1: .*(not allowed|could not determine a constructor)"):
            read_recipe(path)
    assert not marker.exists()


@pytest.mark.slow
def test_apply_cli(cli, tmp_path):
    code, out, err = cli("apply", RECIPES / "eca-resnet50.yaml", "--json", "--out", tmp_path / "eca.safetensors")
    assert code == 0, err
    data = json.loads(out)
    assert data["recipe"] == "ECA-Net-50" and data["params"]["delta"] == 80 and data["export"]["max_abs_diff"] == 0
    # the saved file's recipe is the same schema: it re-creates the model
    assert attnsurgeon.load(tmp_path / "eca.safetensors").attnsurgeon_report.params["delta"] == 80
    code, _, err = cli("apply", RECIPES / "senet-stage-ablation.yaml")
    assert code == 2 and "is a sweep recipe" in err


@pytest.mark.slow
def test_apply_profile_uses_the_recipe_settings(cli, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "model: resnet18\ninput_size: 64\ninsertions: [{attn: se, stages: [4]}]\n"
        "profile: {batch_sizes: [2], min_run_time: 0.05, max_run_time: 0.1}\n"
    )
    code, out, err = cli("apply", recipe, "--profile", "--json")
    assert code == 0, err
    prof = json.loads(out)["profile"]
    assert prof["settings"]["batch_sizes"] == [2] and prof["delta"]["params"] == 2 * se(512)


# --------------------------------------------------------------------------- sweeps


@pytest.mark.slow
def test_small_sweep_writes_csv_json_png(cli, tmp_path):
    out = tmp_path / "sweep"
    code, stdout, err = cli(
        "sweep",
        "resnet18",
        "--attn",
        "se,eca",
        "--position",
        "standard,pre",
        "--input-size",
        "64",
        "--min-time",
        "0.05",
        "--max-time",
        "0.1",
        "--out",
        out,
        "--json",
    )
    assert code == 0, err
    data = json.loads(stdout)
    names = [r["name"] for r in data["rows"]]
    assert names == ["base", "se/standard", "se/pre", "eca/standard", "eca/pre"]
    assert all(r["status"] == "ok" for r in data["rows"])
    rows = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in rows] == names
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert csv_lines[0].startswith("model,name,status,params,params_delta") and len(csv_lines) == 6
    assert all(line.startswith("resnet18,") for line in csv_lines[1:])  # every row names its model
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    se_std = rows[1]
    assert se_std["delta"]["params"] == sum(se(c) for c in (64, 64, 128, 128, 256, 256, 512, 512))
    assert se_std["flops"] == 2 * se_std["macs"] and se_std["base"]["latency_ms"]["median"] > 0
    assert set(se_std["latency_ms"]) == {"median", "iqr"}  # nested as in `profile --json`


@pytest.mark.slow
def test_interrupted_sweep_keeps_rows_and_resume_measures_only_the_rest(tmp_path):
    spec = parse_recipe({"model": "resnet18", "grid": {"attn": ["se", "eca", "cbam"]}})
    out = tmp_path / "s"

    def stop_after_two(name, done, total):
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep("resnet18", spec.configurations, out, settings=FAST, input_size=64, progress=stop_after_two)
    kept = (out / "rows.jsonl").read_text().splitlines()
    assert [json.loads(line)["name"] for line in kept] == ["base", "se"]
    assert [r["name"] for r in json.loads((out / "results.json").read_text())] == ["base", "se"]
    with pytest.raises(AttnSurgeonError, match="already holds a sweep"):
        run_sweep("resnet18", spec.configurations, out, settings=FAST, input_size=64)
    with pytest.raises(AttnSurgeonError, match="other values for: settings"):
        run_sweep("resnet18", spec.configurations, out, settings={**FAST, "mode": "train"}, input_size=64, resume=True)

    result = run_sweep("resnet18", spec.configurations, out, settings=FAST, input_size=64, resume=True)
    assert result.measured == ["eca", "cbam"]  # base and se were not measured again
    lines = (out / "rows.jsonl").read_text().splitlines()
    assert lines[:2] == kept  # finished rows left exactly as they were
    assert [r["name"] for r in result.rows] == ["base", "se", "eca", "cbam"]


@pytest.mark.slow
def test_a_failing_configuration_becomes_a_failed_row(tmp_path, cli):
    # every block is selected: the blocks without a skip are left out with a note, the row is measured
    out = tmp_path / "mnv2"
    code, stdout, err = cli(
        "sweep",
        "mobilenet_v2",
        "--attn",
        "se",
        "--position",
        "standard,identity",
        "--input-size",
        "64",
        "--min-time",
        "0.05",
        "--max-time",
        "0.1",
        "--out",
        out,
        "--json",
    )
    assert code == 0, err
    rows = {r["name"]: r for r in json.loads(stdout)["rows"]}
    assert rows["standard"]["status"] == "ok"
    assert rows["identity"]["status"] == "ok" and len(rows["identity"]["insertions"]) == 10  # the 10 residual blocks
    assert any(
        "se skipped 7 blocks" in w and "position 'identity' is not available" in w for w in rows["identity"]["notes"]
    )
    # a block named with --blocks that cannot take the position fails its row
    out = tmp_path / "named"
    code, stdout, err = cli(
        "sweep",
        "mobilenet_v2",
        "--attn",
        "se",
        "--position",
        "identity",
        "--blocks",
        "features.1",
        "--input-size",
        "64",
        "--min-time",
        "0.05",
        "--max-time",
        "0.1",
        "--out",
        out,
        "--json",
    )
    assert code == 0, err
    rows = {r["name"]: r for r in json.loads(stdout)["rows"]}
    assert rows["se"]["status"] == "failed" and "not available in block features.1" in rows["se"]["reason"]
    assert "failed" in (out / "results.csv").read_text()


def test_apply_errors_name_the_recipe_and_the_insertion(cli, tmp_path):
    binary = tmp_path / "weights.pt"
    binary.write_bytes(b"\x80\x04\x95binary")
    code, _, err = cli("apply", binary)
    assert code == 2 and "not a text file" in err
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: resnet18\ninput_size: 64\ninsertions: [{attn: se}, {attn: eca, stages: [7]}]\n")
    code, _, err = cli("apply", recipe)
    assert code == 2 and f"{recipe}: insertion 2 of 2 (eca at standard): stage 7 out of range" in err
    recipe.write_text("model: resnet18\nmodel_kwargs: {num_clases: 10}\ninsertions: [{attn: se}]\n")
    code, _, err = cli("apply", recipe)
    assert code == 2 and "num_clases" in err and "Traceback" not in err
