"""Language-neutral test vectors of the wire protocol (v1.json) and their generator."""
