"""The command line: the same API underneath, clean errors, JSON on stdout, no torch for --help."""

import json
import os
import subprocess
import sys

import pytest

import attnsurgeon

ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


def _imports_torch(args):
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from attnsurgeon.cli import app\n"
        f"r = CliRunner().invoke(app, {args!r})\n"
        "assert r.exit_code == 0, r.output\n"
        "print(sorted(m for m in ('torch', 'torchvision', 'timm') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, check=True)
    return out.stdout.strip()


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        *(
            pytest.param(a, marks=pytest.mark.slow)
            for a in (  # a process each
                ["insert", "--help"],
                ["list", "attn"],
                ["list", "positions"],
                ["inspect", "--help"],
                ["explain", "--help"],
            )
        ),
    ],
)
def test_help_and_lists_do_not_import_torch(args):
    assert _imports_torch(args) == "[]"


@pytest.mark.slow
def test_insert_json_schema_matches_the_api(cli):
    code, out, err = cli("insert", "resnet18", "--attn", "eca", "--stages", "3,4", "--input-size", "64", "--json")
    assert code == 0, err
    data = json.loads(out)  # exactly one JSON object on stdout
    assert data["model"] == "tv:resnet18" and data["source"] == "torchvision"
    assert set(data["params"]) >= {"base", "modified", "delta"}
    assert len(data["insertions"]) == 4
    for ins in data["insertions"]:
        assert set(ins) >= {"block", "stage", "position", "attn", "channels", "params", "module"}
        assert ins["stage"] in (3, 4) and ins["attn"] == "eca" and ins["module"] == f"{ins['block']}.eca"
    _, report = attnsurgeon.insert("resnet18", "eca", stages=[3, 4], input_size=64)
    assert data["params"] == report.params
    assert data["params"]["delta"] == sum(i["params"] for i in data["insertions"])


def test_insert_table_names_modules_and_totals(cli):
    code, out, _ = cli("insert", "timm:resnet18", "--attn", "se", "--blocks", "layer4.*", "--input-size", "64")
    assert code == 0
    assert "layer4.0.se" in out and "layer4.1.se" in out and "timm:resnet18 (timm)" in out
    per_block = 512 * 32 + 32 + 32 * 512 + 512  # fc1 + bias, fc2 + bias; hidden = 512 / 16
    assert f"11,689,512 → {11_689_512 + 2 * per_block:,} ({2 * per_block:+,}," in out


@pytest.mark.slow
def test_per_stage_kernel_sizes_and_bias_flags(cli):
    code, out, err = cli("insert", "resnet50", "--attn", "eca", "-k", "3,5,5,7", "--input-size", "64", "--json")
    assert code == 0, err
    ks = {i["stage"]: i["options"]["kernel_size"] for i in json.loads(out)["insertions"]}
    assert ks == {1: 3, 2: 5, 3: 5, 4: 7}
    code, out, _ = cli(
        "insert", "resnet18", "--no-bias", "--reduction", "8", "--stages", "4", "--input-size", "64", "--json"
    )
    assert {i["params"] for i in json.loads(out)["insertions"]} == {2 * 512 * 64}


@pytest.mark.parametrize(
    "args, message",
    [
        (["insert", "resnet5O"], "unknown model 'resnet5O'"),
        (["insert", "resnet18", "--attn", "sse"], "unknown attention block 'sse'"),
        (["insert", "resnet18", "--stages", "5"], "the model has 4 stages"),
        (["insert", "resnet18", "--stages", "three"], "--stages"),
        (["insert", "resnet18", "--blocks", "layer9.*"], "matches no block"),
        pytest.param(
            ["insert", "vgg11", "--position", "identity"], "not available", marks=pytest.mark.slow
        ),  # vgg11's size
        (["insert", "resnet18", "--reduction", "0"], "reduction must be a number > 0"),
        (["insert", "resnet18", "--weights", "missing.pt"], "does not exist"),
        (["insert", "resnet18", "--input-size", "big"], "input size"),
        (["insert", "resnet18", "--stages", "4-2"], "runs backwards"),
        (["insert", "resnet18", "--stages", ","], "names nothing"),
        (["insert", "resnet18", "--blocks", ""], "names no block"),
        (["insert", "resnet18", "--position", "prre"], "Did you mean: pre"),
        (["insert", "resnet18", "--attn", "eca", "-k", "4"], "positive odd"),
        (["insert", "resnet18.safetensors"], "is a file, not a model name"),
        (["insert", "resnet18", "--weights", "."], "is a folder"),
    ],
)
def test_wrong_input_is_one_line_and_exit_2(cli, args, message):
    code, out, err = cli(*args, "--input-size", "64") if "--input-size" not in args else cli(*args)
    assert code == 2
    assert message in err and "Traceback" not in err + out
    assert out == ""


@pytest.mark.slow
def test_debug_anywhere_shows_the_traceback():
    exe = [sys.executable, "-c", "from attnsurgeon.cli import main; main()"]
    plain = subprocess.run([*exe, "insert", "resnet5O"], capture_output=True, text=True, env=ENV)
    debug = subprocess.run([*exe, "insert", "resnet5O", "--debug"], capture_output=True, text=True, env=ENV)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr and "error: unknown model" in plain.stderr
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "AttnSurgeonError" in debug.stderr


@pytest.mark.slow
def test_inspect_json_and_table(cli):
    code, out, err = cli("inspect", "mobilenet_v3_large", "--input-size", "64", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["source"] == "torchvision" and len(data["stages"]) == 5
    assert {"module": "features.4.block.2", "type": "SqueezeExcitation"} in data["existing_attention"]
    blk = next(b for b in data["blocks"] if b["name"] == "features.2")
    assert blk["kind"] == "plain" and "identity" not in blk["positions"]
    code, out, _ = cli("inspect", "resnet18", "--input-size", "64")
    assert code == 0 and "layer4.1" in out and "standard pre post identity 3x3" in out


@pytest.mark.slow
def test_list_models(cli):
    code, out, _ = cli("list", "models", "seresnet5*", "--json")
    assert code == 0
    rows = json.loads(out)["models"]  # one JSON object, like every --json
    assert {"name": "seresnet50", "source": "timm"} in rows and all(r["name"].startswith("seresnet5") for r in rows)
    code, _, err = cli("list", "models", "no_such_model_xyz")
    assert code == 2 and "no model matches" in err


def test_typos_are_refused_before_any_model_is_built(cli, monkeypatch):
    import attnsurgeon.loading.models as models

    def no_build(*a, **k):
        raise AssertionError("a model was built")

    monkeypatch.setattr(models, "build_model", no_build)
    for args in (
        ["--position", "prre"],
        ["-r", "0"],
        ["--attn", "eca", "-k", "4"],
        ["--stages", "4-2"],
        ["--init", "zero"],
    ):
        code, _, err = cli("insert", "resnet50", *args)
        assert code == 2 and "error:" in err, args


def test_list_json_is_one_object(cli):
    for args, key in ((["list", "attn"], "blocks"), (["list", "positions"], "positions")):
        code, out, _ = cli(*args, "--json")
        assert code == 0 and set(json.loads(out)) == {key}


@pytest.mark.slow
def test_insert_notes_existing_attention_and_reports_the_requested_reduction(cli):
    code, out, err = cli(
        "insert", "mobilenet_v3_large", "--position", "3x3", "--stages", "2", "--input-size", "64", "--json"
    )
    assert code == 0, err
    data = json.loads(out)
    assert any("already has" in n and "attention" in n for n in data["notes"])
    code, out, _ = cli("insert", "resnet50", "--position", "3x3", "--stages", "1", "--input-size", "64", "--json")
    opts = json.loads(out)["insertions"][0]["options"]
    assert opts["reduction"] == 16 and opts["hidden"] == 8  # 64 / 16 = 4, rounded up to timm's divisor 8


def test_help_shows_flags_as_flags_and_every_default(cli):
    """No `<bool>` after a flag; every option that takes a value says its default."""
    import typer

    from attnsurgeon.cli import app

    for command in ("insert", "profile", "sweep", "apply", "export", "inspect"):
        code, out, _ = cli(command, "--help")
        assert code == 0 and "<bool>" not in out, command
    missing = []
    group = typer.main.get_command(app)
    for name, command in group.commands.items():
        for sub in getattr(command, "commands", {name: command}).values():
            for p in sub.params:
                if getattr(p, "param_type_name", "") != "option" or p.is_flag or p.required:
                    continue
                shown = p.default is not None and p.show_default is not False and "UNSET" not in repr(p.default)
                if not (shown or isinstance(p.show_default, str) or "Default" in (p.help or "")):
                    missing.append(f"{name} {p.opts[0]}")
    assert missing == []


def test_under_json_stdout_holds_the_object_alone_whoever_else_writes_to_it():
    """A library that prints, logs through a handler holding the stdout it found at import (ultralytics' model
    summary), or writes to file descriptor 1 from native code: under --json all of it goes to stderr (issue 29)."""
    code = (
        "import logging, os, sys\n"
        "log = logging.getLogger('chatty'); log.addHandler(logging.StreamHandler(sys.stdout)); "
        "log.setLevel(logging.INFO)\n"
        "from attnsurgeon.cli.render import emit_json, json_stdout\n"
        "with json_stdout():\n"
        "    print('printed'); log.info('logged'); sys.stdout.flush(); os.write(1, b'native\\n')\n"
        "    emit_json({'ok': 1})\n"
        "    print('printed later')\n"
        "print('after')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, check=True)
    assert out.stdout == '{\n  "ok": 1\n}\nafter\n'
    assert all(word in out.stderr for word in ("printed", "logged", "native", "printed later"))


def test_one_line_is_the_type_and_the_first_line_without_the_exporters_colours():
    from attnsurgeon.core.errors import one_line

    coloured = RuntimeError(
        "\n\x1b[31mCould not guard\x1b[0m on Eq(u0, 1)\n  the graph it had:\n    def forward(x): ..."
    )
    assert one_line(coloured) == "RuntimeError: Could not guard on Eq(u0, 1)"
    assert one_line(coloured, with_type=False) == "Could not guard on Eq(u0, 1)"
    assert one_line(ValueError()) == "ValueError"
