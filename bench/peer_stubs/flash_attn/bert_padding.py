"""The names `openrlhf.models.ring_attn_utils` imports; each raises if called (packing is off in serve_rm)."""


def _unavailable(*args: object, **kwargs: object) -> None:
    raise RuntimeError("flash_attn is a bench import stand-in here: sample packing is not available")


index_first_axis = pad_input = rearrange = unpad_input = _unavailable
