#!/usr/bin/env python
"""Print the requirements (from a requirements file) that the running interpreter does not satisfy.

    python scripts/unmet_requirements.py requirements.txt megatron-core transformers ...

Only the named packages are considered (all of the file's when none is named); each unmet one is
printed as its line's specifier (e.g. ``megatron-core>=0.16.1,<0.17``), one per line, so a caller
can pass them to pip. scripts/gpu_check.sh uses it to install only what a GPU machine's own
Python lacks, next to that machine's CUDA torch; with ``--all`` it prints the named ones met or
not (scripts/gpu_wheels.sh: wheels for another machine). Needs only ``packaging``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
from typing import Iterable, List

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


def read_requirements(path: str) -> List[Requirement]:
    requirements = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            text = line.split("#", 1)[0].strip()
            if text and not text.startswith("-"):
                requirements.append(Requirement(text))
    return requirements


def satisfied(requirement: Requirement) -> bool:
    try:
        version = importlib.metadata.version(requirement.name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return requirement.specifier.contains(version, prereleases=True)


def unmet(requirements: Iterable[Requirement], names: Iterable[str] = (), met_too: bool = False) -> List[str]:
    wanted = {canonicalize_name(name) for name in names}
    known = {canonicalize_name(r.name) for r in requirements}
    unknown = sorted(wanted - known)
    if unknown:
        raise SystemExit(f"unmet_requirements.py: {', '.join(unknown)} not in the requirements file")
    return [str(r) for r in requirements
            if (not wanted or canonicalize_name(r.name) in wanted) and (met_too or not satisfied(r))]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("requirements_file")
    parser.add_argument("names", nargs="*", help="packages to consider (default: every line)")
    parser.add_argument("--all", action="store_true", help="print the named requirements, met or not")
    args = parser.parse_args(argv)
    for line in unmet(read_requirements(args.requirements_file), args.names, met_too=args.all):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
