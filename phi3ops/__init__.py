"""The core: settings, errors, names, sources, policies, tracking, registry lookups, eval sets
and serving. It imports nothing above it (flows, tasks, cli, offline).
"""
