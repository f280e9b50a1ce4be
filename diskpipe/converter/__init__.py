"""Conversion with qemu-img (as a subprocess, under limits), checksums, and stores."""
