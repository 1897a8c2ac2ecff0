import json
import os
import sys
from pathlib import Path

pytest_plugins = ["beam_devstack.pytest_plugin"]

# The operator tests run the operator with jobrunner image beam-backfill/standin-jobrunner; the
# node agent maps it to tests/standin/bin/beam-jobrunner (set before any agent starts).
_STANDIN = Path(__file__).parent / "standin" / "bin"
os.environ.setdefault(
    "BEAM_NODE_AGENT_IMAGES",
    json.dumps(
        {
            "beam-backfill/standin-jobrunner": {
                "entrypoint": ["beam-jobrunner"],
                "cmd": [],
                "venv": True,
                "env": {"PATH": f"{_STANDIN}:{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin"},
            }
        }
    ),
)
