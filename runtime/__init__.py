"""ktpack.runtime.

The native CPU engine's threads own the cores while it runs; torch's OpenMP threads must sleep, not
spin, when their own (small) operations end, or the two pools fight over the same cores (measured on a
2-core machine: decode 3.6 tok/s with spinning OpenMP threads, 18 with passive ones). The variable only
takes effect if torch has not been imported yet; users may still set it themselves.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
