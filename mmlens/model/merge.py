"""Placing image features into the token embeddings at the image-token positions."""

from __future__ import annotations

from jaxtyping import Float, Int
from torch import Tensor


def merge_image_features(
    input_ids: Int[Tensor, "batch pos"],
    embeds: Float[Tensor, "batch pos d_model"],
    features: Float[Tensor, "n_image_tokens d_model"] | None,
    image_token_id: int,
) -> Float[Tensor, "batch pos d_model"]:
    """Replace the embedding of every image token by the next image feature, in order.

    Raises when the image tokens and the features do not correspond one to one.
    """
    is_image = input_ids == image_token_id
    n_tokens = int(is_image.sum())
    if features is None:
        if n_tokens:
            raise ValueError(
                f"input_ids hold {n_tokens} image tokens but no pixel_values were given: pass "
                "pixel_values, or build the inputs with model.prepare(images, questions)"
            )
        return embeds
    if n_tokens == 0:
        raise ValueError(
            "pixel_values were given but input_ids hold no image token: put the image token in "
            "the prompt, or build the inputs with model.prepare(images, questions)"
        )
    if n_tokens != features.shape[0]:
        raise ValueError(
            f"{n_tokens} image tokens in input_ids but the images give {features.shape[0]} "
            "features: build the prompt with model.prepare(images, questions), which expands "
            "each image to the right number of tokens"
        )
    # On a model split across devices the features may come from another device.
    return embeds.masked_scatter(is_image[..., None], features.to(embeds.device, embeds.dtype))
