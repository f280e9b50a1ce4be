"""Where converted images are kept: one interface (`base.Store`), several
backends (local files, the embedded default; Ceph RBD; S3 object stores),
picked by kind through `registry`."""

from diskpipe.converter.stores.base import (
    Capabilities,
    Location,
    Store,
    StoreError,
    StoreUnavailable,
    Target,
    owner_tag,
)

__all__ = ["Capabilities", "Location", "Store", "StoreError", "StoreUnavailable", "Target", "owner_tag"]
