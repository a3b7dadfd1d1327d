import os
import sys

# Tests import the top-level modules (model, processor, ...) straight from the repo root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
