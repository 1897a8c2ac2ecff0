"""The dev stack's domain-free substrate: processes that die with their owner (proc), test
certificates (pki), a Kubernetes control plane (k8s) and a real node (node), the brokers and
stand-in servers (kafka and its fault proxy, nats, sns, gcs, snowflake), promtool and a headless
browser.

Nothing here knows about backfills: it imports none of beam_contract, beam_operator and
beam_jobrunner, and nothing of beam_devstack outside this package (pyproject.toml,
[tool.importlinter]). The project's fixtures, dataset, images and demo are beam_devstack's other
modules, which build on this.
"""
