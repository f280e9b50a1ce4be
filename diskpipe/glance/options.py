"""The plugin's options: the `[diskpipe]` section of Glance's
glance-image-import.conf, read with Glance's own oslo.config.

Policy keys mean what they mean in diskpipe's TOML `[policy]` section (sizes
take K/M/G/T suffixes); a key left unset comes from `policy_file` (a diskpipe
TOML file), else from diskpipe's usual configuration (`DISKPIPE_CONFIG`,
`/etc/diskpipe/diskpipe.toml`, `DISKPIPE_POLICY_*`), else its defaults.
"""

from __future__ import annotations

from typing import Any

from oslo_config import cfg

from diskpipe.glance.parts import load_policy
from diskpipe.glance.staged import OUTPUT_FORMATS, Settings

GROUP = "diskpipe"
# The [policy] keys an operator may set here, by their TOML names.
POLICY_KEYS = (
    "allowed_formats",
    "vmdk_create_types",
    "max_virtual_size",
    "max_vmdk_descriptor",
    "allow_luks",
    "allow_empty_image",
)

OPTS = [
    cfg.StrOpt(
        "output_format",
        default="raw",
        choices=OUTPUT_FORMATS,
        help="Format of the image Glance stores (raw: what Ceph clones and Nova boot from).",
    ),
    cfg.StrOpt("policy_file", help="A diskpipe TOML file whose [policy] section is the safety policy."),
    cfg.ListOpt("allowed_formats", help="qemu drivers accepted (diskpipe's [policy] allowed_formats)."),
    cfg.ListOpt("vmdk_create_types", help="VMDK createTypes accepted (default monolithicSparse, streamOptimized)."),
    cfg.StrOpt("max_virtual_size", help="Largest virtual size accepted, e.g. 2T (default 2 TiB)."),
    cfg.StrOpt("max_vmdk_descriptor", help="Largest VMDK descriptor accepted, e.g. 64K."),
    cfg.BoolOpt("allow_luks", help="Accept LUKS1 images (converting them needs the key, which Glance has not)."),
    cfg.BoolOpt("allow_empty_image", help="Accept images of virtual size 0."),
    cfg.IntOpt(
        "convert_timeout",
        min=1,
        help="Wall-clock seconds one qemu-img conversion may take (default: scaled by the virtual size).",
    ),
]


def register(conf: Any) -> None:
    conf.register_opts(OPTS, group=GROUP)


def settings(conf: Any) -> Settings:
    """The section as diskpipe settings; ConfigError for a bad value."""
    section = conf[GROUP]
    overrides = {key: section[key] for key in POLICY_KEYS if section[key] is not None}
    timeout = section.convert_timeout
    return Settings(
        policy=load_policy(section.policy_file, **overrides),
        output_format=section.output_format,
        convert_timeout=float(timeout) if timeout is not None else None,
    )
