"""Fetch onnxruntime's C/C++ API headers for building the kernel library.

No PyPI package ships them; Debian's ``libonnxruntime-dev`` (trixie, onnxruntime 1.21, C API
21, MIT) does.  The package is fetched by name with ``apt-get download`` through a private
sources list derived from this machine's own apt sources (so no host is written here), its
sha256 is checked, and it is unpacked into the build directory.  Headers of C API 21 work with
any newer onnxruntime (the C API is versioned and backward compatible).

``ONNXGEN_ORT_INCLUDE=/path/to/include/onnxruntime`` skips all of this.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

PACKAGE = "libonnxruntime-dev"
VERSION = "1.21.0+dfsg-1"
SUITE = "trixie"
SHA256 = "14f7d959d5deacbcf1504830d4189f91fc67382b399ed9ae9d3aa9c4050ced08"
HEADER = "onnxruntime_cxx_api.h"


def _machine_mirrors() -> list[str]:
    """The Debian archive URIs this machine already uses (deb822 and one-line formats)."""
    uris: list[str] = []
    files = glob.glob("/etc/apt/sources.list.d/*.sources") + glob.glob("/etc/apt/sources.list.d/*.list")
    files += ["/etc/apt/sources.list"]
    for name in files:
        try:
            text = Path(name).read_text()
        except OSError:
            continue
        if name.endswith(".sources"):
            for block in text.split("\n\n"):
                if re.search(r"^Suites:.*\b(bookworm|trixie|sid|stable|testing)\b", block, re.M) and "debian-security" not in block:
                    uris += re.findall(r"^URIs:\s*(\S+)", block, re.M)
        else:
            for line in text.splitlines():
                match = re.match(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(bookworm|trixie|sid|stable|testing)\b", line)
                if match and "security" not in match.group(1):
                    uris.append(match.group(1))
    return list(dict.fromkeys(uris))


def _download(workdir: Path) -> Path:
    mirrors = _machine_mirrors()
    if not mirrors:
        raise RuntimeError("no Debian apt source on this machine to fetch libonnxruntime-dev from")
    for sub in ("lists/partial", "cache/archives/partial", "etc"):
        (workdir / sub).mkdir(parents=True, exist_ok=True)
    keyring = "/usr/share/keyrings/debian-archive-keyring.gpg"
    sources = "".join(
        f"Types: deb\nURIs: {uri}\nSuites: {SUITE}\nComponents: main\nSigned-By: {keyring}\n\n" for uri in mirrors
    )
    (workdir / "etc/onnxgen.sources").write_text(sources)
    options = [
        f"-o=Dir::Etc::sourcelist={workdir / 'etc/onnxgen.sources'}", "-o=Dir::Etc::sourceparts=-",
        f"-o=Dir::State::lists={workdir / 'lists'}", f"-o=Dir::Cache={workdir / 'cache'}",
        "-o=Dir::State::status=/dev/null", "-o=Debug::NoLocking=true", "-o=APT::Sandbox::User=root",
        "-o=APT::Architecture=amd64", "-qq",
    ]
    subprocess.run(["apt-get", *options, "update"], check=True, cwd=workdir)
    subprocess.run(["apt-get", *options, "download", f"{PACKAGE}={VERSION}"], check=True, cwd=workdir)
    (deb,) = workdir.glob(f"{PACKAGE}_*.deb")
    return deb


def headers(build_dir: str | os.PathLike) -> Path:
    """Return the directory holding onnxruntime_cxx_api.h, fetching it into ``build_dir`` if needed."""
    override = os.environ.get("ONNXGEN_ORT_INCLUDE")
    if override:
        if not (Path(override) / HEADER).exists():
            raise RuntimeError(f"ONNXGEN_ORT_INCLUDE={override} has no {HEADER}")
        return Path(override)
    root = Path(build_dir).resolve() / "ort-headers"
    include = root / "usr/include/onnxruntime"
    if (include / HEADER).exists():
        return include
    workdir = root / "apt"
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    deb = _download(workdir)
    digest = hashlib.sha256(deb.read_bytes()).hexdigest()
    if digest != SHA256:
        raise RuntimeError(f"{deb.name}: sha256 {digest} does not match the pinned {SHA256}")
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    shutil.rmtree(workdir)
    if not (include / HEADER).exists():
        raise RuntimeError(f"{deb.name} did not contain {HEADER}")
    return include


if __name__ == "__main__":
    print(headers(sys.argv[1] if len(sys.argv) > 1 else "build"))
