"""`all_gather`, imported by `openrlhf.models.ring_attn_utils` for ring attention; raises if called."""

from ..bert_padding import _unavailable

all_gather = _unavailable
