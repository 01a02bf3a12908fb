"""The README's configuration table lists exactly the settings the code reads."""

import re
from pathlib import Path

from common.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def test_readme_documents_every_setting():
    readme = (ROOT / "README.md").read_text()
    documented = set(re.findall(r"^\| `(SDXL_[A-Z0-9_]+)` \|", readme, flags=re.M))
    expected = {f"SDXL_{name.upper()}" for name in Settings.model_fields}
    assert documented == expected
