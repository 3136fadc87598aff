"""Import stand-in for flash_attn, put on the PYTHONPATH of OpenRLHF's `serve_rm` subprocess by bench/peer.py only.

OpenRLHF imports flash_attn at module level for sample packing (`openrlhf/models/ring_attn_utils.py`), which
`serve_rm` leaves off (`--ds.packing_samples` unset); flash_attn has no CPU build. Every name here raises if called,
so a code path that did use it would fail loudly instead of computing something else. Never installed anywhere.
"""

__version__ = "0.0.0+bench-stand-in"
