"""Classroom exercises: write the method's key functions yourself; `python -m exercises check N` grades them with the
project's own property tests. See exercises/README.md."""
