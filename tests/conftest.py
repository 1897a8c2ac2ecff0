pytest_plugins = ["beam_devstack.pytest_plugin"]
