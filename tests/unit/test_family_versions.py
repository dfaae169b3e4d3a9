"""A family verified only from a newer ``transformers`` than the package's lower bound refuses
older versions at load time, naming the version to install; the others load."""

import importlib

import pytest

from mmlens.model.families import FAMILIES, family_for


def _transformers():
    """The module ``import transformers`` gives now (another test may have re-imported it)."""
    return importlib.import_module("transformers")


def test_a_family_refuses_a_transformers_older_than_its_minimum(monkeypatch):
    monkeypatch.setattr(_transformers(), "__version__", "5.14.0")
    for name in ("mllama", "paligemma", "idefics3", "smolvlm"):
        with pytest.raises(ImportError, match=r"transformers>=5\.(23|18) \(found 5\.14\.0\)"):
            family_for(name)
    for name in ("llava", "llava_next", "qwen2_vl", "gemma3", "qwen3_vl", "internvl"):
        assert family_for(name).name == name


def test_every_minimum_is_within_the_packages_bounds():
    from packaging.version import Version

    for family in set(FAMILIES.values()):
        if family.min_transformers is not None:
            assert Version("5.14") < Version(family.min_transformers) < Version("5.26")
        else:
            assert family_for(family.name) is family  # loads on the installed version


def test_the_installed_transformers_loads_exactly_the_families_verified_on_it():
    """Run on the newest and on the oldest allowed versions (.ci/run)."""
    from packaging.version import Version

    installed = Version(_transformers().__version__)
    for name, family in FAMILIES.items():
        if family.min_transformers and installed < Version(family.min_transformers):
            with pytest.raises(ImportError, match=f"needs transformers>={family.min_transformers}"):
                family_for(name)
        else:
            assert family_for(name) is family
