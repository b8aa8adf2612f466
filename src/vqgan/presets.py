"""Named configurations shipped with the package (`vqgan train-tokenizer small-cpu`)."""
from __future__ import annotations

from pathlib import Path

CONFIG_DIR = Path(__file__).parent / "configs"
# names that moved: small-cpu's FSQ recipe became small-cpu itself (its old VQ recipe is small-cpu-vq)
ALIASES = {"small-cpu-fsq": "small-cpu"}


def preset_names(stage: str = "tokenizer") -> list[str]:
    """The shipped presets of a stage, `tokenizer` or `prior` (their names end in -prior); aliases left out."""
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    return [n for n in names if n.endswith("-prior") == (stage == "prior")]


def resolve_config_path(name_or_path: str) -> Path:
    """A YAML path as given, or the file of a named preset."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        return p
    preset = CONFIG_DIR / f"{ALIASES.get(name_or_path, name_or_path)}.yaml"
    if preset.is_file():
        return preset
    from .errors import UserError

    raise UserError(f"{name_or_path!r} is neither a config file nor a preset; tokenizer presets: "
                    f"{', '.join(preset_names())}; prior presets: {', '.join(preset_names('prior'))}")
