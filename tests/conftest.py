import sys
from pathlib import Path

import torch
from jaxtyping import install_import_hook

# tests/tiny.py (tiny random HF models) is imported as a plain module by the tests.
sys.path.insert(0, str(Path(__file__).parent))

# Every annotation in mmlens is checked at run time in the tests: a tensor of the wrong shape
# or dtype, or an argument of the wrong type, fails the test that passes it. The hook must be
# installed before mmlens is first imported.
install_import_hook("mmlens", "typecheck.typecheck")
# Tiny models run many small ops: one thread avoids stalls when the cores are shared.
torch.set_num_threads(1)
