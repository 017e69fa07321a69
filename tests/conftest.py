import os
import sys
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# megatron-core warns at import about missing TE/apex; expected on CPU, noise in test output.
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex|apex).*")
