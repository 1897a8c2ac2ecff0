pytest_plugins = ["beam_devstack.pytest_plugin"]


def pytest_collection_modifyitems(session, config, items):
    """The benchmarks' smoke runs first: two of them start a real node of their own, and one
    node runs per machine (beam_devstack.node), so they must run before the session's own
    node fixtures start one (which then lives until the session ends)."""
    items.sort(key=lambda item: 0 if item.nodeid.startswith("tests/bench/") else 1)
