"""The eqprop benchmark suite (`make bench`, i.e. `python benchmarks/run.py`): one module per
part (peak, step, memory, relax, data), shared models and timing in `common`, the report in
`report`, the command line in `run`."""
import os
import sys

# run from a checkout without installing: the library's sources come first
_SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
if os.path.isdir(_SRC) and _SRC not in sys.path:
    sys.path.insert(0, _SRC)
