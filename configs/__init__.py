"""moerun's presets, shipped as the package data of ``moerun.configs``: models/ (HF-style
config.json), hardware/, strategies/ and claims/ (TOML). ``CONFIG_DIR`` finds them both in
a checkout (editable install) and in an installed wheel."""
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent
