"""`python -m profiler.kernels model=<conf model> hardware=<conf hardware> [tp=1] [dtype=auto] [grid=default]`

Measures the kernels of the model's step on this machine's GPU and writes tables the
composed model reads (``python -m simulator perf=kernels perf.tables=<out>``). Without a
CUDA device it refuses; ``device=cpu`` is the CPU path for tests (tiny shapes only).
Bad input: one line naming the field, exit 2.
"""

from __future__ import annotations

import sys

from simulator.records.errors import ConfigError


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        from profiler.kernels.settings import parse

        print(__doc__.strip())
        print()
        print(parse.__doc__)
        return 0
    try:
        from profiler.kernels.run import run
        from profiler.kernels.settings import parse

        settings = parse(argv)
        folder = run(settings)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        from calibration.kernel_tables import load_table_dir

        summary = load_table_dir(folder.folder).rejections.summary()
    except ImportError as err:  # reading the tables back needs pyarrow, measuring them does not
        summary = f"written (not read back here: {err})"
    print(f"tables in {folder.folder}: {summary}")
    print(f"use them: python -m simulator perf=kernels perf.tables={folder.folder} model={settings.model.name} "
          f"hardware={settings.hardware.name} tp={settings.tp}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
