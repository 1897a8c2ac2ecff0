"""What the operator, its REST API and the jobrunner share, and nothing else.

- `model`: the BeamBackfill spec and status, the single source of truth for the CRD, the REST
  body and the worker's input;
- `worker`: the operator <-> jobrunner contract (env names, exit codes, the Secret-key mapping,
  the staging result);
- `staging`: the layout of a backfill's staged files and the guard on deleting them.

This package sits at the bottom of the import graph: it imports no program above it
(tests/unit/test_layering.py holds the rule).
"""
