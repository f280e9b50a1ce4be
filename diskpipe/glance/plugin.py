"""The Glance image-import plugin: `get_flow` is the stevedore entry point
`diskpipe` (group `glance.image_import.plugins`).

Glance runs it after `_VerifyStaging` and before `_ImportToStore`, for the
glance-direct and web-download methods (not copy-image). It receives the
staged file as `file_path`, judges it with diskpipe's policy (the image's
`disk_format` is the claim), converts it with diskpipe's converter and
returns the converted file as the new `file_path`, which `_ImportToStore`
stores and `_DeleteFromFS` removes afterwards.

A refusal raises Glance's `UploadException`, whose text becomes the import
task's message. The revert leaves the image as it was before the import:
status `queued`, the target stores moved from importing to failed, the
attributes and properties this plugin set restored or removed, and nothing
of this import left in the staging directory (the staged upload of a
glance-direct import is removed too: Glance cannot import a `queued` image
from it, and it would make the next upload of the image conflict).
"""

from __future__ import annotations

import os
from typing import Any

from glance.common import exception as glance_exception
from oslo_config import cfg
from oslo_log import log as logging
from taskflow import task
from taskflow.patterns import linear_flow

from diskpipe.glance import options
from diskpipe.glance.parts import ConfigError, UnsafeImage
from diskpipe.glance.staged import PROPERTY_NAMES, Accepted, ImportFailed, process, refusal_message, remove_outputs

LOG = logging.getLogger(__name__)
CONF = cfg.CONF
options.register(CONF)

FILE_SCHEME = "file://"
# Import methods whose download task (run before this plugin) puts the image
# back to `queued` in its own revert.
DOWNLOAD_METHODS = frozenset({"web-download", "glance-download"})


class _DiskpipeImport(task.Task):  # type: ignore[misc]  # taskflow is untyped
    """Inspect, judge and convert the staged image of one import."""

    default_provides = "file_path"

    def __init__(self, task_id: str, task_type: str, action_wrapper: Any, stores: list[str], method: str) -> None:
        self.task_id = task_id
        self.action_wrapper = action_wrapper
        self.image_id = str(action_wrapper.image_id)
        self.stores = list(stores or [])
        self.method = method
        self.staged: str | None = None
        # The converted file: Glance's _DeleteFromFS removes it once stored; a
        # revert (this task or a later one failed) removes it here.
        self.output: str | None = None
        self.original: dict[str, Any] | None = None  # attributes before this task changed them
        super().__init__(name=f"{task_type}-Diskpipe-{task_id}")

    def execute(self, file_path: str) -> str:
        if not file_path.startswith(FILE_SCHEME):
            raise glance_exception.UploadException(f"diskpipe imports staged files only, not {file_path!r}")
        self.staged = file_path[len(FILE_SCHEME) :]
        # One read and one save of the image, as image_conversion does: the
        # changes are saved when the block ends, and not at all if it raises.
        with self.action_wrapper as action:
            claimed = str(action.image_disk_format or "")
            container_format = str(action.image_container_format or "bare")
            accepted = self._process(claimed, container_format)
            if accepted.converted:
                self.output = accepted.path
            action.set_image_attribute(
                disk_format=accepted.disk_format,
                container_format=accepted.container_format,
                virtual_size=accepted.virtual_size,
                size=accepted.size,
            )
            action.set_image_extra_properties(accepted.properties)
        # Recorded once saved: a revert restores only what was changed.
        self.original = {"disk_format": claimed, "container_format": container_format}
        LOG.info(
            "diskpipe: image %s accepted as %s (%s), stored as %s, virtual size %d",
            self.image_id,
            accepted.properties["diskpipe_source_format"],
            claimed,
            accepted.disk_format,
            accepted.virtual_size,
        )
        if accepted.converted:
            # Glance removes only the file this task hands on (as with image_conversion).
            _remove(self.staged)
        return FILE_SCHEME + accepted.path

    def _process(self, claimed: str, container_format: str) -> Accepted:
        assert self.staged is not None
        try:
            return process(self.staged, self.image_id, claimed, container_format, options.settings(CONF))
        except UnsafeImage as refusal:
            message = refusal_message(refusal.issues)
            LOG.warning("diskpipe: image %s (claimed %s) %s", self.image_id, claimed, message)
            raise glance_exception.UploadException(message) from refusal
        except (ImportFailed, ConfigError, cfg.Error) as error:  # cfg.Error: a bad [diskpipe] value
            LOG.error("diskpipe: import of image %s failed: %s", self.image_id, error)
            message = f"diskpipe could not import the image (no verdict on the image itself): {error}"
            raise glance_exception.UploadException(message) from error
        except Exception as error:
            LOG.exception("diskpipe: unexpected failure on image %s", self.image_id)
            message = f"diskpipe failed unexpectedly ({type(error).__name__}); see Glance's log"
            raise glance_exception.UploadException(message) from error

    def revert(self, result: Any, **kwargs: Any) -> None:
        """Undo this task: it failed, or a later task (storing) did."""
        if self.output is not None:
            _remove(self.output)
            self.output = None
        if self.staged is not None:
            remove_outputs(self.staged, self.image_id)
        with self.action_wrapper as action:
            if self.original is not None:
                action.set_image_attribute(**self.original)
                for name in PROPERTY_NAMES:
                    action.pop_extra_property(name)
            # Back to `queued` (Glance then clears size and virtual_size). Not
            # twice: Glance refuses queued -> queued, and a download task's
            # own revert, which comes after this one, sets it.
            if self.method not in DOWNLOAD_METHODS and action.image_status != "queued":
                action.set_image_attribute(status="queued")
            if self.stores:
                action.remove_importing_stores(self.stores)
                action.add_failed_stores(self.stores)
        if self.staged is not None and self.method == "glance-direct":
            # web-download's own revert removes what it downloaded.
            _remove(self.staged)


def _remove(path: str | None) -> None:
    if path is None:
        return
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
    except OSError as error:
        LOG.warning("diskpipe: cannot remove %s: %s", path, error)


def get_flow(**kwargs: Any) -> Any:
    """The plugin's flow for one import (Glance passes the task's context)."""
    method = kwargs.get("import_req", {}).get("method", {}).get("name", "")
    return linear_flow.Flow(kwargs.get("task_type", "api_image_import")).add(
        _DiskpipeImport(
            kwargs["task_id"],
            kwargs.get("task_type", "api_image_import"),
            kwargs["action_wrapper"],
            kwargs.get("backend") or [],
            method,
        )
    )
