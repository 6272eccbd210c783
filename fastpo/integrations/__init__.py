"""Integrations with peer libraries: each one a small, explicit, reversible patch.

``fastpo.integrations.trl`` — TRL 1.16's trainers score tokens on fastpo (``enable()`` /
``disable()`` / ``patched()``). Importing this package imports no peer library.
"""
