"""Errors a job raises to its caller (the Celery task or the CLI)."""

from __future__ import annotations


class Transient(Exception):
    """Worth retrying later (Ceph, Redis or the network were unavailable)."""


class JobRefused(Exception):
    """A refusal by a management command (protected, in use...)."""
