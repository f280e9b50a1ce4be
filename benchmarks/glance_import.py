"""A real Glance, two import plugins, the same samples: Glance's built-in
`image_conversion` against diskpipe's plugin, side by side.

    python -m benchmarks.glance_import [--quick] [--repeat N] [--port P] [--host-guest]

Glance 33 runs from its own virtualenv under gunicorn (scripts/glance-start.sh),
once per plugin with nothing else changed. Every sample of the corpus
(`python -m samples`) is imported with the real `openstack` client
(`image create --import`, i.e. glance-direct), its claimed `disk_format`
being the one the manifest gives it, and the outcome is judged:
- a hostile sample must not become `active`;
- an honest one must become `active`, stored as raw data identical to what
  qemu reads from the upload (Glance's own sha512 of the stored data against
  a reference conversion), with the right virtual size;
- honest files that are no disk image or are obsolete (the manifest's
  honest-but-unsafe verdicts) are counted apart, as are encrypted images
  (neither plugin has the key to convert them) and 1 TiB disks (Glance would
  read and hash every byte of them as it stores them).
Then the 4 GiB guest disk of `benchmarks.guest`, as qcow2, is imported with
each plugin in turn (`--repeat` rounds, interleaved), timed from the client's
start to `active`, and split at the end of the upload into the stage and the
import.

The harness here (`Glance`, `reference_digest`, the sample classes) is also
what tests/test_glance.py drives Glance with.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import queue
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, ROOT, WORK, machine, report_head, write_results

SCRIPTS = ROOT / "scripts"
PLUGINS = ("image_conversion", "diskpipe")
# Glance reads, hashes and writes every byte it stores: 1 TiB disks would
# take hours per plugin, so they are left out (and said so).
MAX_VIRTUAL_SIZE = 2 << 30
RAW_FAMILY = ("ami", "aki", "ari")  # claims Glance also requires as container_format
# The disk formats `openstack image create` offers (a fixed list in the
# client); the `glance` client takes whatever the server's schema allows.
OPENSTACK_CLIENT_FORMATS = frozenset(
    {"ami", "ari", "aki", "vhd", "vmdk", "raw", "qcow2", "vhdx", "vdi", "iso", "ploop"}
)


# -- a Glance API driven by its real clients ----------------------------------


@dataclass
class Upload:
    """One image to import: a file (glance-direct) or a URL (web-download)."""

    name: str
    disk_format: str
    path: Path | None = None
    uri: str | None = None

    @property
    def container_format(self) -> str:
        return self.disk_format if self.disk_format in RAW_FAMILY else "bare"


@dataclass
class Outcome:
    """What Glance says about one import once it has settled."""

    name: str
    image_id: str
    image: dict[str, Any]
    task: dict[str, Any] = field(default_factory=dict)
    logged: str = ""  # Glance's log, when the task message is only "Internal Error"

    @property
    def status(self) -> str:
        return str(self.image.get("status"))

    @property
    def message(self) -> str:
        return str(self.task.get("message") or "")

    @property
    def active(self) -> bool:
        return self.status == "active"


class GlanceError(RuntimeError):
    """Glance or one of its clients did not do what was asked."""


class Glance:
    """A Glance API started by scripts/glance-start.sh, and its clients."""

    def __init__(self, state: Path, url: str, venv: Path, env: dict[str, str]) -> None:
        self.state = state
        self.url = url
        self.venv = venv
        self.env = env
        self.log_mark = 0  # where in Glance's log the current import began

    @classmethod
    def start(
        cls,
        state: Path,
        *,
        port: int,
        plugins: str = "diskpipe",
        rbd_conf: str | None = None,
        extra_conf: Path | None = None,
    ) -> Glance:
        env = dict(os.environ, DISKPIPE_GLANCE_PORT=str(port))
        if extra_conf is not None:
            env["DISKPIPE_GLANCE_EXTRA_CONF"] = str(extra_conf)
        args = ["bash", str(SCRIPTS / "glance-start.sh"), "--plugins", plugins]
        if rbd_conf is not None:
            args += ["--rbd", rbd_conf]
        started = subprocess.run([*args, str(state)], env=env, capture_output=True, text=True, check=False)
        if started.returncode != 0:
            raise GlanceError(f"glance-start.sh failed:\n{started.stderr[-4000:]}")
        values = dict(line.split("=", 1) for line in started.stdout.splitlines() if "=" in line)
        return cls(state, values["DISKPIPE_GLANCE_URL"], Path(values["DISKPIPE_GLANCE_VENV"]), env)

    def stop(self) -> None:
        subprocess.run(
            ["bash", str(SCRIPTS / "glance-stop.sh"), str(self.state)], env=self.env, capture_output=True, check=False
        )

    # The clients. A client start costs 1.5-3 s of Python imports, so the
    # `openstack` commands go through one interactive session. The imports
    # run one after the other: Glance's SQLite database takes one writer at a
    # time and fails a request that collides with a running import ("database
    # is locked"), a limit of this test set-up, not of Glance on MySQL.

    def session(self) -> OpenstackSession:
        return OpenstackSession(self)

    def glance(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        """The `glance` client, with standard input closed: given a file it
        refuses to run when stdin is open and not a terminal."""
        command = [str(self.venv / "bin" / "glance"), "--os-image-url", self.url, "--os-auth-token", "test", *args]
        return subprocess.run(
            ["bash", "-c", 'exec "$@" <&-', "glance", *command],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def import_all(self, uploads: Iterable[Upload], timeout: float = 900) -> dict[str, Outcome]:
        """Import each upload and wait for it to settle before the next;
        name -> outcome. `openstack image create --import` (glance-direct)
        for files in the formats that client offers; `glance
        image-create-via-import` for other formats and for URLs
        (web-download)."""
        outcomes: dict[str, Outcome] = {}
        with self.session() as session:
            for upload in uploads:
                outcome = self._import_one(session, upload, timeout)
                if self.lost_to_sqlite(outcome):
                    # Glance's SQLite database failed the import ("database
                    # is locked"): a limit of this set-up, not a verdict on
                    # the image. Once more, under a new image.
                    print(f"glance: {upload.name}: database locked, imported again", file=sys.stderr)
                    self.delete(outcome.image_id)
                    outcome = self._import_one(session, upload, timeout)
                outcomes[upload.name] = outcome
        return outcomes

    def _import_one(self, session: OpenstackSession, upload: Upload, timeout: float) -> Outcome:
        self.log_mark = self.log_size()
        if upload.uri is None and upload.disk_format in OPENSTACK_CLIENT_FORMATS:
            output = session.run(openstack_import_command(upload), timeout)
        else:
            done = self.glance(*glance_import_args(upload), timeout=timeout)
            output = done.stdout + done.stderr
        outcome = self.settle(upload.name, output, timeout)
        if "Internal Error" in outcome.message:
            outcome.logged = self.logged_reason()
        return outcome

    def worker_cpu(self) -> float:
        """CPU seconds the Glance worker has used, with the children it has
        waited for (qemu-img): a measure the other loads of a shared machine
        disturb much less than wall-clock time."""
        master = (self.state / "glance.pid").read_text().strip()
        children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
        ticks = os.sysconf("SC_CLK_TCK")
        total = 0
        for pid in children:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += sum(int(value) for value in fields[11:15])  # utime stime cutime cstime
        return total / ticks

    @property
    def log(self) -> Path:
        return self.state / "log" / "glance-api.log"

    def log_size(self) -> int:
        return self.log.stat().st_size if self.log.exists() else 0

    def log_since_mark(self) -> str:
        with self.log.open("rb") as handle:
            handle.seek(self.log_mark)
            return handle.read().decode(errors="replace")

    def logged_reason(self) -> str:
        """Why Glance failed the current import, from its log: a failure
        that is no UploadException reaches the task only as "Task failed due
        to Internal Error" (image_conversion's refusals among them)."""
        text = self.log_since_mark()
        # A command's error output (image_conversion's qemu-img) says the most.
        stderr = re.search(r"Stderr: (['\"])(.+?)\1", text)
        if stderr:
            return stderr.group(2).removesuffix("\\n")
        for line in text.splitlines():
            found = re.search(r" (?:ERROR|WARNING) glance\.async_\.flows\.plugins\.\w+ \[[^\]]*\] (.*)", line)
            if found:
                return found.group(1)
        for line in text.splitlines():
            found = re.search(r"(RuntimeError|\w+Error|\w+Exception): (.*)$", line)
            if found:
                return f"{found.group(1)}: {found.group(2)}"
        return ""

    def lost_to_sqlite(self, outcome: Outcome) -> bool:
        """The import failed with Glance's generic message while Glance's log
        (since the import began) reports its SQLite database locked."""
        if outcome.active or "Internal Error" not in outcome.message or not outcome.image_id:
            return False
        return "database is locked" in self.log_since_mark()

    # The REST API, to watch the imports settle (what the clients call too).

    def get(self, path: str) -> Any:
        request = urllib.request.Request(self.url + path, headers={"X-Auth-Token": "test"})
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())

    def delete(self, image_id: str) -> None:
        request = urllib.request.Request(
            f"{self.url}/v2/images/{image_id}", method="DELETE", headers={"X-Auth-Token": "test"}
        )
        with contextlib.suppress(urllib.error.HTTPError), urllib.request.urlopen(request, timeout=60):
            pass

    def find(self, name: str) -> dict[str, Any] | None:
        images = self.get(f"/v2/images?name={urllib.parse.quote(name)}")["images"]
        return images[0] if images else None

    def image(self, image_id: str) -> dict[str, Any]:
        image: dict[str, Any] = self.get(f"/v2/images/{image_id}")
        return image

    def import_task(self, image_id: str) -> dict[str, Any]:
        """The image's latest task (a copy-image comes after the import)."""
        tasks = self.get(f"/v2/images/{image_id}/tasks").get("tasks", [])
        return max(tasks, key=lambda task: (task["created_at"], task["updated_at"])) if tasks else {}

    def settle(self, name: str, client_output: str, timeout: float = 900) -> Outcome:
        """Wait until the import of image `name` (asked for by a client that
        has returned) is over: its task succeeded or failed, and the image is
        no longer uploading or importing. An image the client never got to
        import (no task) settles at once, with the client's output as message."""
        found = self.find(name)
        if found is None:
            return Outcome(name, "", {}, {"message": client_output.strip()})
        deadline = time.monotonic() + timeout
        # Most imports are over a few tenths of a second after the client
        # returns: poll soon, then back off to every half second (a corpus of
        # 84 imports lost ~40 s to a fixed half-second first wait).
        interval = 0.05
        while True:
            image = self.image(found["id"])
            task = self.import_task(found["id"])
            if not task:
                return Outcome(name, found["id"], image, {"message": client_output.strip()})
            # Over: the task has its outcome and the image lock is dropped (the
            # last write of a successful import).
            over = task.get("status") in ("success", "failure") and "os_glance_import_task" not in image
            if over and image.get("status") not in ("uploading", "importing"):
                return Outcome(name, found["id"], image, task)
            if time.monotonic() > deadline:
                raise GlanceError(f"import of {name} not over within {timeout:.0f} s: {image.get('status')}")
            time.sleep(interval)
            interval = min(0.5, interval * 1.5)


class OpenstackSession:
    """One interactive `openstack` client, fed a command at a time. After
    each command a lookup of an image that cannot exist marks where its
    output ends (the client answers "No Image found for <marker>")."""

    def __init__(self, glance: Glance) -> None:
        env = dict(os.environ, OS_AUTH_TYPE="none", OS_ENDPOINT=glance.url, PYTHONUNBUFFERED="1")
        self.process = subprocess.Popen(
            [str(glance.venv / "bin" / "openstack")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.count = 0

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def run(self, command: list[str], timeout: float = 1800) -> str:
        """Run one command; its output (stdout and stderr)."""
        assert self.process.stdin is not None
        self.count += 1
        marker = f"diskpipe-end-of-command-{self.count}"
        self.process.stdin.write(f"{shlex.join(command)}\nimage show {marker}\n")
        self.process.stdin.flush()
        output = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise GlanceError(f"openstack did not finish {shlex.join(command)} in {timeout:.0f} s") from None
            if line is None:
                raise GlanceError(f"openstack exited during {shlex.join(command)}: {''.join(output)[-2000:]}")
            if marker in line:
                return "".join(output)
            output.append(line)

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> OpenstackSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def openstack_import_command(upload: Upload) -> list[str]:
    return [
        "image",
        "create",
        "--import",
        "--disk-format",
        upload.disk_format,
        "--container-format",
        upload.container_format,
        "--file",
        str(upload.path),
        "-f",
        "value",
        "-c",
        "id",
        upload.name,
    ]


def glance_import_args(upload: Upload) -> list[str]:
    args = [
        "image-create-via-import",
        "--disk-format",
        upload.disk_format,
        "--container-format",
        upload.container_format,
        "--name",
        upload.name,
    ]
    if upload.uri is not None:
        return [*args, "--import-method", "web-download", "--uri", upload.uri]
    return [*args, "--import-method", "glance-direct", "--file", str(upload.path)]


# -- the samples and what each must become ------------------------------------


def claim(sample: Any) -> str:
    """The disk_format an uploader gives Glance for this sample."""
    return str(sample.claimed or sample.disk_format)


def sample_class(sample: Any) -> str:
    """hostile | honest | not-a-disk (honest files the policy refuses by
    design) | encrypted | too-large."""
    if sample.group == "hostile":
        return "hostile"
    if sample.verdict != "safe":
        return "not-a-disk"
    if sample.format == "luks" or sample.name.startswith("qcow2-encrypt"):
        return "encrypted"
    if sample.virtual_size > MAX_VIRTUAL_SIZE:
        return "too-large"
    return "honest"


def keeps_raw(sample: Any) -> bool:
    """Raw data is stored as uploaded (no conversion needed)."""
    return bool(sample.format == "raw")


def reference_raw(sample: Any, path: Path, out: Path) -> Path:
    """What qemu reads from the sample, as raw. A VHD whose footer states a
    larger size than its CHS geometry gives is read at the footer's size
    (diskpipe's documented rule: the tail, often a backup GPT, is kept)."""
    source = ["-f", sample.format, str(path)]
    if sample.format == "vpc":
        from diskpipe.formats import inspect

        info = inspect(path)
        current = info.details.get("footer-current-size", 0) // 512 * 512
        if info.details.get("size-source") == "chs" and current > info.virtual_size:
            source = ["--image-opts", f"driver=vpc,force_size_calc=current_size,file.filename={path}"]
    subprocess.run(["qemu-img", "convert", "-O", "raw", *source, str(out)], check=True, capture_output=True)
    return out


def file_digest(path: Path) -> tuple[str, str, int]:
    """Glance's checksums of a file: md5, sha512, size."""
    md5, sha512 = hashlib.md5(), hashlib.sha512()
    size = 0
    with path.open("rb") as handle:
        while chunk := handle.read(8 << 20):
            md5.update(chunk)
            sha512.update(chunk)
            size += len(chunk)
    return md5.hexdigest(), sha512.hexdigest(), size


def reference_digest(sample: Any, path: Path, scratch: Path) -> tuple[str, str, int]:
    """md5, sha512 and size of the raw data Glance must end up storing."""
    if keeps_raw(sample):
        return file_digest(path)
    with tempfile.TemporaryDirectory(dir=scratch) as work:
        return file_digest(reference_raw(sample, path, Path(work) / "reference.raw"))


def stored_right(outcome: Outcome, expected: tuple[str, str, int]) -> list[str]:
    """What is wrong with an active honest image (empty: nothing). An ISO's
    virtual size is not judged: Glance sets it itself, as it stores the
    data, to the size its own inspector reads from the ISO volume (smaller
    than the file for a hybrid ISO)."""
    md5, sha512, size = expected
    image = outcome.image
    wrong = []
    if image.get("os_hash_value") != sha512 or image.get("checksum") != md5:
        wrong.append("stored data differs from the reference conversion")
    if image.get("size") != size:
        wrong.append(f"size {image.get('size')} != {size}")
    if image.get("virtual_size") != size and image.get("disk_format") != "iso":
        wrong.append(f"virtual_size {image.get('virtual_size')} != {size}")
    return wrong


# -- the benchmark --------------------------------------------------------------


def build_samples(quick: bool) -> Path:
    out = WORK / ("glance-samples-quick" if quick else "glance-samples")
    if not (out / "manifest.json").exists():
        args = [sys.executable, "-m", "samples", str(out)] + (["--quick"] if quick else [])
        subprocess.run(args, cwd=ROOT, check=True)
    return out


def build_guest(host_files: bool, size: int) -> tuple[Path, str]:
    """The guest disk as qcow2 (what uploaders send) and where its files came from."""
    from benchmarks import guest

    if host_files:  # no network but the loopback here: skip debootstrap
        guest.debootstrap = lambda target: False  # type: ignore[assignment]
    built = guest.build(WORK / ("guest.raw" if size == guest.DEFAULT_SIZE else f"guest-{size >> 20}M.raw"), size)
    raw = Path(str(built["path"]))
    qcow2 = raw.with_suffix(".qcow2")
    if not qcow2.exists():
        temporary = qcow2.with_suffix(".tmp")
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(temporary)], check=True)
        temporary.rename(qcow2)
    return qcow2, str(built["source"])


@contextlib.contextmanager
def running(plugin: str, port: int) -> Iterator[Glance]:
    glance = Glance.start(WORK / f"glance-{plugin}", port=port, plugins=plugin)
    try:
        yield glance
    finally:
        glance.stop()


def corpus_run(glance: Glance, samples: list[Any], samples_dir: Path, expected: dict[str, Any]) -> dict[str, Any]:
    """Import every sample once; the verdicts and counts."""
    uploads = [Upload(f"s-{sample.name}", claim(sample), samples_dir / sample.file) for sample in samples]
    started = time.monotonic()
    outcomes = glance.import_all(uploads)
    rows = []
    for sample in samples:
        outcome = outcomes[f"s-{sample.name}"]
        kind = sample_class(sample)
        wrong = stored_right(outcome, expected[sample.name]) if kind == "honest" and outcome.active else []
        rows.append(
            {
                "name": sample.name,
                "class": kind,
                "claimed": claim(sample),
                "status": outcome.status,
                "disk_format": outcome.image.get("disk_format"),
                "message": outcome.message,
                "logged": outcome.logged,
                "wrong": wrong,
            }
        )
    return {"seconds": time.monotonic() - started, "rows": rows, "counts": counts(rows)}


def counts(rows: list[dict[str, Any]]) -> dict[str, int]:
    def number(kind: str, condition: Any) -> int:
        return sum(1 for row in rows if row["class"] == kind and condition(row))

    return {
        "hostile": number("hostile", lambda row: True),
        "hostile_active": number("hostile", lambda row: row["status"] == "active"),
        "honest": number("honest", lambda row: True),
        "honest_refused": number("honest", lambda row: row["status"] != "active"),
        "honest_wrong": number("honest", lambda row: row["status"] == "active" and row["wrong"]),
        "not_a_disk": number("not-a-disk", lambda row: True),
        "not_a_disk_active": number("not-a-disk", lambda row: row["status"] == "active"),
        "encrypted": number("encrypted", lambda row: True),
        "encrypted_active": number("encrypted", lambda row: row["status"] == "active"),
    }


LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+) ")


def before_storing(log_text: str) -> float | None:
    """Seconds from the import task's start to Glance's store step (the
    import plugin's work, and Glance's lock and staging checks before it),
    from the timestamps of Glance's own log lines."""
    import datetime

    def stamp(line: str) -> datetime.datetime | None:
        found = LOG_TIME.match(line)
        return datetime.datetime.fromisoformat(found.group(1)) if found else None

    started = None
    for line in log_text.splitlines():
        if started is None and "status changing from pending to processing" in line:
            started = stamp(line)
        elif started is not None and "Got image data uri" in line:
            ended = stamp(line)
            return (ended - started).total_seconds() if ended else None
    return None


def timed_import(glance: Glance, guest: Path, name: str) -> dict[str, float]:
    """One guest import: client start to `active`, split where the client
    returns (the upload is staged and the import asked for); from Glance's
    log, the part before the store step (the plugin's); and the CPU time of
    Glance's worker over the whole import."""
    with glance.session() as session:
        session.run(["image", "list", "--limit", "1"])  # the client is up: time the import alone
        glance.log_mark = glance.log_size()
        cpu = glance.worker_cpu()
        started = time.monotonic()
        output = session.run(openstack_import_command(Upload(name, "qcow2", guest)))
        staged = time.monotonic()
        outcome = glance.settle(name, output)
        done = time.monotonic()
        cpu = glance.worker_cpu() - cpu
    if not outcome.active:
        raise GlanceError(f"the guest was not imported: {outcome.status}: {outcome.message}")
    glance.delete(outcome.image_id)
    timings = {"total": done - started, "stage": staged - started, "import": done - staged, "cpu": cpu}
    plugin = before_storing(glance.log_since_mark())
    if plugin is not None:
        timings["plugin"] = plugin
    return timings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the quick sample set, a 1 GiB guest, one round")
    parser.add_argument("--repeat", type=int, default=5, help="rounds of guest imports per plugin")
    parser.add_argument("--port", type=int, default=int(os.environ.get("DISKPIPE_GLANCE_PORT", "9292")))
    parser.add_argument("--host-guest", action="store_true", help="build the guest from host files (no debootstrap)")
    args = parser.parse_args(argv)
    repeat = 1 if args.quick else args.repeat
    from samples.manifest import load_manifest

    samples_dir = build_samples(args.quick)
    manifest = [sample for sample in load_manifest(samples_dir) if sample_class(sample) != "too-large"]
    skipped = [sample.name for sample in load_manifest(samples_dir) if sample_class(sample) == "too-large"]
    guest, guest_source = build_guest(args.host_guest, (1 << 30) if args.quick else (4 << 30))
    scratch = WORK / "glance-scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    expected = {
        sample.name: reference_digest(sample, samples_dir / sample.file, scratch)
        for sample in manifest
        if sample_class(sample) == "honest"
    }
    guest_expected = file_digest(guest.with_suffix(".raw"))
    warm_up = next(sample for sample in manifest if sample_class(sample) == "honest" and sample.format == "qcow2")

    corpus: dict[str, Any] = {}
    timings: dict[str, list[dict[str, float]]] = {plugin: [] for plugin in PLUGINS}
    for round_number in range(repeat):
        for plugin in PLUGINS:
            print(f"== {plugin}, round {round_number + 1}", file=sys.stderr, flush=True)
            with running(plugin, args.port) as glance:
                if round_number == 0:
                    corpus[plugin] = corpus_run(glance, manifest, samples_dir, expected)
                    print(f"   corpus: {corpus[plugin]['counts']}", file=sys.stderr, flush=True)
                else:
                    # A running Glance has loaded its plugin's code long ago:
                    # one small import first, so no round times a cold start.
                    glance.import_all([Upload("warm-up", claim(warm_up), samples_dir / warm_up.file)])
                timings[plugin].append(timed_import(glance, guest, f"guest-{round_number}"))
                print(f"   guest: {timings[plugin][-1]}", file=sys.stderr, flush=True)
    data = {
        "machine": machine(),
        "guest": {"path": str(guest), "source": guest_source, "virtual_size": guest_expected[2]},
        "skipped": skipped,
        "corpus": corpus,
        "timings": timings,
        "repeat": repeat,
    }
    path = write_results("glance_import", markdown(data), data)
    print(path.read_text())
    return 0


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def seconds_cell(runs: list[dict[str, float]], key: str) -> str:
    values = [run[key] for run in runs if key in run]
    if not values:
        return "–"
    return f"{median(values):.1f} s ({min(values):.1f}–{max(values):.1f})"


def table(data: dict[str, Any]) -> list[str]:
    """The side-by-side table (also the README's)."""
    lines = [
        "| plugin | hostile let through | honest refused | honest stored wrong | not-a-disk let through "
        "| encrypted let through | 4 GiB guest, client to `active` | of which the import (after the upload) "
        "| of which the plugin (before Glance stores) | Glance worker CPU |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for plugin in PLUGINS:
        found = data["corpus"][plugin]["counts"]
        runs = data["timings"][plugin]
        lines.append(
            f"| {plugin} | **{found['hostile_active']}** of {found['hostile']} | **{found['honest_refused']}** of "
            f"{found['honest']} | {found['honest_wrong']} | {found['not_a_disk_active']} of {found['not_a_disk']} | "
            f"{found['encrypted_active']} of {found['encrypted']} | **{seconds_cell(runs, 'total')}** | "
            f"{seconds_cell(runs, 'import')} | {seconds_cell(runs, 'plugin')} | {seconds_cell(runs, 'cpu')} |"
        )
    return lines


# What the timing columns mean (the same in every run).
TIMING_NOTE = (
    "The import is mostly Glance's own work: it reads, hashes (md5, sha512) and writes the 4 GiB raw image into "
    "its store; the plugin's step is the time from the task's start to Glance's store step, from Glance's log. "
    "Worker CPU: the Glance worker's CPU time with qemu-img's, less disturbed than wall-clock time by the rest of "
    "a shared machine."
)


def markdown(data: dict[str, Any]) -> str:
    guest = data["guest"]
    setup = (
        f"Glance 33.0.0 (gunicorn, SQLite, file store), one start per plugin and round. Samples imported with "
        f"`openstack image create --import`; the guest ({guest['virtual_size'] >> 20} MiB virtual, "
        f"{guest['source']}) as qcow2, median of {data['repeat']} interleaved rounds (min–max), each after one "
        "small import (a running Glance is warm). "
    )
    lines = [
        *report_head("Glance import: image_conversion vs diskpipe", data["machine"]),
        setup + TIMING_NOTE,
        "",
        *table(data),
        "",
        "Honest: the manifest's safe samples up to 2 GiB virtual, which must end `active` with Glance's sha512 "
        "equal to a reference `qemu-img convert` to raw (raw data: the upload itself) and the right size. "
        "Not-a-disk: honest files the policy refuses by design (archives, text, compressed data, obsolete or "
        "multi-file formats, empty disks). Encrypted: LUKS and qcow2-LUKS, which no plugin can convert without "
        "the key. "
        f"Left out: {', '.join(data['skipped']) or 'nothing'} (1 TiB: Glance would hash every byte).",
        "",
    ]
    for plugin in PLUGINS:
        rows = data["corpus"][plugin]["rows"]
        lines += [f"## {plugin}: what it did with each sample", "", "| sample | class | claimed | status | why |"]
        lines.append("|---|---|---|---|---|")
        for row in rows:
            why = "; ".join(row["wrong"]) or row["message"]
            if row.get("logged"):
                why += f" (log: {row['logged']})"
            why = why.replace("|", "\\|")[:300]
            lines.append(f"| {row['name']} | {row['class']} | {row['claimed']} | {row['status']} | {why} |")
        lines.append("")
    lines.append(
        f"Reproduce: `bash scripts/setup.sh --test --bench && .venv/bin/python -m benchmarks.glance_import` "
        f"(results in {RESULTS.relative_to(ROOT)}/glance_import.md)."
    )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
