"""Hook names checked before they are used: an unknown name raises with close matches.

``CheckedHooks`` sits in front of TransformerLens's ``HookedRootModule`` and checks every name
given to ``add_hook``, ``run_with_hooks``, ``hooks`` and ``run_with_cache`` against
``hook_dict``, so a typo fails loudly instead of silently hooking nothing.
"""

from __future__ import annotations

import difflib
from typing import Any

from transformer_lens import ActivationCache


class CheckedHooks:
    """Mixin for a ``HookedRootModule``: hook names are checked, caches are
    ``ActivationCache``\\ s of the model."""

    hook_dict: dict[str, Any]

    def run_with_cache(self, *model_args: Any, **kwargs: Any) -> tuple[Any, ActivationCache]:
        """Run and cache every (or the selected) activation; returns ``(out, ActivationCache)``."""
        names = kwargs.get("names_filter")
        if isinstance(names, str | list | tuple):  # names, not a predicate: check them first
            self.check_hook_names([names] if isinstance(names, str) else list(names))
        out, cache = super().run_with_cache(*model_args, **kwargs)
        if isinstance(cache, ActivationCache):
            return out, cache
        return out, ActivationCache(cache, self, has_batch_dim=not kwargs.get("remove_batch_dim"))

    def check_hook_names(self, names: list[str]) -> None:
        """Raise a helpful error for any name that is not a hook point of this model."""
        for name in names:
            if name not in self.hook_dict:
                close = difflib.get_close_matches(name, list(self.hook_dict), n=3, cutoff=0.5)
                hint = f" Did you mean {', '.join(close)}?" if close else ""
                raise KeyError(f"unknown hook name {name!r}.{hint} model.hook_dict lists them all")

    def add_hook(self, name: Any, hook: Any, dir: str = "fwd", is_permanent: bool = False,
                 **kwargs: Any) -> None:
        if isinstance(name, str):
            self.check_hook_names([name])
        super().add_hook(name, hook, dir=dir, is_permanent=is_permanent, **kwargs)

    def run_with_hooks(self, *model_args: Any, fwd_hooks: list = (), bwd_hooks: list = (),
                       **kwargs: Any) -> Any:
        """Run with temporary ``(name or filter, fn)`` hooks; unknown names raise first."""
        self.check_hook_names([n for n, _ in [*fwd_hooks, *bwd_hooks] if isinstance(n, str)])
        return super().run_with_hooks(*model_args, fwd_hooks=list(fwd_hooks),
                                      bwd_hooks=list(bwd_hooks), **kwargs)

    def hooks(self, fwd_hooks: list = (), bwd_hooks: list = (), *args: Any, **kwargs: Any) -> Any:
        """Context manager adding hooks for its block; unknown names raise first."""
        self.check_hook_names([n for n, _ in [*fwd_hooks, *bwd_hooks] if isinstance(n, str)])
        return super().hooks(list(fwd_hooks), list(bwd_hooks), *args, **kwargs)
