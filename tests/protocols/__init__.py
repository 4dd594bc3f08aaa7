"""Pure-tier tests of the wire protocol (``protocols/``)."""
