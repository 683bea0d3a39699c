"""Release policies: the built-in YAML policies and a strict reader for policy files.

The typed policy model (which checks, their actions and their typed
settings) lives with the checks in :mod:`audit.core.policy`; this package
never imports ``audit``.
"""
