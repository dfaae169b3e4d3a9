"""Multimodal rotary positions (M-RoPE) of the Qwen2-VL decoder.

Every position has three ids ``(t, h, w)``. Text tokens carry the same id three times, counting
on from the previous token; the tokens of an image carry ``(start, start + row, start + col)``
over its merged grid, and the text after it continues at ``start + max(rows, cols)``::

    text: 0 1 2 | image 2x3: t 3 3 3 3 3 3  h 3 3 3 4 4 4  w 3 4 5 3 4 5 | text: 6 7 ...

The rotary angles of a head dimension come from one of the three ids: the first
``mrope_section[0]`` frequencies from ``t``, the next ``mrope_section[1]`` from ``h``, the rest
from ``w``. Qwen3-VL interleaves them instead: frequency ``i`` reads ``h`` when ``i % 3 == 1``
and ``i < 3 * mrope_section[1]``, ``w`` when ``i % 3 == 2`` and ``i < 3 * mrope_section[2]``,
else ``t``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor


class MRotaryEmbedding:
    """cos/sin tables ``[batch, pos, 1, d_head]`` for 3D positions ``[3, batch, pos]``.

    Plain ``[batch, pos]`` ids are text-only positions (all three ids equal), so the same
    object serves cached decoding steps.
    """

    def __init__(self, inv_freq: Tensor, mrope_section: Sequence[int],
                 attention_scaling: float = 1.0, interleaved: bool = False):
        if sum(mrope_section) != inv_freq.shape[0]:
            raise ValueError(f"mrope_section {list(mrope_section)} must add up to d_head / 2 = "
                             f"{inv_freq.shape[0]}")
        # A plain attribute, not a buffer: model.to(bfloat16) must not round the frequencies.
        self.inv_freq = inv_freq.detach().float().cpu()
        self.mrope_section = list(mrope_section)
        self.attention_scaling = attention_scaling
        # Which of the three ids (t, h, w) each frequency reads (on the host: models are built
        # on the meta device).
        cpu = torch.device("cpu")
        if interleaved:
            index = torch.arange(inv_freq.shape[0], device=cpu)
            axis = torch.zeros_like(index)
            for dim in (1, 2):
                axis[(index % 3 == dim) & (index < 3 * self.mrope_section[dim])] = dim
        else:
            axis = torch.cat([torch.full((n,), i % 3, device=cpu)
                              for i, n in enumerate(self.mrope_section)])
        self.axis = axis

    @torch.no_grad()
    def __call__(
        self, position_ids: Int[Tensor, "3 batch pos"] | Int[Tensor, "batch pos"],
        dtype: torch.dtype,
    ) -> tuple[Float[Tensor, "batch pos 1 d_head"], Float[Tensor, "batch pos 1 d_head"]]:
        if position_ids.ndim == 2:
            position_ids = position_ids[None].expand(3, -1, -1)
        freqs = position_ids[..., None].float() * self.inv_freq.to(position_ids.device)
        # freqs [3, batch, pos, d_head / 2] -> [batch, pos, d_head / 2]: frequency i reads id
        # axis[i].
        axis = self.axis.to(freqs.device)[None, None, None].expand(1, *freqs.shape[1:])
        freqs = freqs.gather(0, axis)[0]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.attention_scaling).to(dtype)
        sin = (emb.sin() * self.attention_scaling).to(dtype)
        return cos[:, :, None, :], sin[:, :, None, :]


def image_position_ids(start: int, grid_thw: Sequence[int], merge_size: int
                       ) -> Int[Tensor, "3 n_tokens"]:
    """``(t, h, w)`` ids of one image's merged tokens in row-major order, offset by ``start``."""
    t, h, w = (int(grid_thw[0]), int(grid_thw[1]) // merge_size, int(grid_thw[2]) // merge_size)
    tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([tt, hh, ww]).reshape(3, -1) + start


def mrope_position_ids(
    input_ids: Int[Tensor, "batch pos"],
    image_grid_thw: Int[Tensor, "images 3"] | None,
    image_token_id: int,
    merge_size: int,
    attention_mask: Int[Tensor, "batch pos"] | None = None,
) -> tuple[Int[Tensor, "3 batch pos"], Int[Tensor, "batch 1"]]:
    """3D position ids of a (left padded) batch and each row's ``delta``.

    Images are consumed in order, each by ``t * h * w / merge_size**2`` image tokens; padding
    positions get id 0. ``delta`` is ``max id + 1 - n_real_tokens``: a token decoded after the
    prompt at real index ``i`` has ids ``i + delta``. Raises when the image tokens and
    ``image_grid_thw`` do not correspond.
    """
    batch, length = input_ids.shape
    device = input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    grids = [] if image_grid_thw is None else [tuple(g) for g in image_grid_thw.tolist()]
    position_ids = torch.zeros(3, batch, length, dtype=torch.long)
    deltas = torch.zeros(batch, 1, dtype=torch.long)
    next_image = 0
    for row in range(batch):
        real = attention_mask[row].bool().cpu()
        is_image = (input_ids[row].cpu() == image_token_id)[real].tolist()
        ids, current, index = [], 0, 0
        while index < len(is_image):
            if not is_image[index]:
                ids.append(torch.full((3, 1), current, dtype=torch.long))
                current, index = current + 1, index + 1
                continue
            if next_image >= len(grids):
                raise ValueError(f"row {row} holds more images than image_grid_thw describes "
                                 f"({len(grids)}): pass the processor's image_grid_thw")
            grid = grids[next_image]
            n_tokens = grid[0] * grid[1] * grid[2] // merge_size**2
            if index + n_tokens > len(is_image) or not all(is_image[index:index + n_tokens]):
                raise ValueError(f"row {row}: image {next_image} has grid {list(grid)}, i.e. "
                                 f"{n_tokens} tokens, but the prompt has fewer image tokens "
                                 "there: build the inputs with model.prepare")
            ids.append(image_position_ids(current, grid, merge_size))
            current += max(grid[1], grid[2]) // merge_size
            index += n_tokens
            next_image += 1
        row_ids = torch.cat(ids, dim=1) if ids else torch.zeros(3, 0, dtype=torch.long)
        position_ids[:, row, real] = row_ids
        deltas[row, 0] = (int(row_ids.max()) + 1 if row_ids.numel() else 0) - len(is_image)
    if next_image != len(grids):
        raise ValueError(f"image_grid_thw describes {len(grids)} images but the prompts hold "
                         f"{next_image}: give one grid row per image, in order")
    return position_ids.to(device), deltas.to(device)
