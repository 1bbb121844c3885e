"""The work: one module (or package) per task family, plain functions and thin `@task`
wrappers.
"""
