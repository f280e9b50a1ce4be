"""How fast and how right is `diskpipe.formats.inspect`, next to OpenStack's
oslo.utils format inspector and `qemu-img info`?

One run inspects the same sample corpus three ways, in turns (diskpipe,
oslo, qemu-img, diskpipe, ...) so a noisy moment on the shared machine hits
all three alike:

1. diskpipe in process: `inspect(path)` (headers and footers only);
2. oslo.utils in process: `format_inspector.detect_file_format(path)`, then
   its `virtual_size`, as Glance and Nova call it;
3. `qemu-img info --output=json PATH`, one subprocess per image, letting
   qemu probe the format as operators do.

A diskpipe pass over the corpus takes a few tens of milliseconds, too short
to time alone on a shared machine: an in-process sample repeats passes for
at least half a second, and the ratio is reported both from the medians and
within each round (two samples taken back to back).

Every answer is then checked against `qemu-img info -f FORMAT` (the format
the manifest says), on every image qemu can open. The run also times one
`diskpipe info FILE` call against a bare interpreter start and lists the
slowest imports, to show where the CLI's start-up time goes, and times
`diskpipe info` on 1,000 files against 1,000 `qemu-img info` calls
(benchmarks.many_files).

    python -m benchmarks.inspect_speed [--corpus DIR] [--repeat N] [--quick] [--throughput-only]
    python -m benchmarks.inspect_speed --startup [--runs N]

Without --corpus the samples are rebuilt into benchmarks/work/inspect-corpus
(a few seconds), so the corpus always matches the current sample recipes.
--startup times only the CLI call against a bare start (one sample built in
benchmarks/work/startup-corpus) and prints it; it writes no results file.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from oslo_utils.imageutils import format_inspector

from benchmarks import many_files
from benchmarks.common import ROOT, WORK, Timing, interleaved, machine, machine_markdown, report_head, write_results
from diskpipe.formats import inspect
from samples.manifest import Sample, load_manifest

DEFAULT_CORPUS = WORK / "inspect-corpus"
STARTUP_CORPUS = WORK / "startup-corpus"
CLI_SAMPLE = "qcow2-v3-c64k"  # a plain qcow2: the common case an operator runs
VENV_BIN = ROOT / ".venv" / "bin"
# The interpreter the CLI's entry point script runs with (its shebang), so the
# bare start-up we compare against is the same binary.
PYTHON = str(VENV_BIN / "python") if (VENV_BIN / "python").exists() else sys.executable
DISKPIPE = str(VENV_BIN / "diskpipe")
# Start-up subprocesses run from here, not from the repository: with the
# repository as working directory `python -c "import diskpipe"` would load the
# source tree while the `diskpipe` command loads the installed copy, and the
# two numbers would not be about the same code.
NEUTRAL_CWD = WORK
QEMU_TIMEOUT = 60  # seconds; a hostile image must not hang the benchmark

# oslo names the *content* it found; qemu names the driver that opens it.
# An ISO or a GPT disk is opened by qemu's raw driver, a VHD by vpc.
OSLO_TO_QEMU = {
    "raw": "raw",
    "qcow2": "qcow2",
    "vhd": "vpc",
    "vhdx": "vhdx",
    "vmdk": "vmdk",
    "vdi": "vdi",
    "qed": "qed",
    "iso": "raw",
    "gpt": "raw",
}

# The project's stated goals (README / issue 13), checked, not assumed.
GOAL_VS_OSLO = 40.0
GOAL_VS_QEMU = 10.0
GOAL_CLI_TO_BARE = 2.0  # one `diskpipe info FILE` against a bare `python -c pass`, same run
GOAL_MANY_VS_QEMU = 20.0  # `diskpipe info` on 1,000 files against 1,000 `qemu-img info` calls

# Modules diskpipe promises to load only on demand: if one shows up in the
# import of the CLI, that is a regression worth flagging.
LAZY_MODULES = ("numpy", "magic", "pycdlib", "zstandard", "tqdm", "celery", "redis", "rados", "rbd")


@dataclass(frozen=True, slots=True)
class Answer:
    """What one tool said about one image: a format and a size, or an error."""

    format: str | None = None
    virtual_size: int | None = None
    error: str | None = None
    raw_name: str | None = None  # the tool's own name, before mapping (oslo)

    def text(self) -> str:
        if self.error is not None:
            return f"error: {self.error}"
        name = self.format if self.raw_name in (None, self.format) else f"{self.format} (oslo: {self.raw_name})"
        return f"{name}, {self.virtual_size}"


# --- the three inspectors -------------------------------------------------


def diskpipe_answer(path: str) -> Answer:
    try:
        info = inspect(path)
    except Exception as error:  # noqa: BLE001 - any failure is an answer ("error"), not a crash of the benchmark
        return Answer(error=f"{type(error).__name__}: {error}"[:200])
    return Answer(info.format, info.virtual_size)


def oslo_answer(path: str) -> Answer:
    try:
        found = format_inspector.detect_file_format(path)
        if found is None:
            return Answer(error="None (no decision)")
        # virtual_size is computed lazily from the captured regions: asking for
        # it is part of the work an operator's code does, so it stays timed.
        return Answer(found.NAME, found.virtual_size, raw_name=found.NAME)
    except Exception as error:  # noqa: BLE001 - ImageFormatError and friends all mean "no usable answer"
        return Answer(error=f"{type(error).__name__}: {error}"[:200])


def qemu_answer(path: str, driver: str | None = None) -> Answer:
    args = ["qemu-img", "info", "--output=json"]
    if driver is not None:
        args += ["-f", driver]
    try:
        done = subprocess.run([*args, path], capture_output=True, text=True, timeout=QEMU_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        return Answer(error=f"timeout after {QEMU_TIMEOUT}s")
    if done.returncode != 0:
        message = done.stderr.strip().splitlines()
        return Answer(error=(message[-1] if message else f"exit {done.returncode}")[:200])
    # Parsing the JSON belongs to the cost: a caller of qemu-img must do it too.
    data = json.loads(done.stdout)
    return Answer(data.get("format"), data.get("virtual-size"))


def oslo_mapped(answer: Answer, path: Path) -> Answer:
    """oslo's answer in qemu's driver names (done outside the timed loop)."""
    if answer.error is not None or answer.format is None:
        return answer
    if answer.format == "luks":
        # oslo matches the LUKS magic alone; qemu's luks driver opens LUKS1
        # only, so a LUKS2 volume called "luks" is a wrong answer.
        with path.open("rb") as handle:
            version = int.from_bytes(handle.read(8)[6:8], "big")
        return Answer("luks" if version == 1 else f"luks{version}", answer.virtual_size, raw_name=answer.format)
    return Answer(OSLO_TO_QEMU.get(answer.format, answer.format), answer.virtual_size, raw_name=answer.format)


# --- corpus ---------------------------------------------------------------


def build_corpus(outdir: Path, only: str | None = None) -> None:
    """Rebuild the samples (or the one named `only`) from scratch: a few
    seconds, and never stale."""
    shutil.rmtree(outdir, ignore_errors=True)
    print(f"building the sample corpus in {outdir} ...", file=sys.stderr)
    selection = ["--only", only] if only else []
    done = subprocess.run(
        [PYTHON, "-m", "samples", str(outdir), *selection], cwd=ROOT, capture_output=True, text=True, check=False
    )
    if not (outdir / "manifest.json").exists():
        raise SystemExit(f"building the samples failed:\n{done.stderr[-3000:]}")
    if done.returncode != 0:
        # Some recipes failed (a missing tool?): benchmark what was built, but say so.
        print(done.stderr[-3000:], file=sys.stderr)


def quick_subset(samples: list[Sample], stride: int = 3) -> list[Sample]:
    """Every third sample, plus the first of any (format, group) pair the
    stride missed: fewer images, but every inspector, the fixed VHDs that
    qemu's probe gets wrong, and the hostile cases are still touched."""
    chosen = samples[::stride]
    seen = {(sample.format, sample.group) for sample in chosen}
    for sample in samples:
        if (sample.format, sample.group) not in seen:
            seen.add((sample.format, sample.group))
            chosen.append(sample)
    return chosen


# --- throughput -----------------------------------------------------------

# One timed sample of an in-process tool repeats whole-corpus passes until it
# lasts at least this long: a single diskpipe pass takes ~20 ms, and at that
# scale one scheduler hiccup on the shared machine moves a sample by tens of
# percent.
MIN_SAMPLE_SECONDS = 0.5
QUICK_MIN_SAMPLE_SECONDS = 0.2


@dataclass(frozen=True, slots=True)
class Sampled:
    """Timed samples of one tool: seconds per corpus pass, wall clock and the
    process's CPU time (None for qemu-img, whose work is in children)."""

    passes: int  # corpus passes in one sample
    wall: Timing
    cpu: Timing | None


def passes_per_sample(run: Callable[[], None], min_seconds: float) -> int:
    """How many corpus passes make one sample last `min_seconds`, judged by
    the fastest of three passes (the slower ones are the machine's noise)."""
    fastest = min(_seconds(run) for _ in range(3))
    return max(1, math.ceil(min_seconds / max(fastest, 1e-6)))


def _seconds(run: Callable[[], None]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def throughput(paths: list[str], rounds: int, min_seconds: float) -> tuple[dict[str, Sampled], dict[str, list[Answer]]]:
    """Time the three tools in rounds (diskpipe, oslo, qemu-img, diskpipe,
    ...) so a noisy moment on the shared machine hits all of them alike; keep
    the answers of the last pass so accuracy is judged on exactly what was
    timed. Every tool reads the same files, from the page cache."""
    last: dict[str, list[Answer]] = {}

    def corpus_pass(name: str, answer: Callable[[str], Answer]) -> Callable[[], None]:
        def run() -> None:
            last[name] = [answer(path) for path in paths]

        return run

    passes = {
        "diskpipe": corpus_pass("diskpipe", diskpipe_answer),
        "oslo": corpus_pass("oslo", oslo_answer),
        "qemu-img": corpus_pass("qemu-img", qemu_answer),
    }
    # One untimed round first: fills the page cache (all tools then read from
    # memory alike), writes .pyc files and lets oslo/diskpipe load lazy parts.
    for run in passes.values():
        run()
    # A qemu-img pass is one process per image, seconds long: one per sample.
    count = {name: 1 if name == "qemu-img" else passes_per_sample(run, min_seconds) for name, run in passes.items()}
    wall: dict[str, list[float]] = {name: [] for name in passes}
    cpu: dict[str, list[float]] = {name: [] for name in passes}
    for _ in range(rounds):
        for name, run in passes.items():
            started_cpu, started = time.process_time(), time.perf_counter()
            for _ in range(count[name]):
                run()
            wall[name].append((time.perf_counter() - started) / count[name])
            cpu[name].append((time.process_time() - started_cpu) / count[name])
    return {
        name: Sampled(count[name], Timing(tuple(wall[name])), None if name == "qemu-img" else Timing(tuple(cpu[name])))
        for name in passes
    }, last


def rate(count: int, timing: Timing) -> dict[str, float]:
    low, high = timing.spread
    return {
        "images_per_s": count / timing.median,
        "images_per_s_min": count / high,  # the slowest sample gives the lowest rate
        "images_per_s_max": count / low,
        "ms_per_image": 1000 * timing.median / count,
    }


def paired_ratios(faster: Timing, slower: Timing) -> dict[str, float]:
    """The speed ratio within each round (the two samples taken back to back),
    as a median and a range: a drift in the machine's load over the run moves
    both samples of a round alike, the ratio of the overall medians less so."""
    ratios = sorted(slow / fast for fast, slow in zip(faster.samples, slower.samples, strict=True))
    return {"median": statistics.median(ratios), "min": ratios[0], "max": ratios[-1]}


# --- accuracy -------------------------------------------------------------


def judge(expected: Answer, got: Answer) -> dict[str, bool]:
    format_ok = got.error is None and got.format == expected.format
    size_ok = got.error is None and got.virtual_size == expected.virtual_size
    return {"format": format_ok, "size": size_ok, "both": format_ok and size_ok}


def accuracy(
    samples: list[Sample], corpus: Path, answers: dict[str, list[Answer]]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Check every tool against `qemu-img info -f FORMAT` on the images qemu opens."""
    tools: dict[str, dict[str, Any]] = {
        name: {"checked": 0, "format": 0, "size": 0, "both": 0, "wrong": []} for name in answers
    }
    oracle_trouble: list[dict[str, Any]] = []
    for index, sample in enumerate(samples):
        if not sample.qemu_oracle:
            continue
        oracle = qemu_answer(str(sample.path(corpus)), sample.format)
        if oracle.error is not None:
            # The manifest promised qemu opens it: a broken oracle is reported,
            # and the image is left out rather than counted against anyone.
            oracle_trouble.append({"name": sample.name, "problem": oracle.error})
            continue
        if (oracle.format, oracle.virtual_size) != (sample.format, sample.virtual_size):
            oracle_trouble.append(
                {
                    "name": sample.name,
                    "problem": f"manifest says {sample.format}, {sample.virtual_size}; qemu says {oracle.text()}",
                }
            )
        for name, answered in answers.items():
            got = answered[index]
            verdict = judge(oracle, got)
            record = tools[name]
            record["checked"] += 1
            for key, ok in verdict.items():
                record[key] += ok
            if not verdict["both"]:
                record["wrong"].append({"name": sample.name, "expected": oracle.text(), "got": got.text()})
    return tools, oracle_trouble


# --- CLI start-up and imports --------------------------------------------


def pick_cli_sample(samples: list[Sample]) -> Sample:
    qcow2 = [s for s in samples if s.format == "qcow2" and s.group == "honest"]
    return next((s for s in qcow2 if s.name == CLI_SAMPLE), qcow2[0])


def cli_timings(sample_path: str, repeat: int) -> tuple[dict[str, Timing], dict[str, Timing]]:
    """Wall time of one `diskpipe info` call, next to a bare interpreter and
    to the imports alone: the gaps split start-up, import and work. Also
    each child's CPU time (user + system), which other load on a shared
    machine disturbs less than the wall clock."""
    checked = subprocess.run(
        [DISKPIPE, "info", sample_path], capture_output=True, text=True, check=False, cwd=NEUTRAL_CWD
    )
    if checked.returncode != 0:
        raise SystemExit(f"`diskpipe info {sample_path}` failed:\n{checked.stderr}")
    cpu: dict[str, list[float]] = {}

    def call(name: str, args: list[str]) -> Callable[[], object]:
        def run() -> None:
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            subprocess.run(args, capture_output=True, check=True, cwd=NEUTRAL_CWD)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu.setdefault(name, []).append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)

        return run

    command_lines = {
        "diskpipe info": [DISKPIPE, "info", sample_path],
        "python -c pass": [PYTHON, "-c", "pass"],
        "python -c 'import diskpipe.cli, diskpipe.formats'": [PYTHON, "-c", "import diskpipe.cli, diskpipe.formats"],
        # The library part of the call: inspect and judge one file, no command line.
        "python -c 'inspect_many([FILE])'": [
            PYTHON,
            "-c",
            f"from diskpipe.formats.batch import inspect_many; inspect_many([{sample_path!r}])",
        ],
    }
    commands = {name: call(name, args) for name, args in command_lines.items()}
    for run in commands.values():  # warm-up: .pyc files, page cache
        run()
    cpu.clear()
    wall = interleaved(commands, repeat)
    return wall, {name: Timing(tuple(samples)) for name, samples in cpu.items()}


def cli_section(sample: Sample, corpus: Path, repeat: int) -> dict[str, Any]:
    """The CLI call's timings and ratios, as the report's "cli" entry."""
    wall, cpu = cli_timings(str(sample.path(corpus)), repeat)
    info_s, bare_s = wall["diskpipe info"].median, wall["python -c pass"].median
    imports_s = wall["python -c 'import diskpipe.cli, diskpipe.formats'"].median
    return {
        "sample": sample.name,
        "installed": installed_diskpipe(),
        "repeat": repeat,
        "timings": {name: timing.to_json() for name, timing in wall.items()},
        "cpu_timings": {name: timing.to_json() for name, timing in cpu.items()},
        "ratio_to_bare": info_s / bare_s,
        "cpu_ratio_to_bare": cpu["diskpipe info"].median / cpu["python -c pass"].median,
        "over_bare_ms": (info_s - bare_s) * 1000,
        "imports_over_bare_ms": (imports_s - bare_s) * 1000,
        "work_ms": (info_s - imports_s) * 1000,
    }


def cli_goal(cli: dict[str, Any]) -> dict[str, Any]:
    info_ms = cli["timings"]["diskpipe info"]["median"] * 1000
    bare_ms = cli["timings"]["python -c pass"]["median"] * 1000
    return {
        "goal": f"one `diskpipe info` call ≤ {GOAL_CLI_TO_BARE:.1f}× a bare `python -c pass`",
        "measured": f"{cli['ratio_to_bare']:.2f}× ({info_ms:.1f} ms vs {bare_ms:.1f} ms; "
        f"CPU time {cli['cpu_ratio_to_bare']:.2f}×)",
        "met": cli["ratio_to_bare"] <= GOAL_CLI_TO_BARE,
    }


def import_times(args: list[str], runs: int) -> dict[str, dict[str, Any]]:
    """`-X importtime` per module, the median over several runs (one run is
    noisy at the 100 µs scale). Keys are module names; each is imported once
    per process, so the name identifies the line. `args` follow
    `python -X importtime`."""
    collected: dict[str, dict[str, Any]] = {}
    for _ in range(runs + 1):
        stderr = subprocess.run(
            [PYTHON, "-X", "importtime", *args], capture_output=True, text=True, check=True, cwd=NEUTRAL_CWD
        ).stderr
        for line in stderr.splitlines():
            if not line.startswith("import time:"):
                continue
            fields = line.removeprefix("import time:").split("|")
            if len(fields) != 3 or not fields[0].strip().isdigit():
                continue  # the header line
            label = fields[2].rstrip()
            name = label.strip()
            entry = collected.setdefault(
                name, {"depth": (len(label) - len(label.lstrip()) - 1) // 2, "self": [], "cumulative": []}
            )
            entry["self"].append(int(fields[0]))
            entry["cumulative"].append(int(fields[1]))
    # The first run may compile .pyc files: drop it.
    return {
        name: {
            "depth": entry["depth"],
            "self_us": statistics.median(entry["self"][1:] or entry["self"]),
            "cumulative_us": statistics.median(entry["cumulative"][1:] or entry["cumulative"]),
        }
        for name, entry in collected.items()
    }


def installed_diskpipe() -> dict[str, Any]:
    """Which diskpipe the command runs, and whether it is the code measured
    in process (a regular install is a copy that can lag behind the tree)."""
    import diskpipe

    here = Path(diskpipe.__file__).resolve().parent
    printed = subprocess.run(
        [PYTHON, "-c", "import diskpipe; print(diskpipe.__file__)"],
        capture_output=True,
        text=True,
        check=True,
        cwd=NEUTRAL_CWD,
    ).stdout.strip()
    there = Path(printed).resolve().parent
    if there == here:
        return {"path": str(there), "same_as_measured": True, "stale_files": []}
    mine = {path.relative_to(here): path.read_bytes() for path in here.rglob("*.py")}
    theirs = {path.relative_to(there): path.read_bytes() for path in there.rglob("*.py")}
    stale = sorted(str(name) for name in mine.keys() | theirs.keys() if mine.get(name) != theirs.get(name))
    return {"path": str(there), "same_as_measured": not stale, "stale_files": stale}


# --- report ---------------------------------------------------------------


def cli_markdown(cli: dict[str, Any]) -> list[str]:
    installed = cli["installed"]
    loaded = (
        "the same code as measured in process"
        if installed["same_as_measured"]
        else "**a copy that differs from the source tree measured in process** ("
        + ", ".join(installed["stale_files"][:8])
        + ")"
    )
    lines = [
        "",
        f"## One CLI call ({cli['repeat']} interleaved runs, sample `{cli['sample']}`)",
        "",
        f"The command loads diskpipe from `{installed['path']}`: {loaded}.",
        "",
        "| command | median | min–max | CPU time (median) |",
        "|---|---:|---:|---:|",
    ]
    for name, timing in cli["timings"].items():
        cpu = cli.get("cpu_timings", {}).get(name)
        cpu_text = f"{cpu['median'] * 1000:.1f} ms" if cpu else "?"
        lines.append(
            f"| `{name}` | {timing['median'] * 1000:.1f} ms | {timing['min'] * 1000:.1f}–{timing['max'] * 1000:.1f} ms "
            f"| {cpu_text} |"
        )
    lines += [
        "",
        f"`diskpipe info` / bare `python -c pass` = **{cli['ratio_to_bare']:.2f}×** "
        f"(CPU time: {cli.get('cpu_ratio_to_bare', float('nan')):.2f}×); "
        f"above a bare start: {cli['over_bare_ms']:.1f} ms, of which imports {cli['imports_over_bare_ms']:.1f} ms "
        f"and the rest {cli['work_ms']:.1f} ms (the command's own further imports, then "
        "argument parsing, policy, inspection, printing).",
    ]
    return lines


def inspection_markdown(data: dict[str, Any]) -> list[str]:
    """The throughput and accuracy sections (all of a --throughput-only run)."""
    lines = [
        *report_head("inspect speed: diskpipe vs oslo.utils vs qemu-img info", data["machine"]),
        f"Corpus: {data['corpus']['images']} images ({data['corpus']['honest']} honest, "
        f"{data['corpus']['hostile']} hostile) in `{data['corpus']['path']}`"
        f"{' — quick subset' if data['quick'] else ''}. Every tool reads the same files from the page cache "
        f"(one untimed warm-up pass each). {data['repeat']} rounds, each one timed sample per tool in turn; "
        f"an in-process sample repeats whole-corpus passes for at least {data['min_sample_seconds']} s, "
        "a qemu-img sample is one pass. oslo.utils is called as Glance and Nova call it: "
        "`detect_file_format(path)`, then `virtual_size` (its `safety_check()` is the counterpart of "
        "diskpipe's policy, which `inspect()` does not run either)."
        + (" **diskpipe/ had uncommitted changes** during this run." if data["diskpipe_dirty"] else ""),
        "",
        "## Throughput",
        "",
        "| tool | images/s (median) | min–max | ms/image | CPU-time images/s | passes per sample | per-pass time |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    labels = {
        "diskpipe": "diskpipe `inspect()` in process",
        "oslo": "oslo.utils `detect_file_format()` in process",
        "qemu-img": "`qemu-img info --output=json` subprocess",
    }
    for name, speed in data["speed"].items():
        cpu = f"{speed['cpu_images_per_s']:.0f}" if speed.get("cpu_images_per_s") else "–"
        lines.append(
            f"| {labels[name]} | {speed['images_per_s']:.0f} | {speed['images_per_s_min']:.0f}–"
            f"{speed['images_per_s_max']:.0f} | {speed['ms_per_image']:.2f} | {cpu} | {speed['passes_per_sample']} | "
            f"{Timing(tuple(speed['timing']['samples'])).text()} |"
        )
    ratios, paired = data["ratios"], data["paired_ratios"]["diskpipe/oslo"]
    lines += [
        "",
        f"diskpipe / oslo = **{ratios['diskpipe/oslo']:.1f}×** (images/s medians; within each round "
        f"{paired['median']:.1f}×, {paired['min']:.1f}–{paired['max']:.1f}; in CPU time "
        f"{ratios['diskpipe/oslo cpu']:.1f}×); diskpipe / qemu-img = **{ratios['diskpipe/qemu-img']:.1f}×**.",
        "",
        f"## Accuracy against `qemu-img info -f FORMAT` ({data['accuracy']['images']} images qemu opens)",
        "",
        "| tool | format right | virtual size right | both right | wrong |",
        "|---|---:|---:|---:|---:|",
    ]
    tools = data["accuracy"]["tools"]
    tool_labels = {"diskpipe": "diskpipe", "oslo": "oslo.utils", "qemu-img": "qemu-img info (probing, no -f)"}
    for name, record in tools.items():
        n = record["checked"]
        lines.append(
            f"| {tool_labels[name]} | {record['format']}/{n} | {record['size']}/{n} | {record['both']}/{n} | "
            f"{len(record['wrong'])} |"
        )
    for name, record in tools.items():
        lines += ["", f"### Wrong answers: {tool_labels[name]}", ""]
        if not record["wrong"]:
            lines.append("none")
            continue
        lines += ["| image | expected (qemu -f) | got |", "|---|---|---|"]
        lines += [f"| {w['name']} | {w['expected']} | {w['got']} |" for w in record["wrong"]]
    if data["accuracy"]["oracle_trouble"]:
        lines += ["", "### Oracle notes (manifest vs `qemu-img info -f`)", ""]
        lines += [f"- {item['name']}: {item['problem']}" for item in data["accuracy"]["oracle_trouble"]]
    return lines


def markdown_report(data: dict[str, Any]) -> str:
    lines = inspection_markdown(data)
    lines += cli_markdown(data["cli"])
    lines += [
        "",
        '## Import time (`python -X importtime -c "import diskpipe.cli; import diskpipe.formats"`, '
        f"median of {data['imports']['runs']} runs)",
        "",
        f"Modules not loaded by a bare interpreter: {data['imports']['extra_modules']}, "
        f"{data['imports']['extra_self_ms']:.1f} ms of self time in all. "
        f"Lazy-by-design modules loaded: {', '.join(data['imports']['lazy_loaded']) or 'none'}.",
        "",
        "10 slowest by cumulative time (an entry includes the modules it imports):",
        "",
        "| module | depth | cumulative | self |",
        "|---|---:|---:|---:|",
    ]
    for entry in data["imports"]["top_cumulative"]:
        lines.append(
            f"| `{entry['module']}` | {entry['depth']} | {entry['cumulative_us'] / 1000:.1f} ms | "
            f"{entry['self_us'] / 1000:.1f} ms |"
        )
    startup = ", ".join(f"`{name}` {ms:.1f} ms" for name, ms in data["imports"]["bare_startup_ms"].items())
    lines += [
        "",
        f"Paid by every interpreter start, bare `python -c pass` included: {startup or '?'} (cumulative).",
        "",
        f"The real `diskpipe info FILE` call imports {data['imports']['real_call_extra_modules']} more modules "
        f"({data['imports']['real_call_extra_self_ms']:.1f} ms self time): "
        + (
            ", ".join(f"`{e['module']}` {e['self_us'] / 1000:.1f} ms" for e in data["imports"]["real_call_extra_top"])
            or "none"
        )
        + ".",
    ]
    lines += ["", "10 slowest by self time (where to cut):", "", "| module | self | cumulative |", "|---|---:|---:|"]
    for entry in data["imports"]["top_self"]:
        lines.append(
            f"| `{entry['module']}` | {entry['self_us'] / 1000:.1f} ms | {entry['cumulative_us'] / 1000:.1f} ms |"
        )
    if "many_files" in data:
        lines += ["", *many_files.render(data["many_files"])]
    lines += ["", "## Goals", "", "| goal | measured | met |", "|---|---|---|"]
    for goal in data["goals"]:
        lines.append(f"| {goal['goal']} | {goal['measured']} | {'yes' if goal['met'] else '**no**'} |")
    return "\n".join(lines) + "\n"


def startup_only(corpus: Path | None, repeat: int) -> int:
    """The "One CLI call" section alone, for work on the start-up: seconds
    instead of minutes, and benchmarks/results stays as the full run left it."""
    if corpus is None:
        corpus = STARTUP_CORPUS
        build_corpus(corpus, only=CLI_SAMPLE)
    print(f"timing the CLI ({repeat} runs) ...", file=sys.stderr)
    cli = cli_section(pick_cli_sample(load_manifest(corpus)), corpus, repeat)
    print(machine_markdown(machine()))
    print("\n".join(cli_markdown(cli)))
    goal = cli_goal(cli)
    print(f"\nGoal: {goal['goal']}: {goal['measured']}, {'met' if goal['met'] else '**not met**'}.")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.inspect_speed", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--corpus", type=Path, help="a built sample directory (default: rebuild one in benchmarks/work)"
    )
    parser.add_argument("--repeat", type=int, help="timed samples per tool (default 7, --quick 3)")
    parser.add_argument("--quick", action="store_true", help="3 shorter samples over a subset, fewer CLI runs")
    parser.add_argument(
        "--throughput-only",
        action="store_true",
        help="time and check the in-process inspection alone; print the report, write no result files",
    )
    parser.add_argument(
        "--startup",
        action="store_true",
        help="only the CLI call against a bare start: one sample, printed, no results file written",
    )
    parser.add_argument("--runs", type=int, help="interleaved runs of each CLI command (default 30, --quick 10)")
    args = parser.parse_args(argv)
    if args.corpus is not None:  # the CLI runs from NEUTRAL_CWD: a relative path would miss
        args.corpus = args.corpus.resolve()
    cli_repeat = args.runs or (10 if args.quick else 30)
    if cli_repeat < 1:
        parser.error("--runs must be at least 1")
    if args.startup:
        return startup_only(args.corpus, cli_repeat)
    started = time.monotonic()
    # oslo logs a warning per unsupported VMDK subformat; with no handler
    # Python prints it to stderr. A NullHandler keeps the cost of the logging
    # call (oslo pays it in production too) but not the noise.
    logging.getLogger("oslo_utils").addHandler(logging.NullHandler())
    repeat = args.repeat or (3 if args.quick else 7)
    min_sample = QUICK_MIN_SAMPLE_SECONDS if args.quick else MIN_SAMPLE_SECONDS
    if repeat < 1:
        parser.error("--repeat must be at least 1")
    many_repeat = 1 if args.quick else 3
    import_runs = 3 if args.quick else 7

    corpus: Path = args.corpus or DEFAULT_CORPUS
    if args.corpus is None:
        build_corpus(corpus)
    all_samples = load_manifest(corpus)
    samples = quick_subset(all_samples) if args.quick else all_samples
    paths = [str(sample.path(corpus)) for sample in samples]

    print(f"timing {len(paths)} images × 3 tools × {repeat} samples of ≥ {min_sample} s ...", file=sys.stderr)
    sampled, answers = throughput(paths, repeat, min_sample)
    answers["oslo"] = [oslo_mapped(a, Path(p)) for a, p in zip(answers["oslo"], paths, strict=True)]
    rates = {name: rate(len(paths), result.wall) for name, result in sampled.items()}
    speed = {
        name: {
            **rates[name],
            "passes_per_sample": result.passes,
            "timing": result.wall.to_json(),
            "cpu_images_per_s": len(paths) / result.cpu.median if result.cpu else None,
            "cpu_timing": result.cpu.to_json() if result.cpu else None,
        }
        for name, result in sampled.items()
    }
    ratios = {
        "diskpipe/oslo": rates["diskpipe"]["images_per_s"] / rates["oslo"]["images_per_s"],
        "diskpipe/oslo cpu": speed["diskpipe"]["cpu_images_per_s"] / speed["oslo"]["cpu_images_per_s"],
        "diskpipe/qemu-img": rates["diskpipe"]["images_per_s"] / rates["qemu-img"]["images_per_s"],
    }
    paired = {
        "diskpipe/oslo": paired_ratios(sampled["diskpipe"].wall, sampled["oslo"].wall),
        "diskpipe/qemu-img": paired_ratios(sampled["diskpipe"].wall, sampled["qemu-img"].wall),
    }

    print("checking against qemu-img info -f ...", file=sys.stderr)
    tools, oracle_trouble = accuracy(samples, corpus, answers)
    checked = tools["diskpipe"]["checked"]
    inspection: dict[str, Any] = {
        "machine": machine(),
        # Others edit diskpipe while benchmarks run: the commit alone may not
        # say which code was measured.
        "diskpipe_dirty": bool(
            subprocess.run(
                ["git", "status", "--porcelain", "diskpipe"], cwd=ROOT, capture_output=True, text=True, check=False
            ).stdout.strip()
        ),
        "quick": args.quick,
        "repeat": repeat,
        "min_sample_seconds": min_sample,
        "corpus": {
            "path": str(corpus),
            "images": len(samples),
            "honest": sum(s.group == "honest" for s in samples),
            "hostile": sum(s.group != "honest" for s in samples),
            "total_bytes": sum(Path(p).stat().st_size for p in paths),
        },
        "speed": speed,
        "ratios": ratios,
        "paired_ratios": paired,
        "accuracy": {"images": checked, "tools": tools, "oracle_trouble": oracle_trouble},
        "answers": [
            {"name": s.name, "format": s.format, "virtual_size": s.virtual_size, "qemu_oracle": s.qemu_oracle}
            | {tool: asdict(answers[tool][i]) for tool in answers}
            for i, s in enumerate(samples)
        ],
    }
    if args.throughput_only:
        print("\n".join(inspection_markdown(inspection)))
        print(f"({time.monotonic() - started:.0f} s in all; no result files written)", file=sys.stderr)
        return 0

    cli_sample = pick_cli_sample(all_samples)
    print(f"timing the CLI ({cli_repeat} runs) and imports ...", file=sys.stderr)
    cli = cli_section(cli_sample, corpus, cli_repeat)

    print(f"timing {many_files.FILES} files in one call ({many_repeat} runs) ...", file=sys.stderr)
    many = many_files.measure([str(s.path(corpus)) for s in all_samples], PYTHON, DISKPIPE, NEUTRAL_CWD, many_repeat)

    modules = import_times(["-c", "import diskpipe.cli; import diskpipe.formats"], import_runs)
    bare_modules = import_times(["-c", "pass"], import_runs)
    # The real call imports more than the two packages (the policy, the
    # commands' own modules): list what it adds, to explain the time after
    # the imports.
    real_call = import_times([DISKPIPE, "info", str(cli_sample.path(corpus))], import_runs)
    cli_only = sorted(
        ({"module": name, **entry} for name, entry in real_call.items() if name not in modules),
        key=lambda e: e["self_us"],
        reverse=True,
    )
    # `site` runs in every start, bare or not; in an editable install it
    # imports the editable finder (and pathlib with it) each time.
    startup = {name: bare_modules[name]["cumulative_us"] / 1000 for name in ("site",) if name in bare_modules}
    startup |= {
        name: entry["cumulative_us"] / 1000 for name, entry in bare_modules.items() if name.startswith("__editable__")
    }
    extra = {name: entry for name, entry in modules.items() if name not in bare_modules}
    ranked = [{"module": name, **entry} for name, entry in modules.items()]
    top_cumulative = sorted(ranked, key=lambda e: e["cumulative_us"], reverse=True)[:10]
    top_self = sorted(ranked, key=lambda e: e["self_us"], reverse=True)[:10]
    lazy_loaded = sorted({name for name in modules if name.split(".")[0] in LAZY_MODULES})

    diskpipe_wrong = len(tools["diskpipe"]["wrong"])
    goals = [
        {
            "goal": f"in process ≥ {GOAL_VS_OSLO:.0f}× oslo.utils",
            "measured": f"{ratios['diskpipe/oslo']:.1f}× ({speed['diskpipe']['images_per_s']:.0f} vs "
            f"{speed['oslo']['images_per_s']:.0f} images/s; per round {paired['diskpipe/oslo']['min']:.1f}–"
            f"{paired['diskpipe/oslo']['max']:.1f}×)",
            "met": ratios["diskpipe/oslo"] >= GOAL_VS_OSLO,
        },
        {
            "goal": f"in process ≥ {GOAL_VS_QEMU:.0f}× `qemu-img info` per image",
            "measured": f"{ratios['diskpipe/qemu-img']:.1f}× ({speed['qemu-img']['images_per_s']:.0f} images/s for qemu-img)",
            "met": ratios["diskpipe/qemu-img"] >= GOAL_VS_QEMU,
        },
        cli_goal(cli),
        {
            "goal": f"`diskpipe info` on {many['files']} files ≥ {GOAL_MANY_VS_QEMU:.0f}× faster than "
            f"{many['files']} `qemu-img info` calls",
            "measured": f"{many['speedup_cli']:.1f}× (`inspect_many` alone: {many['speedup_inspect_many']:.1f}×)",
            "met": many["speedup_cli"] >= GOAL_MANY_VS_QEMU,
        },
        {
            "goal": "same format and virtual size as `qemu-img info -f` on every image",
            "measured": f"{checked - diskpipe_wrong}/{checked} right "
            f"(oslo {tools['oslo']['both']}/{checked}, probing qemu-img {tools['qemu-img']['both']}/{checked})",
            "met": diskpipe_wrong == 0 and checked > 0,
        },
    ]

    data: dict[str, Any] = {
        **inspection,
        "cli": cli,
        "imports": {
            "runs": import_runs,
            "extra_modules": len(extra),
            "extra_self_ms": sum(entry["self_us"] for entry in extra.values()) / 1000,
            "lazy_loaded": lazy_loaded,
            "top_cumulative": top_cumulative,
            "top_self": top_self,
            "bare_startup_ms": startup,
            "real_call_extra_modules": len(cli_only),
            "real_call_extra_self_ms": sum(e["self_us"] for e in cli_only) / 1000,
            "real_call_extra_top": cli_only[:8],
            "all": modules,
        },
        "many_files": many,
        "goals": goals,
    }
    markdown = markdown_report(data)
    print(markdown)
    path = write_results("inspect_speed", markdown, data)
    print(
        f"written: {path} and {path.with_suffix('.json')} ({time.monotonic() - started:.0f} s in all)", file=sys.stderr
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
