"""The one way diskpipe refuses an image: `UnsafeImage`, raised by
`require_safe` from a policy verdict (or by `refuse` for a check outside the
policy: qemu-img's cross-check, a missing key). The validation hook, the
converter and the job pipeline all raise and catch this type; records and
exit codes are decided from it, never from message text.
"""

from __future__ import annotations

from collections.abc import Iterable

from diskpipe.formats.policy import Issue, Verdict


class UnsafeImage(Exception):
    """The image is refused; `.issues` say why (check name and message)."""

    def __init__(self, issues: Iterable[Issue], verdict: Verdict | None = None) -> None:
        self.issues = tuple(issues)
        self.verdict = verdict
        super().__init__(describe(self.issues))


class StreamUndecided(UnsafeImage):
    """The stream could not decide (an honest image may keep its tables in an
    order a stream cannot follow): no refusal, but no safe verdict either.
    `.verdict.decided` is False; validate the complete file before use.
    An `UnsafeImage`, so a caller that only catches that stays safe."""

    def __init__(self, verdict: Verdict) -> None:
        super().__init__((), verdict)
        self.args = ("; ".join(verdict.notes),)


def describe(issues: Iterable[Issue]) -> str:
    """`check: message; check: message` — the refusal's one-line reason."""
    return "; ".join(f"{issue.check}: {issue.message}" for issue in issues)


def require_safe(verdict: Verdict) -> Verdict:
    """The verdict if it lets the image through; the refusal otherwise."""
    if not verdict.decided:
        raise StreamUndecided(verdict)
    if not verdict.safe:
        raise UnsafeImage(verdict.issues, verdict)
    return verdict


def refuse(check: str, message: str, verdict: Verdict | None = None) -> UnsafeImage:
    """A refusal by a check outside the policy (named like a policy check)."""
    return UnsafeImage((Issue(check, message),), verdict)
