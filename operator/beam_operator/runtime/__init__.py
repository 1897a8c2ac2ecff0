"""The controller's machinery, knowing nothing of backfills: a keyed work queue, the status and
Event recorders, and the Kubernetes calls they need (a Protocol).

What a BeamBackfill is, what its Jobs are and how it moves from one status to the next live
above this package (observe, reconcile, controller); pyproject.toml's import-linter contracts
keep it that way.
"""
