"""Options several commands share, with help that names what each one
overrides: the environment variable and the configuration file key (the
option wins over both, the variable over the file)."""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing; argparse is for the annotations only
if TYPE_CHECKING:
    import argparse

CONFIG_FILE = "DISKPIPE_CONFIG, else /etc/diskpipe/diskpipe.toml"
BROKER_HELP = (
    "Redis URL of the Celery broker: jobs go to the workers and records live there "
    "(env CELERY_BROKER_URL / DISKPIPE_BROKER_URL, [celery] broker_url); none: run in this process"
)
POLICY_HELP = (
    f"configuration file whose [policy] section judges images (default: {CONFIG_FILE}; "
    "env DISKPIPE_POLICY_<KEY> overrides one key)"
)


OUTPUTS = ("human", "json")


def add_output(parser: argparse.ArgumentParser, json_text: str) -> None:
    parser.add_argument("--output", choices=OUTPUTS, default="human", help=f"human (default) or json: {json_text}")


def add_policy(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policy", metavar="FILE", help=POLICY_HELP)


def add_claimed_format(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--claimed-format",
        metavar="FMT",
        help="the format the uploader claims (Glance or qemu name); a different real format is refused",
    )


def add_broker(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--broker", metavar="URL", help=BROKER_HELP)


def add_store(parser: argparse.ArgumentParser, *, what: str = "where images go") -> None:
    from diskpipe.converter.stores import registry

    parser.add_argument(
        "--store",
        metavar=registry.usage(),
        help=f"{what} (env DISKPIPE_STORE_KIND / DISKPIPE_STORE_DIRECTORY, [store] kind and directory; "
        "rbd:POOL overrides [rbd] pool, s3:BUCKET [s3] bucket; default: the file store)",
    )
