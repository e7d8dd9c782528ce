"""One line, not a traceback, when a dependency release does not work with finegrain.

A new release of transformers, timm or open_clip can change what finegrain calls (transformers
5.25 changed a method's signature and every Hugging Face text tower died with a TypeError deep in
a stack trace). The towers run their library calls under :func:`dependency_guard`: a
``TypeError``, ``AttributeError`` or ``ImportError`` raised there becomes a
:class:`DependencyError` naming the package, its installed version, what failed and the versions
finegrain was tested with; the CLI prints it as one line. The original error stays chained
(``__cause__``) for debugging.

``TESTED`` is the range the test suite last passed with (``tools/check_floor.sh`` at the floor,
``.ci/run`` at the newest; README "Tested versions" quotes the same numbers).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata

# distribution -> (oldest, newest) release the suite passed with
TESTED: dict[str, tuple[str, str]] = {
    "transformers": ("4.48.0", "5.25.0"),
    "timm": ("1.0.17", "1.0.31"),
    "open_clip_torch": ("3.0.0", "3.3.0"),
}

INCOMPATIBLE = (TypeError, AttributeError, ImportError)


class DependencyError(ValueError):
    """An installed dependency release that finegrain does not work with (one line)."""


def installed_version(dist: str) -> str | None:
    """The installed version of distribution ``dist``, or None when it is not installed."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def incompatibility(dist: str, what: str, error: BaseException) -> DependencyError:
    """The one-line error for ``error`` raised by ``dist`` while doing ``what``."""
    version = installed_version(dist)
    detail = str(error).strip().splitlines()[0] if str(error).strip() else ""
    cause = f"{type(error).__name__}: {detail}" if detail else type(error).__name__
    if version is None:
        return DependencyError(f"{what} needs {dist}, which is not installed (pip install {dist})")
    tested = TESTED.get(dist)
    hint = (
        f"; finegrain was tested with {dist} {tested[0]}-{tested[1]}"
        f" (pip install '{dist}>={tested[0]},<={tested[1]}')"
        if tested
        else ""
    )
    return DependencyError(f"{dist} {version}: {what} failed ({cause}){hint}")


@contextmanager
def dependency_guard(dist: str, what: str) -> Iterator[None]:
    """Run a block of ``dist`` calls; an incompatibility error becomes a ``DependencyError``.

    Also a decorator (``@dependency_guard("timm", "the timm image tower")``). Keep the guarded
    block to the library calls: finegrain's own checks raise ``ValueError`` and pass through."""
    try:
        yield
    except DependencyError:
        raise
    except INCOMPATIBLE as e:
        raise incompatibility(dist, what, e) from e
