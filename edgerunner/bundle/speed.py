"""Speed ratios shared by the planner (pack/) and the systemd unit's timeouts (bundle/unit.py).

They live in bundle/, the lower layer, so that both can import them: pack may import bundle,
bundle may not import pack.
"""

from __future__ import annotations

# CPU prompt processing is compute-bound and runs several times faster than decode; 4x is the
# low end on ARM boards, so the estimate of the longest prompt's duration stays pessimistic.
PROMPT_SPEEDUP = 4.0
