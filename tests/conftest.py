import sys
from pathlib import Path

import torch

# tests/tiny.py (tiny random HF models) is imported as a plain module by the tests.
sys.path.insert(0, str(Path(__file__).parent))
# Tiny models run many small ops: one thread avoids stalls when the cores are shared.
torch.set_num_threads(1)
