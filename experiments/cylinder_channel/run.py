"""Generate the channel-with-cylinder case: mesh with gmsh, then the `vcnn generate` pipeline.

Usage: python experiments/cylinder_channel/run.py [--size 0.03] [--out results/cylinder_channel]
"""

import argparse
from pathlib import Path

from meshes.channel import channel_with_cylinder_msh
from vcnn.cli import main as vcnn_main

CONFIG = Path(__file__).with_name("config.toml")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=float, default=0.03, help="cell size away from the cylinder")
    parser.add_argument("--out", type=Path, default=Path("results/cylinder_channel"))
    args = parser.parse_args(argv)
    msh = channel_with_cylinder_msh(args.out / "channel.msh", size=args.size)
    return vcnn_main(
        ["generate", "--config", str(CONFIG), "--mesh-file", str(msh), "--out", str(args.out)]
    )


if __name__ == "__main__":
    raise SystemExit(main())
