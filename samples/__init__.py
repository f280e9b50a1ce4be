"""Sample disk images of every format diskpipe inspects, with a manifest of
what qemu-img 7.2 says each one is. Run `python -m samples OUTDIR`."""
