"""The manifest: one `Sample` record per generated image, stored as JSON.

`OUTDIR/manifest.json` is a JSON list of objects with the fields of `Sample`.
Tests load it with `load_manifest(outdir)`; the generator writes it with
`write_manifest(outdir, samples)`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

MANIFEST_NAME = "manifest.json"


@dataclass(slots=True)
class Sample:
    """What one generated image is, as qemu-img 7.2 sees it.

    `format` is the qemu driver diskpipe must report (`-f` value), and
    `virtual_size` what `qemu-img info -f format` reports (for fixed VHDs:
    what `-f vpc` reports, although qemu's probe calls them raw).
    `qemu_oracle` says whether `qemu-img info -f format` opens the file, so
    tests can ask qemu live. `allocated` is the sum of the `"data": true`
    extents of `qemu-img map -f format`, or None where that number is not
    meaningful (no block-status support in the driver, tool-made raw files
    whose holes depend on the host filesystem, encrypted payloads).
    `contents` lists the content kinds expected inside raw data (iso, gpt,
    mbr, filesystem, kernel, ramdisk, compressed, luks, archive, text).

    `verdict`, `checks` and `claimed` belong to the safety policy: honest
    samples are "safe" with no checks; hostile samples (another module) set
    them. Keys this version does not know are kept in `extra` so an older
    reader does not drop a newer writer's fields.
    """

    name: str
    file: str
    format: str
    disk_format: str
    virtual_size: int
    description: str
    group: str = "honest"
    contents: list[str] = field(default_factory=list)
    qemu_oracle: bool = True
    allocated: int | None = None
    verdict: str = "safe"
    checks: list[str] = field(default_factory=list)
    claimed: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def path(self, outdir: str | Path) -> Path:
        return Path(outdir) / self.file

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        extra = out.pop("extra")
        out.update(extra)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Sample:
        known = {f.name for f in fields(cls)} - {"extra"}
        kwargs = {key: value for key, value in data.items() if key in known}
        extra = {key: value for key, value in data.items() if key not in known}
        return cls(**kwargs, extra=extra)


def manifest_path(outdir: str | Path) -> Path:
    return Path(outdir) / MANIFEST_NAME


def write_manifest(outdir: str | Path, samples: list[Sample]) -> Path:
    """Write the manifest; one object per line keeps diffs between runs readable."""
    path = manifest_path(outdir)
    names = [sample.name for sample in samples]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"duplicate sample names: {', '.join(duplicates)}")
    lines = ",\n".join(" " + json.dumps(sample.to_json(), sort_keys=True) for sample in samples)
    path.write_text(f"[\n{lines}\n]\n" if samples else "[]\n", encoding="utf-8")
    return path


def load_manifest(outdir: str | Path) -> list[Sample]:
    data = json.loads(manifest_path(outdir).read_text(encoding="utf-8"))
    if not isinstance(data, list):
        raise ValueError(f"{manifest_path(outdir)}: expected a JSON list")
    return [Sample.from_json(item) for item in data]
