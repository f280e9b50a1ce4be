"""diskpipe: find out what an uploaded disk image really is, refuse the
dangerous ones, convert the rest to raw and store them in Ceph RBD."""

__version__ = "0.1.0"
