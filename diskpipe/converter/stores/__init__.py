"""Where converted images are kept: one interface, two backends (local
files, the embedded default; Ceph RBD, the real target)."""

from diskpipe.converter.stores.base import Location, Store, StoreError, StoreUnavailable, Target, owner_tag

__all__ = ["Location", "Store", "StoreError", "StoreUnavailable", "Target", "owner_tag"]
