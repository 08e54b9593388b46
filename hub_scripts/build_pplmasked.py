"""Build a `<task>-pplmasked` Hub-layout dataset folder: one config per scoring model, parquet shards, card, figures.

The same pipeline as `trl-pplmask build` (see `trl_pplmask.hub.build_pplmasked`):

```bash
python hub_scripts/build_pplmasked.py --dataset gsm8k --splits train test \
    --models meta-llama/Llama-3.1-8B-Instruct google/gemma-2-2b-it --dtype bfloat16 \
    --output-dir gsm8k-pplmasked --repo-id trl-pplmask/gsm8k-pplmasked
python hub_scripts/push.py gsm8k-pplmasked --dry-run
```
"""

from __future__ import annotations

import sys

from trl_pplmask.commands import build


PROG = "python hub_scripts/build_pplmasked.py"


def main(argv: list[str] | None = None) -> int:
    return build.main(argv, prog=PROG)


if __name__ == "__main__":
    sys.exit(main())
