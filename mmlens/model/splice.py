"""Splicing a module into a hook point: what the hook point outputs becomes ``module(output)``.

    with model.saes([sae], use_error_term=True):      # model.saes calls splice
        logits, cache = model.run_with_cache(batch)
    cache["blocks.3.hook_resid_post.hook_sae_acts_post"]

A spliced module names the hook it sits on (``module.hook_name``); its own hook points are
registered in the model's hook dictionary under ``"{hook_name}.{its name}"`` for as long as the
splice lasts, so ``run_with_cache``, ``run_with_hooks`` and ``hooks`` reach them, and are gone
afterwards. The module runs as a forward hook of the hook point registered when the splice
starts: hooks added to that hook point later (``run_with_hooks`` inside the block) see and edit
the module's output; what they return flows on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

from torch import nn
from transformer_lens.hook_points import HookPoint

from mmlens.core.errors import MMLensError


@contextlib.contextmanager
def splice(model: Any, modules: Sequence[nn.Module], **settings: Any) -> Iterator[None]:
    """Within the block each module replaces its hook point's output with ``module(output)``.

    ``settings`` are set as attributes of every module for the block (e.g.
    ``use_error_term=True``) and restored after it.
    """
    modules = list(modules)
    names = [getattr(module, "hook_name", None) for module in modules]
    for module, name in zip(modules, names, strict=True):
        if not isinstance(name, str):
            raise MMLensError(f"{type(module).__name__} names no hook to sit on: give it a "
                              "hook_name (load_sae(path, hook_name=...))")
        model.check_hook_names([name])
    doubled = sorted({name for name in names if names.count(name) > 1})
    if doubled:
        raise MMLensError(f"two modules on {doubled[0]}: splice one per hook point")
    previous = [{key: getattr(module, key) for key in settings} for module in modules]
    handles, added = [], []
    try:
        for module, name in zip(modules, names, strict=True):
            for key, value in settings.items():
                setattr(module, key, value)
            handles.append(model.hook_dict[name].register_forward_hook(_runner(module)))
            for sub_name, point in module.named_modules():
                if isinstance(point, HookPoint):
                    full = f"{name}.{sub_name}"
                    if full in model.hook_dict:
                        raise MMLensError(f"{full} is already a hook point: a module is "
                                          f"spliced at {name} already; leave that block first")
                    point.name = full
                    model.hook_dict[full] = model.mod_dict[full] = point
                    added.append(full)
        yield
    finally:
        for handle in handles:
            handle.remove()
        for full in added:
            model.hook_dict[full].remove_hooks("both", including_permanent=True)
            del model.hook_dict[full], model.mod_dict[full]
        for module, values in zip(modules, previous, strict=False):
            for key, value in values.items():
                setattr(module, key, value)


def _runner(module: nn.Module) -> Any:
    def run(point: nn.Module, inputs: Any, output: Any) -> Any:
        return module(output)

    return run
