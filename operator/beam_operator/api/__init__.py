"""The Beam backfills REST API (`beam-api`): create, list and cancel backfills over HTTP, with
BeamBackfill resources as the only record. See docs/api.md."""
