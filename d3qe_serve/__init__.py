"""d3qe-serve: a serving stack for D³QE, the detector of images made by autoregressive generators.

One import root; its subpackages are the tiers, each a top-level folder of the repository:
`d3qe` (the eager model), `export` (build time), `serving` (runners, repository writer, server),
`model_repository` (the python-backend models Triton loads), `client` (no torch), `bulk`, `ui`,
`benchmarks` and `cli` (the `d3qe` command). `errors` and `contract` here are shared by every tier.

A wheel installs the tiers inside this package (pyproject's `package-dir`); in a checkout they stay the
repository's top-level folders, which the package's search path then includes, so the tree runs as it is
(Triton's python-backend stub, the GPU run) with or without an install.
"""

from __future__ import annotations

from pathlib import Path

__version__ = "0.1.0"

_checkout = Path(__file__).resolve().parent.parent
if not (Path(__file__).parent / "client").is_dir() and (_checkout / "client" / "__init__.py").is_file():
    __path__.append(str(_checkout))
