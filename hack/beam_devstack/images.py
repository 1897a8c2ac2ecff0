"""The project's images, built from its own Dockerfiles as users build them, for the real node.

No Docker engine and no registry here: hack/node/build-images.sh runs `buildah bud` with the
Dockerfiles' PYTHON_IMAGE/BUILD_IMAGE set to local Debian bases (mmdebstrap) and saves an OCI
archive, which node.py imports into the node's containerd. An image is rebuilt only when its
inputs change: the cache key hashes the Dockerfile, every file its COPY lines take from the
context (what .dockerignore lets through) and the base images' own keys. The tag carries the key
(`dev-<key>`), so a Pod never runs a stale image under a reused tag.
"""

from __future__ import annotations

import fnmatch
import hashlib
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from beam_devstack.substrate.node import image_archive
from beam_devstack.substrate.proc import CACHE, progress

ROOT = Path(__file__).resolve().parents[2]
BUILD_IMAGES = ROOT / "hack" / "node" / "build-images.sh"
IMAGE_DIR = CACHE / "images"
# Left out of every image (.dockerignore says the same for docker build).
_SKIPPED = ("__pycache__", "*.pyc", "*.so", "*.egg-info")


# The key each image was built (or found) with in this process: its tag must stay the one of the
# archive the node imported even if a source file changes while the stack runs.
_BUILT: dict[str, str] = {}


@dataclass(frozen=True)
class ProjectImage:
    name: str  # jobrunner | operator
    dockerfile: Path
    repository: str  # as the chart names it
    context: Path = ROOT  # the build context, which the COPY sources are relative to

    def copied_paths(self) -> list[Path]:
        """The sources of the Dockerfile's COPY lines (not COPY --from)."""
        out = []
        for line in self.dockerfile.read_text().splitlines():
            words = line.split()
            if words[:1] == ["COPY"] and not any(w.startswith("--from") for w in words):
                out += [self.context / w for w in words[1:-1] if not w.startswith("--")]
        return out

    def inputs(self) -> list[Path]:
        files = [self.dockerfile]
        for path in self.copied_paths():
            if path.is_dir():
                files += sorted(
                    p
                    for p in path.rglob("*")
                    if p.is_file() and not any(fnmatch.fnmatch(part, pat) for part in p.parts for pat in _SKIPPED)
                )
            else:
                files.append(path)
        return files

    def key(self) -> str:
        h = hashlib.sha256()
        for base in ("python", "build"):
            h.update(image_archive(base).name.encode())
        for f in self.inputs():
            h.update(str(f.relative_to(ROOT)).encode() + b"\0" + f.read_bytes() + b"\0")
        return h.hexdigest()[:16]

    def tag(self) -> str:
        return f"dev-{_BUILT.get(self.name) or self.key()}"

    def reference(self) -> str:
        """The name the CRI stores it under: unqualified names mean docker.io."""
        return f"docker.io/{self.repository}:{self.tag()}"

    def archive(self) -> Path:
        """The image's OCI archive, built first if its inputs changed."""
        key = self.key()
        out = IMAGE_DIR / f"{self.name}-{key}.oci.tar"
        _BUILT[self.name] = key
        if out.exists():
            progress("images", f"{self.repository}:dev-{key} cached")
            return out
        t0 = time.monotonic()
        progress("images", f"building {self.repository}:dev-{key} from {self.dockerfile.name} (inputs changed)")
        done = subprocess.run(
            ["bash", str(BUILD_IMAGES), "dockerfile", str(self.dockerfile), self.reference(), str(self.context)],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise RuntimeError(f"building {self.repository} failed ({done.returncode}):\n{done.stderr[-4000:]}")
        built = Path(done.stdout.strip().splitlines()[-1])
        for old in IMAGE_DIR.glob(f"{self.name}-*.oci.tar"):
            old.unlink()
        built.rename(out)
        progress("images", f"{self.repository}:dev-{key} built in {time.monotonic() - t0:.0f}s")
        return out


JOBRUNNER = ProjectImage("jobrunner", ROOT / "Dockerfile.jobrunner", "beam-backfill/jobrunner")
OPERATOR = ProjectImage("operator", ROOT / "Dockerfile.operator", "beam-backfill/operator")


def jobrunner_job(name: str, command: list[str], labels: dict[str, str] | None = None, **spec: object) -> dict:
    """A batch/v1 Job of one container of the jobrunner image running `command`, no retries:
    what tests run on the node besides the operator's own Jobs."""
    meta: dict = {"name": name, **({"labels": labels} if labels else {})}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": meta,
        "spec": {
            "backoffLimit": 0,
            **spec,
            "template": {
                "metadata": {"labels": labels or {}},
                "spec": {
                    "restartPolicy": "Never",
                    "automountServiceAccountToken": False,
                    "containers": [
                        {
                            "name": "main",
                            "image": f"{JOBRUNNER.repository}:{JOBRUNNER.tag()}",
                            "imagePullPolicy": "Never",
                            "command": command,
                        }
                    ],
                },
            },
        },
    }


PROJECT_IMAGES = (JOBRUNNER, OPERATOR)


def ensure_built() -> list[Path]:
    """Every archive a real node of the stack imports: the sandbox image and the project's images."""
    return [image_archive("pause"), *(image.archive() for image in PROJECT_IMAGES)]
