"""Where a model comes from (bundled name, local folder, hub name) and whether it can be read.

Every refusal says what was given, what is wrong with it and what to pass instead, before
anything slow runs: a hub name with no network fails at once instead of after transformers'
retries.
"""

from __future__ import annotations

import difflib
import os
import re
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from mmlens.core.errors import MMLensError, MMLensFileNotFoundError

HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_TRUE = ("1", "true", "yes", "on")


def resolve_source(name_or_path: str) -> tuple[str, bool]:
    """``(path or hub name, is_local)`` for a bundled name, a local folder or a hub name."""
    from mmlens.core.bundled import BUNDLED, resolve_bundled

    bundled = resolve_bundled(name_or_path)
    if bundled is not None:
        return str(bundled), True
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return str(path), True
    if path.exists():
        raise MMLensError(f"{name_or_path} is a file: pass the folder holding the model's "
                          "config.json and weights")
    if HUB_NAME.match(name_or_path) and not name_or_path.startswith("."):
        return name_or_path, False
    close = difflib.get_close_matches(name_or_path, list(BUNDLED), n=1, cutoff=0.6)
    if close:
        raise MMLensError(f"no model named {name_or_path!r}: did you mean {close[0]!r} (bundled)?")
    if "/" in name_or_path or "\\" in name_or_path or name_or_path.startswith(("~", ".")):
        raise MMLensFileNotFoundError(
            f"model folder {name_or_path} does not exist ({path.resolve()}): check the path, or "
            "give a hub name such as llava-hf/llava-1.5-7b-hf"
        )
    raise MMLensError(
        f"{name_or_path!r} is neither a bundled model ({', '.join(BUNDLED)}), an existing folder, "
        "nor a hub name (owner/name, e.g. llava-hf/llava-1.5-7b-hf)"
    )


def hub_offline() -> bool:
    """Whether the hub is switched off (``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE``)."""
    return any(os.environ.get(v, "").strip().lower() in _TRUE
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub's host answers on its port within ``timeout`` seconds.

    Behind a proxy (``HTTPS_PROXY``...) a direct connection says nothing: assume reachable.
    """
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def hub_options(repo_id: str) -> dict[str, Any]:
    """``from_pretrained`` options for hub model ``repo_id``: the cache only when offline.

    Raises at once when the model is neither cached nor reachable.
    """
    from huggingface_hub import try_to_load_from_cache

    cached = isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    offline = hub_offline()
    if not offline and hub_reachable():
        return {}
    if cached:
        return {"local_files_only": True}
    why = ("the hub is switched off (HF_HUB_OFFLINE=1)" if offline
           else "there is no network (the Hugging Face hub cannot be reached)")
    raise MMLensError(
        f"model {repo_id!r} is no local folder, not in the local Hugging Face cache, and {why}: "
        "download it on a "
        f"machine with network (`hf download {repo_id} --local-dir DIR`), then pass that folder "
        "(--model DIR), or use the bundled shapes-llava"
    )


def _grouped(keys: set[str] | list[str]) -> str:
    """``a.layers.2.*`` (9) for the tensors of one layer; other names as they are."""
    groups: dict[str, int] = {}
    for key in sorted(keys):
        match = re.match(r"(.*?\.layers\.\d+)\.", key)
        name = f"{match.group(1)}.*" if match else key
        groups[name] = groups.get(name, 0) + 1
    shown = [f"{g} ({n})" if n > 1 else g for g, n in groups.items()]
    more = f", ... {len(shown) - 8} more" if len(shown) > 8 else ""
    return ", ".join(shown[:8]) + more


def weight_problems(info: dict[str, Any]) -> str:
    """What ``from_pretrained(..., output_loading_info=True)`` reports wrong, or ``""``."""
    parts = []
    if info.get("missing_keys"):
        parts.append(f"{len(info['missing_keys'])} weights missing from the checkpoint: "
                     f"{_grouped(info['missing_keys'])}")
    if info.get("unexpected_keys"):
        parts.append(f"{len(info['unexpected_keys'])} weights in the checkpoint the config has "
                     f"no place for: {_grouped(info['unexpected_keys'])}")
    mismatched = info.get("mismatched_keys") or []
    if mismatched:
        names = [m[0] if isinstance(m, tuple | list) else str(m) for m in mismatched]
        parts.append(f"{len(names)} weights of the wrong shape: {_grouped(names)}")
    if info.get("error_msgs"):
        parts.append("; ".join(str(e) for e in info["error_msgs"])[:500])
    return "; ".join(parts)
