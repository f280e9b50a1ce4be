"""Run every benchmark, one after the other, and publish the results.

    python -m benchmarks.run_all [--quick] [--only NAME ...] [--no-readme]

Each benchmark runs in its own interpreter (a crash or a leaked cluster of
one cannot skew the next) and writes benchmarks/results/NAME.{md,json}
(space also .csv and .png). Then this script writes
benchmarks/results/summary.{md,png} — the headline numbers of all five,
with the machine, versions and date — and puts the summary table and the
charts into README.md between the `benchmarks:start`/`benchmarks:end`
markers. Nothing else runs meanwhile: the timings are only as good as the
machine is idle.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, ROOT, machine, ratio_of, report_head, table_rows, timing_cell, timing_of

BENCHMARKS = ("inspect_speed", "convert_speed", "pipeline_overhead", "space", "scale_out", "glance_import")
README = ROOT / "README.md"
START_MARK = "<!-- benchmarks:start -->"
END_MARK = "<!-- benchmarks:end -->"
GIB = 1 << 30
# Links are written against this placeholder, then made relative to where
# the text lands (results/summary.md or the README at the top).
HERE = "@results@/"


def run(name: str, quick: bool) -> dict[str, Any]:
    command = [sys.executable, "-m", f"benchmarks.{name}"]
    if quick and name != "space":  # space has no quick mode: one guest disk is its whole job
        command.append("--quick")
    print(f"== {' '.join(command[1:])}", file=sys.stderr, flush=True)
    started = time.monotonic()
    completed = subprocess.run(command, cwd=ROOT, stdout=subprocess.DEVNULL, check=False)
    elapsed = time.monotonic() - started
    print(f"== {name}: exit {completed.returncode} after {elapsed:.0f} s", file=sys.stderr, flush=True)
    return {"exit": completed.returncode, "seconds": elapsed}


def load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def human(size: float) -> str:
    return f"{size / GIB:.2f} GiB" if size >= GIB else f"{size / (1 << 20):.1f} MiB"


def inspect_lines(data: dict[str, Any]) -> list[str]:
    speed, accuracy = data["speed"], data["accuracy"]
    tools = accuracy["tools"]
    total = accuracy["images"]
    cli = data["cli"]
    info = cli["timings"]["diskpipe info"]["median"] * 1000
    bare = cli["timings"]["python -c pass"]["median"] * 1000
    return [
        f"**Inspection** ({len(data['answers'])} images, {data['repeat']} timed samples per tool; [details]({HERE}inspect_speed.md))",
        "",
        "| tool | images/s | vs diskpipe | format and size right (of those qemu-img opens) |",
        "|---|--:|--:|--:|",
        *(
            f"| {label} | {speed[key]['images_per_s']:.0f} | "
            f"{speed['diskpipe']['images_per_s'] / speed[key]['images_per_s']:.1f}× slower | "
            f"{tools[key]['both']}/{total} |"
            if key != "diskpipe"
            else f"| {label} | {speed[key]['images_per_s']:.0f} | – | {tools[key]['both']}/{total} |"
            for key, label in (
                ("diskpipe", "diskpipe `inspect()`"),
                ("oslo", "oslo.utils format_inspector"),
                ("qemu-img", "`qemu-img info` (probing)"),
            )
        ),
        "",
        f"One `diskpipe info` call: {info:.0f} ms wall, **{info / bare:.1f}×** a bare `python -c pass` "
        f"({bare:.0f} ms) in the same run."
        + (
            f" `diskpipe info` on {data['many_files']['files']} files in one call: "
            f"**{data['many_files']['speedup_cli']:.1f}×** faster than {data['many_files']['files']} `qemu-img info` "
            f"calls (the library's `inspect_many` alone: {data['many_files']['speedup_inspect_many']:.1f}×)."
            if "many_files" in data
            else ""
        ),
        "",
    ]


def convert_lines(data: dict[str, Any]) -> list[str]:
    lines = [
        f"**Conversion into RBD** (4 GiB Debian guest, {data['repeat']} interleaved runs, "
        f"{data.get('fast_repeat', data['repeat'])} of the sub-second ones; [details]({HERE}convert_speed.md))",
        "",
        "| source | diskpipe, Glance hashes | Glance's way | ratio | diskpipe, `--no-hashes` | plain qemu-img | ratio "
        "| qemu-img + Glance's snapshot | no-hashes / that | ratio with the sparse digest |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    cells = [
        timing_of("diskpipe"),
        timing_of("glance"),
        ratio_of("ratio_diskpipe_to_glance"),
        timing_of("diskpipe-no-full-hashes", "fast_timings"),
        timing_of("qemu-img", "fast_timings"),
        ratio_of("ratio_no_hashes_to_qemu_img"),
        timing_of("qemu-img+snapshot", "fast_timings"),
        ratio_of("ratio_no_hashes_to_clonable", bold=False),
        ratio_of("ratio_sparse_digest_to_qemu_img", bold=False),
    ]
    lines += [*table_rows(data["sources"], cells), ""]
    return lines


def huge_lines(huge: dict[str, Any], details: str) -> list[str]:
    timings = huge["timings"]
    hashed = timings.get("1 TiB, diskpipe Glance hashes")
    return [
        "**A 1 TiB virtual qcow2 holding 1 GiB** into RBD: with `--no-hashes` "
        f"{timing_cell(timings['1 TiB, diskpipe --no-hashes'])}, **{huge['ratio_1t_to_1g_no_hashes']:.2f}×** the same "
        f"1 GiB in a 1 GiB image ({timing_cell(timings['1 GiB, diskpipe --no-hashes'])}); with Glance's md5 + sha512 "
        + (f"{hashed['median'] / 60:.0f} min" if hashed else "not run")
        + f" (zeros hash at {huge['zero_hash_rate']['gib_per_s']:.2f} GiB/s: about "
        f"{huge['projected_1t_hash_seconds'] / 60:.0f} min per TiB). Use `--no-hashes` (and `--sparse-hash`) for such "
        f"images ([details]({HERE}{details})).",
        "",
    ]


def pipeline_lines(data: dict[str, Any]) -> list[str]:
    big = data["big"]
    outside = data.get("overhead_outside_conversion")
    return [
        f"**Celery pipeline** ([details]({HERE}pipeline_overhead.md)): a 4 GiB qcow2 with 1.2 GiB of "
        f"data takes {timing_cell(big['direct'])} converted directly and {timing_cell(big['celery job'])} as a Celery job"
        + (
            f"; the job adds **{outside * 100:+.2f} %** outside the conversion itself (queue, records, lease, verify; "
            f"the medians differ by {data['overhead'] * 100:+.1f} %, within the hashing's run-to-run spread)"
            if outside is not None
            else f" (overhead **{data['overhead'] * 100:+.1f} %**)"
        )
        + ".",
        "",
    ]


def scale_out_lines(data: dict[str, Any]) -> list[str]:
    """The one place the summary gives small jobs per minute by workers (issue 13's goal row)."""
    from benchmarks.scale_out import GOAL_SCALING, scaling

    runs = data["runs"]
    small = ", ".join(f"{count}: {run['small']['jobs_per_minute']:.0f}" for count, run in runs.items())
    large = ", ".join(f"{count}: {run['large']['jobs_per_minute']:.1f}" for count, run in runs.items())
    delay = ", ".join(f"{count}: {run['small']['queueing_delay']['median']:.1f} s" for count, run in runs.items())
    ratio, wide = scaling(data), scaling(data, "small-256m")
    ratio_cell = f"**{ratio:.2f}×**" if ratio is not None else "not measured"
    wide_note = f" (on a 256 MiB disk, four times the bytes to hash: {wide:.2f}×)" if wide is not None else ""
    return [
        f"**Scale-out over worker hosts** (network namespaces on one {data['machine']['cores']}-core machine, one "
        f"worker process each, Glance's hashes on; [details]({HERE}scale_out.md)): small jobs (64 MiB qcow2, "
        f"8 MiB of data) per minute, 2 hosts against 1: {ratio_cell} (goal ≥ {GOAL_SCALING}×){wide_note}. "
        f"Jobs per minute by hosts — small {small}; 1 GiB {large}; median queueing delay of small jobs {delay}.",
        "",
    ]


def space_lines(data: dict[str, Any]) -> list[str]:
    lines = [f"**Space** ([details]({HERE}space.md)):", ""]
    for result in data["inputs"]:
        virtual = result["virtual_size"]
        lines += [
            f"`{result['name']}`, {virtual / GIB:.2f} GiB virtual:",
            "",
            "| version | file size | on disk | % of virtual on disk |",
            "|---|--:|--:|--:|",
        ]
        for row in result["files"]:
            lines.append(
                f"| {row['version']} | {human(row['file_size'])} | {human(row['on_disk'])} | "
                f"{100 * row['on_disk'] / max(1, virtual):.1f} % |"
            )
        for row in result.get("rbd", []):
            lines.append(
                f"| {row['version']} (`rbd du`) | {human(row['provisioned'])} provisioned | "
                f"{human(row['used'])} | {100 * row['used'] / max(1, virtual):.1f} % |"
            )
        lines.append("")
    return lines


def glance_lines(data: dict[str, Any]) -> list[str]:
    from benchmarks.glance_import import table

    return [
        f"**Inside a real Glance** (the samples and the guest disk imported with the `openstack` client; "
        f"[details]({HERE}glance_import.md)):",
        "",
        *table(data),
        "",
    ]


def summary_chart(inspect: dict[str, Any] | None, convert: dict[str, Any] | None, out: Path) -> bool:
    """Two panels: images/s per inspector and conversion time per source and
    candidate, both on linear axes (a log axis made a 20x gap look like 2x);
    the legend sits under the plot, over no bar. Returns False when there
    is nothing to plot."""
    if inspect is None and convert is None:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(14, 6), gridspec_kw={"width_ratios": [1, 2]})
    if inspect is not None:
        _inspection_panel(left, inspect)
    if convert is not None:
        _conversion_panel(right, convert)
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return True


def _inspection_panel(axis: Any, inspect: dict[str, Any]) -> None:
    tools = ("diskpipe", "oslo", "qemu-img")
    rates = [inspect["speed"][tool]["images_per_s"] for tool in tools]
    bars = axis.bar(tools, rates, color=["tab:green", "tab:orange", "tab:blue"])
    labels = [f"{rates[0]:.0f}/s"] + [f"{rate:.0f}/s\n{rates[0] / rate:.1f}× slower" for rate in rates[1:]]
    axis.bar_label(bars, labels=labels, padding=2)
    axis.set_ylim(0, max(rates) * 1.15)  # room for the labels
    axis.set_ylabel("images per second (higher is better)")
    axis.set_title("Inspection speed")


def _conversion_panel(axis: Any, convert: dict[str, Any]) -> None:
    candidates = (
        ("diskpipe", "diskpipe (Glance hashes)", "tab:green"),
        ("glance", "Glance's way", "tab:orange"),
        ("diskpipe-no-full-hashes", "diskpipe (no full hashes)", "tab:olive"),
        ("qemu-img", "plain qemu-img", "tab:blue"),
    )
    sources = list(convert["sources"])
    width = 0.8 / len(candidates)
    for index, (key, label, color) in enumerate(candidates):
        medians = [convert["sources"][source]["timings"][key]["median"] for source in sources]
        positions = [group + (index - (len(candidates) - 1) / 2) * width for group in range(len(sources))]
        bars = axis.bar(positions, medians, width, label=label, color=color)
        axis.bar_label(bars, labels=[f"{value:.1f}" for value in medians], padding=2, fontsize=8)
    axis.set_xticks(range(len(sources)), sources)
    axis.set_ylabel("seconds (median, lower is better)")
    axis.set_title("4 GiB guest disk into Ceph RBD")
    axis.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), ncols=len(candidates), frameon=False)


def summary(runs: dict[str, dict[str, Any]]) -> str:
    inspect, convert = load("inspect_speed"), load("convert_speed")
    pipeline, space, scale_out = load("pipeline_overhead"), load("space"), load("scale_out")
    glance = load("glance_import")
    lines = report_head("Benchmark summary", machine())
    if runs:
        lines += [
            "This run: "
            + ", ".join(f"{name} exit {run['exit']} in {run['seconds']:.0f} s" for name, run in runs.items()),
            "",
        ]
    lines += inspect_lines(inspect) if inspect else []
    lines += convert_lines(convert) if convert else []
    # The 1 TiB row: from the full convert_speed run, or from `--only huge` alone.
    huge_alone = load("convert_speed_huge")
    if convert and "huge" in convert:
        lines += huge_lines(convert["huge"], "convert_speed.md")
    elif huge_alone and "huge" in huge_alone:
        lines += huge_lines(huge_alone["huge"], "convert_speed_huge.md")
    lines += pipeline_lines(pipeline) if pipeline else []
    lines += scale_out_lines(scale_out) if scale_out else []
    lines += space_lines(space) if space else []
    lines += glance_lines(glance) if glance else []
    if summary_chart(inspect, convert, RESULTS / "summary.png"):
        lines += [f"![inspection and conversion]({HERE}summary.png)", ""]
    if (RESULTS / "space.png").exists() and space:
        lines += [f"![space per format]({HERE}space.png)", ""]
    lines += [
        "Reproduce: `bash scripts/setup.sh --test --bench && .venv/bin/python -m benchmarks.run_all` "
        "(about an hour and a half on two cores, half of it hashing the 1 TiB image; `--quick` for a smoke run).",
        "",
    ]
    return "\n".join(lines)


def update_readme(text: str) -> None:
    readme = README.read_text()
    if START_MARK not in readme or END_MARK not in readme:
        raise SystemExit(f"README.md lacks the {START_MARK} … {END_MARK} markers")
    head, rest = readme.split(START_MARK, 1)
    _, tail = rest.split(END_MARK, 1)
    # In the README the summary sits under its own heading, one level down.
    body = text.replace("# Benchmark summary\n\n", "", 1)
    README.write_text(f"{head}{START_MARK}\n{body}\n{END_MARK}{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer repeats and sources")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, help="run only these (the summary uses all results)")
    parser.add_argument("--summary-only", action="store_true", help="rebuild the summary from the stored results")
    parser.add_argument("--no-readme", action="store_true", help="leave README.md alone")
    args = parser.parse_args(argv)

    runs: dict[str, dict[str, Any]] = {}
    if not args.summary_only:
        for name in args.only or BENCHMARKS:
            runs[name] = run(name, args.quick)
    RESULTS.mkdir(parents=True, exist_ok=True)
    text = summary(runs)
    (RESULTS / "summary.md").write_text(text.replace(HERE, ""))
    if not args.no_readme:
        update_readme(text.replace(HERE, "benchmarks/results/"))
    print(text.replace(HERE, ""))
    failed = [name for name, run in runs.items() if run["exit"] != 0]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
