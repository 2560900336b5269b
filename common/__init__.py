"""Shared code of the fedsilo coordinator and institutions."""
