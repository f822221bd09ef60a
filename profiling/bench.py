"""The benchmark suite from a source checkout: ``python profiling/bench.py [options]`` is
``python -m cugrad bench [options]`` with this checkout's cugrad (see cugrad/bench.py).

    python profiling/bench.py                  # every figure, ~2-4 minutes on an H100
    python profiling/bench.py --quick --only gemm --out /tmp/gemm.json
    python profiling/bench.py --list
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout

from cugrad.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
