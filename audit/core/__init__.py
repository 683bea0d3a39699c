"""Shared machinery of every check: results, registry, context, runner, statistics."""
