import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# megatron-core warns at import about missing TE/apex; expected on CPU, noise in test output.
from megatron_spiral.quiet import quiet_backend_warnings  # noqa: E402

quiet_backend_warnings()
