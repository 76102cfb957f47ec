"""Building and running the service's image with Debian's podman, on a machine that reaches no container registry.

The Dockerfile starts FROM python:3.11-slim-bookworm, which cannot be pulled here. `ensure_base_image` makes a
stand-in under that very name with debootstrap: Debian bookworm (whose python3 is 3.11) with pip, a `python`
command, and the host's CA bundle copied in, so that pip inside the build trusts exactly what the host's pip trusts
(a proxy that re-signs TLS, for one). It is a stand-in, not the official image: the build and run are the
Dockerfile's own, the base differs in the packages Debian puts around python3.

The flags are the ones that work on these machines: the build isolates with chroot (no user namespaces to nest in)
and the container runs under Debian's runc with cgroupfs (crun fails here on cgroups), on the host network.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.deploy.support import REPO_ROOT

BASE_IMAGE = "python:3.11-slim-bookworm"
IMAGE = "localhost/zutis-service:ci"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
# What the stand-in adds to a minimal bookworm: the interpreter, pip, `python` (the Dockerfile's RUN, CMD and
# HEALTHCHECK call it by that name) and the CA store.
BASE_PACKAGES = ("python3", "python3-pip", "python-is-python3", "ca-certificates")
BUILD_FLAGS = ("--format", "docker", "--isolation", "chroot", "--network", "host")
RUN_FLAGS = ("--runtime", "runc", "--ulimit", "nofile=20000:20000", "--network", "host")


def podman(*arguments: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    """Run `podman --cgroup-manager cgroupfs ARGUMENTS`, capturing text output."""
    return subprocess.run(
        ["podman", "--cgroup-manager", "cgroupfs", *arguments],
        capture_output=True, text=True, timeout=timeout, check=check,
    )


def image_exists(name: str) -> bool:
    return podman("image", "exists", name, check=False).returncode == 0


def ensure_base_image(timeout: float = 900) -> str:
    """Tag a debootstrapped bookworm as BASE_IMAGE unless an image of that name exists; return the name."""
    if image_exists(BASE_IMAGE):
        return BASE_IMAGE
    with tempfile.TemporaryDirectory(prefix="zutis-base-", dir="/var/tmp") as scratch:
        rootfs = Path(scratch) / "rootfs"
        subprocess.run(
            ["debootstrap", "--variant=minbase", "--include=" + ",".join(BASE_PACKAGES), "bookworm", str(rootfs),
             DEBIAN_MIRROR],
            check=True, capture_output=True, timeout=timeout,
        )
        shutil.copyfile(HOST_CA_BUNDLE, rootfs / "etc/ssl/certs/ca-certificates.crt")
        # The official image's python is not Debian's, so pip there has no PEP 668 marker; Debian's does.
        for marker in rootfs.glob("usr/lib/python3*/EXTERNALLY-MANAGED"):
            marker.unlink()
        (rootfs / "etc/pip.conf").write_text("[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n")
        shutil.rmtree(rootfs / "var/cache/apt/archives", ignore_errors=True)
        shutil.rmtree(rootfs / "var/lib/apt/lists", ignore_errors=True)
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        subprocess.run(
            ["podman", "import", "--change", 'CMD ["python3"]', "-", BASE_IMAGE],
            stdin=tar.stdout, check=True, capture_output=True, timeout=timeout,
        )
        tar.stdout.close()
        if tar.wait() != 0:
            raise RuntimeError("tar of the bootstrapped root file system failed")
    return BASE_IMAGE


def build_image(tag: str = IMAGE, timeout: float = 1800, extra: tuple[str, ...] = ()) -> str:
    """Build the repository's Dockerfile as `tag` (layers cached by podman between builds); return the tag."""
    ensure_base_image()
    env = dict(os.environ, BUILDAH_LAYERS="true")
    result = subprocess.run(
        ["podman", "--cgroup-manager", "cgroupfs", "build", *BUILD_FLAGS, "--layers", *extra, "-t", tag,
         str(REPO_ROOT)],
        capture_output=True, text=True, timeout=timeout, env=env,
    )
    if result.returncode != 0:
        raise RuntimeError(f"podman build failed ({result.returncode}):\n{result.stdout[-4000:]}\n"
                           f"{result.stderr[-4000:]}")
    return tag
