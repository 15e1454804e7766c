"""Classroom exercises: write the method's key functions, grade them with python -m exercises check N (README.md)."""
