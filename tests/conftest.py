import pytest

pytest_plugins = ["beam_devstack.pytest_plugin"]

NODE_FIXTURES = {"node_cluster", "node_servers", "node_operator"}


def pytest_collection_modifyitems(session, config, items):
    """The benchmarks' smoke runs first: two of them start a real node of their own, and one
    node runs per machine (beam_devstack.substrate.node), so they must run before the session's own
    node fixtures start one (which then lives until the session ends).

    Every test that needs the real node is marked `node`, so `-m "not node"` is the fast
    subset (docs/development.md, "Tests")."""
    items.sort(key=lambda item: 0 if item.nodeid.startswith("tests/bench/") else 1)
    for item in items:
        if NODE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.node)
