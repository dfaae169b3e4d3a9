"""The run-time type checker the tests apply to every mmlens function (see conftest.py).

beartype, with PEP 484's numeric tower: an ``int`` passes where ``float`` is annotated, as
type checkers accept.
"""

import contextlib
from collections.abc import Iterator

import jaxtyping
from beartype import BeartypeConf, beartype

typecheck = beartype(conf=BeartypeConf(is_pep484_tower=True))


@contextlib.contextmanager
def unchecked() -> Iterator[None]:
    """Run-time type checks off, for a test that passes a wrongly typed value on purpose to see
    the error mmlens itself raises for users (who run without the checker)."""
    jaxtyping.config.update("jaxtyping_disable", True)
    try:
        yield
    finally:
        jaxtyping.config.update("jaxtyping_disable", False)
