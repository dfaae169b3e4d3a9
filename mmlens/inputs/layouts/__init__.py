"""One module per image layout (``mmlens.inputs.token_map.ImageLayout``); a family picks one
with ``Family.image_layout``."""
