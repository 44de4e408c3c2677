#!/usr/bin/env python
"""How much of the model zoo can attnsurgeon rewrite?

Tries `insert --attn se` and one forward pass of the rewritten model on

* every torchvision model of every task family (classification, quantization, video,
  segmentation, detection, optical_flow), and
* the smallest model of every timm module family (``timm.list_modules()``; the model with the
  fewest parameters, counted by building each one on the meta device),

each in its own process with a time limit, and prints a table per family, every failure's
reason (the one line the CLI would print: the error message, ``internal error: ...`` for a bug,
``timeout after N s``) and a summary.

    python scripts/coverage.py --jobs 2                          # everything (resumable: --resume)
    python scripts/coverage.py --family video,detection --limit 2
    python scripts/coverage.py --models r3d_18,timm:resnet18 --input-size 64
    python scripts/coverage.py --resume --only-failures --markdown coverage.md   # report only, nothing left to run

Results go to OUT/results.jsonl (default out/coverage/), one line per model as it finishes, so
an interrupted run loses nothing: `--resume` skips the models already there (a run without it
starts a new file, keeping the previous one as results.jsonl.prev). The timm family choice is
cached in OUT/timm_families.json.

Each model runs at its own default input size (`--input-size` overrides it for every model),
batch 1, random weights, in eval mode. The sample input follows the family: a (1, *input_size)
tensor (for video models input_size is (C, T, H, W)); a list of one image for detectors; two
images for optical flow. A model counts as a success when the rewritten model runs and has at
least one inserted block.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from attnsurgeon.core.errors import one_line
from attnsurgeon.core.lists import split_list

TORCHVISION_FAMILIES = ("classification", "quantization", "video", "segmentation", "detection", "optical_flow")
STATUSES = ("ok", "error", "internal", "timeout", "crash")  # error: a clear AttnSurgeonError message

# --------------------------------------------------------------------------- what to run


def torchvision_catalogue() -> dict[str, list[str]]:
    """Torchvision family -> its model specs (``tv:NAME``)."""
    import torchvision.models as tvm

    modules = {
        "classification": tvm,
        "quantization": tvm.quantization,
        "video": tvm.video,
        "segmentation": tvm.segmentation,
        "detection": tvm.detection,
        "optical_flow": tvm.optical_flow,
    }
    return {
        family: [f"tv:{n}" for n in sorted(tvm.list_models(module=modules[family]))] for family in TORCHVISION_FAMILIES
    }


def timm_modules() -> dict[str, list[str]]:
    """timm module family -> its model names (families without models left out)."""
    import timm

    families = {m: sorted(timm.list_models(module=m)) for m in timm.list_modules()}
    return {m: names for m, names in families.items() if names}


def meta_params(name: str, limit_s: float) -> tuple[int, str]:
    """Parameters of timm model ``name``, built on the meta device (no memory, no init) within
    ``limit_s``, and its structure: the model's class and the set of its modules' classes (two
    models of a family with different structures take different constructor paths: Swin V2 and
    Swin V2 CR, a ViT with rotary embeddings and one without)."""
    import timm
    import torch

    def _expired(signum, frame):
        raise TimeoutError(f"building on the meta device took more than {limit_s:g} s")

    old = signal.signal(signal.SIGALRM, _expired)
    signal.setitimer(signal.ITIMER_REAL, limit_s)
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = timm.create_model(name, pretrained=False)
        classes = sorted({type(m).__name__ for m in model.modules()} - {type(model).__name__})
        return sum(p.numel() for p in model.parameters()), f"{type(model).__name__}({','.join(classes)})"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def family_sizes(names: list[str], limit_s: float) -> tuple[dict[str, int], dict[str, str], dict[str, str]]:
    """Meta-device parameter counts of ``names``, their structures (:func:`meta_params`), and the
    reason for each that does not build."""
    sizes, structures, failures = {}, {}, {}
    for name in names:
        try:
            sizes[name], structures[name] = meta_params(name, limit_s)
        except Exception as exc:  # noqa: BLE001 - any failure only removes the candidate
            failures[name] = one_line(exc, with_type=False)
    return sizes, structures, failures


def smallest_timm_models(cache: Path, runner: Runner, jobs: int, limit_s: float) -> dict:
    """For every timm module family, its model with the fewest parameters (cached in ``cache``).

    Returns ``{"families": {module: {"model", "params", "models", "meta_failures", "sizes",
    "structures"}}, "seconds", ...}`` (``sizes`` and ``structures`` of every model that builds, for
    :func:`sample_family`).
    A model that does not build on the meta device within ``limit_s`` is not a candidate; a family
    none of whose models builds there gets its first model by name (``params: None``). Families
    are counted ``jobs`` at a time, each in its own process.
    """
    import timm
    import torch

    key = {"timm": timm.__version__, "torch": torch.__version__, "cache": 2}
    if cache.is_file():
        data = json.loads(cache.read_text())
        if data.get("versions") == key:
            return {**data, "cached": True}
    start = time.perf_counter()
    modules = timm_modules()
    families = {}

    def choose(module: str) -> dict:
        names = modules[module]
        status, result = runner.call(family_sizes, (names, limit_s), timeout=limit_s * len(names) + 60)
        sizes, structures, failures = result if status == "ok" else ({}, {}, {"*": f"{status}: {result}"})
        best = min(sizes, key=lambda n: (sizes[n], n)) if sizes else names[0]  # none builds on meta: the first name
        return {
            "model": best,
            "params": sizes.get(best),
            "models": len(names),
            "meta_failures": failures,
            "sizes": sizes,
            "structures": structures,
        }

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        largest_first = sorted(modules, key=lambda m: -len(modules[m]))  # the long families do not come last
        futures = {pool.submit(choose, m): m for m in largest_first}
        for future in as_completed(futures):
            module, choice = futures[future], future.result()
            families[module] = choice
            size = (
                f"{choice['params'] / 1e6:.2f} M" if choice["params"] is not None else "none builds on the meta device"
            )
            print(f"  timm {module:28s} {choice['models']:3d} models -> {choice['model']} ({size})", flush=True)
    families = {m: families[m] for m in modules}
    data = {
        "versions": key,
        "seconds": round(time.perf_counter() - start, 1),
        "build_limit_s": limit_s,
        "families": families,
    }
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(data, indent=1))
    return {**data, "cached": False}


def sample_family(choice: dict, per_family: int, max_params: float | None) -> list[str]:
    """A stratified sample of one timm family (a :func:`smallest_timm_models` entry): its smallest
    model, its median by parameters, then the smallest model of each structure not yet taken
    (another model class, or other layer classes: a different constructor path), smallest first,
    up to ``per_family`` models; ``per_family=0`` takes every model. Only models with at most
    ``max_params`` parameters are candidates; a family with none of them keeps its smallest."""
    sizes, structures = choice.get("sizes") or {}, choice.get("structures") or {}
    if not sizes:
        return [choice["model"]]
    fitting = sorted((n for n in sizes if max_params is None or sizes[n] <= max_params), key=lambda n: (sizes[n], n))
    if not fitting:
        return [min(sizes, key=lambda n: (sizes[n], n))]
    if per_family == 0:
        return fitting
    picked = [fitting[0], fitting[(len(fitting) - 1) // 2]]
    for name in fitting:
        if structures.get(name) not in {structures.get(p) for p in picked}:
            picked.append(name)
    return list(dict.fromkeys(picked))[:per_family]


def family_of(spec: str, tv: dict[str, list[str]], timm_families: dict[str, list[str]]) -> str:
    """The family of a model spec, resolving a bare name as attnsurgeon does (torchvision first)."""
    source, _, name = spec.rpartition(":") if spec.startswith(("tv:", "torchvision:", "timm:")) else ("", "", spec)
    if source in ("", "tv", "torchvision"):
        for family, specs in tv.items():
            if f"tv:{name}" in specs:
                return family
    if source in ("", "timm"):
        for module, names in timm_families.items():
            if name in names:
                return f"timm:{module}"
    return "other"


def select(
    catalogue: dict[str, list[str]], families: list[str] | None = None, limit: int | None = None
) -> list[tuple[str, str]]:
    """``(family, spec)`` pairs to run from ``catalogue`` (family -> specs; timm families are ``timm:MODULE``).

    ``families`` holds family names, ``torchvision`` (all its families) or ``timm`` (all timm
    families); ``limit`` keeps the first N models of each family, and the first N of all timm
    families (a timm family has one model, its smallest).
    """

    def wanted(family: str) -> bool:
        if not families:
            return True
        group = "timm" if family.startswith("timm:") else "torchvision"
        return family in families or group in families

    unknown = [f for f in families or [] if f not in catalogue and f not in ("torchvision", "timm")]
    if unknown:
        raise SystemExit(
            f"unknown family {', '.join(unknown)}; choose from torchvision, timm, "
            f"{', '.join(TORCHVISION_FAMILIES)} or timm:MODULE"
        )
    pairs, timm_count = [], 0
    for family, specs in catalogue.items():
        if not wanted(family):
            continue
        if family.startswith("timm:") and family not in (families or []):  # one of all timm families
            timm_count += 1
            if limit is not None and timm_count > limit:
                continue
        elif limit is not None:
            specs = specs[:limit]
        pairs += [(family, s) for s in specs]
    return pairs


# --------------------------------------------------------------------------- one model, in its own process


def sample_inputs(family: str, input_size) -> tuple:
    """The forward pass's arguments for a model of ``family`` at ``input_size`` (without the batch)."""
    import torch

    x = torch.randn(*input_size)
    if family == "detection":  # torchvision detectors take a list of images
        return ([x],)
    if family == "optical_flow":  # two frames
        return (x[None], x[None])
    return (x[None],)  # images (C, H, W), videos (C, T, H, W), sequences (C, L)


def try_model(spec: str, family: str, input_size: str | None = None, threads: int = 1) -> dict:
    """`insert --attn se --init identity` and one forward pass, checked against the base model's
    (the blocks start as identities: a rewrite that loses or reorders anything shows); the row
    that goes into results.jsonl."""
    import torch

    import attnsurgeon
    from attnsurgeon import AttnSurgeonError
    from attnsurgeon.loading.models import build_model

    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    row: dict = {"status": "ok", "reason": None}
    start = time.perf_counter()
    try:
        loaded = build_model(spec)
        loaded.model.eval()
        model, report = attnsurgeon.insert(loaded, attn="se", init="identity", input_size=input_size)
        row.update(
            blocks=len({i.block for i in report.insertions}),
            insertions=len(report.insertions),
            params=report.params["base"],
            params_delta=report.params["delta"],
            params_percent=report.params["percent"],
            input_size=list(report.input_size),
            notes=list(report.notes),
        )
        row["insert_s"] = round(time.perf_counter() - start, 2)
        if not report.insertions:
            raise AttnSurgeonError("no attention block was inserted")
        model.eval()
        forward = time.perf_counter()
        inputs = sample_inputs(family, report.input_size)
        try:
            with torch.no_grad():
                got = model(*inputs)
        except Exception as exc:  # the rewrite must keep the model runnable: a bug
            raise AttnSurgeonError(f"internal error: the rewritten model does not run: {one_line(exc)}") from exc
        row["forward_s"] = round(time.perf_counter() - forward, 2)
        with torch.no_grad():
            want = loaded.model(*inputs)
        row["identity_diff"] = identity_diff(got, want)
        if row["identity_diff"] is not None and row["identity_diff"] > 1e-4:
            raise AttnSurgeonError(
                f"internal error: --init identity is not exact: outputs differ by up to "
                f"{row['identity_diff']:.3g} (relative to the output's scale)"
            )
    except AttnSurgeonError as exc:  # what the CLI prints as `error: ...`
        reason = str(exc)
        row.update(status="internal" if reason.startswith("internal error") else "error", reason=reason)
    except Exception as exc:  # what the CLI prints as `internal error: ...`
        row.update(status="internal", reason=f"internal error: {one_line(exc)}")
    return row


def identity_diff(got, want) -> float | None:
    """The largest difference between two outputs (``export``'s own measure), relative to the largest
    magnitude in ``want``; None where ``want`` holds no floating-point tensor or the two differ in
    structure."""
    import math

    from attnsurgeon.loading.samples import flatten_outputs, max_abs_diff, output_scale

    if not any(t.is_floating_point() for t in flatten_outputs(want)):
        return None
    diff = max_abs_diff(got, want)
    return None if math.isinf(diff) else diff / (output_scale(want) or 1.0)


def _child(conn, fn, args: tuple) -> None:
    conn.send(fn(*args))
    conn.close()


class Runner:
    """Runs functions in their own processes, forked from a server that imported torch once, with a time limit."""

    def __init__(self, timeout: float, threads: int, input_size: str | None):
        self.timeout, self.threads, self.input_size = timeout, threads, input_size
        self.ctx = multiprocessing.get_context("forkserver")
        # the libraries only: attnsurgeon is imported in each process, by this process's sys.path (the
        # server's own path puts the working directory first)
        self.ctx.set_forkserver_preload(["torch", "torchvision", "timm"])
        self.live: set = set()
        self.lock = threading.Lock()
        self.stopped = False

    def call(self, fn, args: tuple, timeout: float):
        """``("ok", fn(*args))``, ``("timeout", None)`` or ``("crash", "signal 9")``."""
        receive, send = self.ctx.Pipe(duplex=False)
        proc = self.ctx.Process(target=_child, args=(send, fn, args), daemon=True)
        with self.lock:
            if self.stopped:
                return "crash", "stopped"
            proc.start()
            self.live.add(proc)
        send.close()
        try:
            if not receive.poll(timeout):
                return "timeout", None
            try:
                result = receive.recv()
                proc.join(10)  # let it exit on its own (and clean up); killed below if it does not
                return "ok", result
            except EOFError:  # the process died without a word: a segfault, or killed for memory
                proc.join()
                code = proc.exitcode
                return "crash", f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        finally:
            proc.kill()
            proc.join()
            with self.lock:
                self.live.discard(proc)

    def run(self, family: str, spec: str) -> dict:
        """One model's row: `insert --attn se` + forward pass in its own process."""
        start = time.perf_counter()
        status, result = self.call(try_model, (spec, family, self.input_size, self.threads), self.timeout)
        if status == "ok":
            row = result
        elif status == "timeout":
            row = {"status": "timeout", "reason": f"timeout after {self.timeout:g} s"}
        else:
            row = {"status": "crash", "reason": f"internal error: the worker process died ({result})"}
        return {"model": spec, "family": family, **row, "seconds": round(time.perf_counter() - start, 1)}

    def stop(self) -> None:
        """Kill the running processes and start no new one."""
        with self.lock:
            self.stopped = True
            for proc in self.live:
                proc.kill()


# --------------------------------------------------------------------------- results


def read_rows(path: Path) -> dict[str, dict]:
    """Rows of a results file by model (the last row of a model wins; a torn last line is ignored)."""
    rows = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            rows[row["model"]] = row
    return rows


def _fmt_params(n) -> str:
    return "" if n is None else f"{n / 1e6:+.2f} M" if abs(n) >= 10_000 else f"{n:+d}"


def print_tables(rows: list[dict], only_failures: bool = False, width: int = 110) -> None:
    """A table per torchvision family and one for timm (its rows named MODULE/MODEL)."""
    by_family: dict[str, list[dict]] = {}
    for r in rows:
        by_family.setdefault("timm" if r["family"].startswith("timm:") else r["family"], []).append(r)
    for family, part in by_family.items():
        ok = sum(r["status"] == "ok" for r in part)
        print(f"\n== {family}: {ok}/{len(part)} ok" + (" (failures only)" if only_failures else ""))
        shown = [r for r in part if not (only_failures and r["status"] == "ok")]
        names = [
            r["model"]
            if family != "timm"
            else f"{r['family'].removeprefix('timm:')}/{r['model'].removeprefix('timm:')}"
            for r in shown
        ]
        if not shown:
            continue
        w = max(len(n) for n in names)
        print(f"{'model':{w}s}  {'result':8s} {'blocks':>6s} {'ins.':>5s} {'params Δ':>10s} {'s':>6s}  reason")
        for name, r in zip(names, shown, strict=True):
            print(
                f"{name:{w}s}  {r['status']:8s} {r.get('blocks', ''):>6} {r.get('insertions', ''):>5} "
                f"{_fmt_params(r.get('params_delta')):>10s} {r['seconds']:6.1f}  {(r['reason'] or '')[:width]}"
            )


def summary_lines(rows: list[dict]) -> list[tuple[str, int, int]]:
    """(label, ok, total) per torchvision family, torchvision in all, and timm families."""
    lines = []
    tv = [r for r in rows if r["family"] in TORCHVISION_FAMILIES]
    for family in sorted({r["family"] for r in tv}, key=TORCHVISION_FAMILIES.index):
        part = [r for r in tv if r["family"] == family]
        lines.append((f"torchvision {family}", sum(r["status"] == "ok" for r in part), len(part)))
    if tv:
        lines.append(("torchvision, all", sum(r["status"] == "ok" for r in tv), len(tv)))
    tm = [r for r in rows if r["family"].startswith("timm:")]
    if tm:
        families = len({r["family"] for r in tm})
        label = (
            "timm families (smallest model of each)" if families == len(tm) else f"timm models ({families} families)"
        )
        lines.append((label, sum(r["status"] == "ok" for r in tm), len(tm)))
    other = [r for r in rows if r["family"] == "other"]
    if other:
        lines.append(("other models", sum(r["status"] == "ok" for r in other), len(other)))
    return lines


def _pct(ok: int, total: int) -> str:
    return f"{100 * ok / total:.1f} %" if total else "-"


def print_notes(rows: list[dict]) -> None:
    """The report's notes of the models that passed (blocks a default selection skipped, existing attention)."""
    noted = [r for r in rows if r["status"] == "ok" and r.get("notes")]
    if noted:
        print(f"\nNotes ({len(noted)} models):")
        for r in noted:
            for note in r["notes"]:
                print(f"  {r['model']}: {note}")


def print_summary(rows: list[dict]) -> None:
    print("\nSummary: `insert --attn se` + forward pass")
    for label, ok, total in summary_lines(rows):
        print(f"  {label:42s} {ok:4d} / {total:<4d} ({_pct(ok, total)})")
    counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
    print("  " + ", ".join(f"{n} {s}" for s, n in counts.items() if n))
    bugs = [r for r in rows if r["status"] in ("internal", "crash")]
    if bugs:
        print(f"\nInternal errors ({len(bugs)}):")
        for r in bugs:
            print(f"  {r['model']} ({r['family']}): {r['reason']}")


def markdown(rows: list[dict], timm_choice: dict | None = None) -> str:
    out = ["| family | models | `insert --attn se` + forward pass |", "|---|---:|---:|"]
    for label, ok, total in summary_lines(rows):
        strong = label == "torchvision, all" or label.startswith("timm")
        cell = f"{ok} ({_pct(ok, total)})"
        out.append(f"| {label} | {total} | {'**' + cell + '**' if strong else cell} |")
    failures = [r for r in rows if r["status"] != "ok"]
    if failures:
        out += ["", "Failures:", ""]
        out += [
            f"- `{r['model']}` ({r['family']}, {r['status']}): {r['reason'].replace('<', '&lt;')}" for r in failures
        ]
    noted = [r for r in rows if r["status"] == "ok" and r.get("notes")]
    if noted:
        out += [
            "",
            "<details><summary>Notes on the models that passed (blocks skipped, attention they already have)</summary>",
            "",
        ]
        out += [f"- `{r['model']}`: {note.replace('<', '&lt;')}" for r in noted for note in r["notes"]]
        out += ["", "</details>"]
    if timm_choice:
        out += [
            "",
            "<details><summary>The timm models tried in each family</summary>",
            "",
            "| timm module | models | tried (meta-device parameter count): result |",
            "|---|---:|---|",
        ]
        status = {r["model"]: r["status"] for r in rows}
        for module, c in timm_choice["families"].items():
            sizes = c.get("sizes") or {}
            tried = [r["model"] for r in rows if r["family"] == f"timm:{module}"]
            if not tried:  # not in this run
                continue

            def size(name: str, sizes: dict = sizes, c: dict = c) -> str:  # this family's, bound now
                n = sizes.get(name.removeprefix("timm:"), c["params"] if name == f"timm:{c['model']}" else None)
                return f"{n / 1e6:.2f} M" if n is not None else "does not build on the meta device"

            cells = ", ".join(f"`{m.removeprefix('timm:')}` ({size(m)}): {status[m]}" for m in tried)
            out.append(f"| {module} | {c['models']} | {cells} |")
        out += ["", "</details>"]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- main


def _interrupted(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--family", help="comma-separated: torchvision, timm, " + ", ".join(TORCHVISION_FAMILIES) + ", timm:MODULE"
    )
    parser.add_argument("--models", help="comma-separated model specs instead of the families (r3d_18,timm:resnet18)")
    parser.add_argument(
        "--limit", type=int, help="the first N models of each family, and the first N of all timm families"
    )
    parser.add_argument("--jobs", "-j", type=int, default=1, help="models run in parallel (default 1)")
    parser.add_argument("--threads", type=int, help="torch threads per model (default: CPU cores / jobs)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per model (default 300)")
    parser.add_argument("--input-size", help="passed to every model's insert (default: each model's own)")
    parser.add_argument(
        "--per-family",
        type=int,
        default=1,
        help="timm models per family: 1 (default) the smallest; N: the smallest, the median and one "
        "of each other structure (constructor path), N at most; 0: every model",
    )
    parser.add_argument(
        "--max-params",
        type=float,
        default=120,
        help="with --per-family other than 1: only timm models up to this many million parameters (default 120)",
    )
    parser.add_argument("--out", default="out/coverage", help="results folder (default out/coverage)")
    parser.add_argument("--resume", action="store_true", help="keep OUT/results.jsonl and skip the models it has")
    parser.add_argument("--only-failures", action="store_true", help="tables list the failures only")
    parser.add_argument(
        "--notes", action="store_true", help="also list the notes of the models that passed (skipped blocks)"
    )
    parser.add_argument("--markdown", help="write the summary and the failures as Markdown to this file")
    parser.add_argument(
        "--meta-build-timeout", type=float, default=30, help="seconds per meta-device build when choosing timm models"
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # random weights only: never wait for a hub
    warnings.filterwarnings("ignore")

    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    runner = Runner(args.timeout, threads, args.input_size)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    tv, timm_families = torchvision_catalogue(), timm_modules()
    timm_choice = None
    if args.models:
        specs = split_list(args.models)
        pairs = [(family_of(s, tv, timm_families), s) for s in specs]
    else:
        families = split_list(args.family) if args.family else None
        catalogue = dict(tv)
        if not families or any(f == "timm" or f.startswith("timm:") for f in families):
            print("choosing the smallest model of every timm family (meta device; cached) ...", flush=True)
            timm_choice = smallest_timm_models(out / "timm_families.json", runner, args.jobs, args.meta_build_timeout)
            how = f"read from {out / 'timm_families.json'}" if timm_choice["cached"] else "chosen"
            print(
                f"  {len(timm_choice['families'])} families, {how} (choosing took {timm_choice['seconds']} s)",
                flush=True,
            )
            if args.per_family == 1:
                catalogue.update({f"timm:{m}": [f"timm:{c['model']}"] for m, c in timm_choice["families"].items()})
            else:
                limit = args.max_params * 1e6
                catalogue.update(
                    {
                        f"timm:{m}": [f"timm:{n}" for n in sample_family(c, args.per_family, limit)]
                        for m, c in timm_choice["families"].items()
                    }
                )
        pairs = select(catalogue, families, args.limit)

    if args.resume:
        done = read_rows(results)
        if results.is_file() and not results.read_bytes().endswith(b"\n"):  # a torn last line: start a new one
            with results.open("a") as log:
                log.write("\n")
    else:
        if results.is_file():
            results.replace(results.with_name("results.jsonl.prev"))
        done = {}
    todo = [(f, s) for f, s in pairs if s not in done]
    print(
        f"{len(pairs)} models, {len(pairs) - len(todo)} already in {results}; running {len(todo)} "
        f"({args.jobs} at a time, {threads} thread(s) each, {args.timeout:g} s limit)",
        flush=True,
    )

    start = time.perf_counter()
    with results.open("a") as log, ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(runner.run, f, s) for f, s in todo]
        try:
            for i, future in enumerate(as_completed(futures), 1):
                row = future.result()
                log.write(json.dumps(row) + "\n")
                log.flush()
                done[row["model"]] = row
                detail = f"{row.get('insertions')} insertions" if row["status"] == "ok" else row["reason"][:120]
                print(
                    f"[{i:3d}/{len(todo)}] {row['status']:8s} {row['model']:45s} {row['seconds']:6.1f} s  {detail}",
                    flush=True,
                )
        except KeyboardInterrupt:
            for f in futures:
                f.cancel()
            runner.stop()
            print("\ninterrupted: the finished models are in the results file; --resume goes on", flush=True)
            return 130
    elapsed = time.perf_counter() - start

    rows = [done[s] for _, s in pairs if s in done]
    print_tables(rows, args.only_failures)
    if args.notes:
        print_notes(rows)
    print_summary(rows)
    if todo:
        print(
            f"\nran {len(todo)} models in {elapsed / 60:.1f} min wall "
            f"(sum of per-model times {sum(done[s]['seconds'] for _, s in todo) / 60:.1f} min)"
        )
    if args.markdown:
        Path(args.markdown).write_text(markdown(rows, timm_choice))
        print(f"Markdown summary written to {args.markdown}")
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _interrupted)  # `kill` stops the workers too, as Ctrl-C does
    sys.exit(main())
