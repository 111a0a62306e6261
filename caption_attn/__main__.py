"""`python -m caption_attn` is the same as the `caption-attn` console script."""

import sys

from caption_attn.cli import entry

if __name__ == "__main__":
    sys.exit(entry())
