"""``python -m hf_paged serve ...``: the ``hf-paged`` command line."""

import sys


def _main() -> int:
    try:
        from hf_paged.server.cli import main
    except ImportError as e:  # the serve extra is missing: say how to get it, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 1
    return main()


if __name__ == "__main__":
    sys.exit(_main())
