"""``HookedModel``: what code outside ``mmlens.model`` may use of a hooked multimodal model.

Methods and experiments take a ``HookedModel``, not ``Any``: the protocol names the surface
they rely on (config, processor, family, running with hooks and caches, the final norm and
unembedding), so another implementation of it works with them, and the test session checks
at run time that what they are given has it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn

from mmlens.model.config import MultimodalConfig
from mmlens.model.families.base import Family


@runtime_checkable
class HookedModel(Protocol):
    """A hooked multimodal model, as ``HookedMultimodalTransformer`` implements it."""

    cfg: MultimodalConfig
    processor: Any
    family: Family
    hook_dict: dict[str, Any]
    blocks: nn.ModuleList
    ln_final: nn.Module
    unembed: nn.Module

    @property
    def tokenizer(self) -> Any: ...

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...

    def run_with_hooks(self, *model_args: Any, fwd_hooks: Any = (), bwd_hooks: Any = (),
                       **kwargs: Any) -> Any: ...

    def run_with_cache(self, *model_args: Any, **kwargs: Any) -> tuple[Any, Any]: ...

    def hooks(self, fwd_hooks: Any = (), bwd_hooks: Any = (), *args: Any,
              **kwargs: Any) -> AbstractContextManager[Any]: ...

    def position_ids(self, input_ids: Tensor, attention_mask: Tensor | None = None, *,
                     image_sizes: Tensor | None = None) -> Tensor: ...

    def bind_images(self, pixel_values: Tensor,
                    image_sizes: Tensor | None = None) -> AbstractContextManager[None]: ...

    def check_hook_names(self, names: list[str]) -> None: ...

    def to_string(self, tokens: Tensor | list[int]) -> str | list[str]: ...

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]: ...
