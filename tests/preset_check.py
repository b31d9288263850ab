"""Test helper: presets load, cite a source, build their method's options and use a declared setting."""
from sparsecl.config import build_options, load_preset, load_yaml, preset_dir
from sparsecl.methods import METHODS


def check_presets(names: list[str]) -> None:
    for name in names:
        raw = load_yaml(preset_dir() / f"{name}.yaml")
        assert raw["description"] and raw["source"], name
        p = load_preset(name)
        cls = METHODS.get(p["method"])
        build_options(cls.options_cls, p["method_options"], name)
        assert p.get("setting", "class-il") in cls.settings, name
