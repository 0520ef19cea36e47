"""Join chunk results of one preset into one JSON, table and plot:

    python benchmarks/report.py benchmarks/results/chunks/gpu-*.json --stem gpu
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lazyprefill import bench


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("chunks", type=Path, nargs="+")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--stem", required=True)
    args = p.parse_args()
    result = bench.merge([json.loads(path.read_text()) for path in args.chunks])
    bench.write(result, args.out, args.stem)
    print(bench.markdown(result))


if __name__ == "__main__":
    main()
