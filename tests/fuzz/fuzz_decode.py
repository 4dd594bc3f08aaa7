"""Coverage-guided fuzzing of the frame decoder with atheris: ``make fuzz``.

Not part of ``make test``: it runs for as long as it is told to. Each input is
tried three ways, so that the fuzzer reaches the parser behind the MAC too:

1. as a frame, decoded with the corpus key;
2. as a frame, decoded without verifying the MAC;
3. as a msgpack *body*: the correct tag is appended before decoding, so every
   input is "authentic" and exercises field validation.

Any exception other than a :class:`~protocols.errors.ProtocolError` is a crash
that atheris reports with the input that caused it. Seeds come from the
checked-in corpus in ``tests/fuzz/corpus``.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable

import atheris  # type: ignore[import-not-found,import-untyped,unused-ignore]  # `make fuzz` installs it

with atheris.instrument_imports():
    from protocols.codec import compute_tag, decode, decode_unverified
    from protocols.errors import ProtocolError
    from tests.fuzz.make_corpus import KEY


def one_input(data: bytes) -> None:
    """Decode ``data`` three ways; only ProtocolError may escape the decoder."""
    attempts: list[Callable[[], object]] = [
        lambda: decode(data, KEY),
        lambda: decode_unverified(data),
        lambda: decode(data + compute_tag(KEY, data), KEY),
    ]
    for attempt in attempts:
        with contextlib.suppress(ProtocolError):
            attempt()


def main() -> None:
    """Run atheris with the command-line arguments (libFuzzer flags and corpus folders)."""
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
