"""What all framework integrations share: an ImportError naming the extra, and a core that never imports them."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

INTEGRATIONS = [("lm_eval", "lm_eval", "lm-eval"), ("llm", "llm", "llm"),
                ("inspect_ai", "inspect_ai", "inspect"), ("trl", "trl", "trl")]


@pytest.mark.parametrize(("module", "framework", "extra"), INTEGRATIONS)
def test_missing_framework_names_the_extra(module, framework, extra, monkeypatch):
    monkeypatch.setitem(sys.modules, framework, None)  # makes `import framework` raise ImportError
    monkeypatch.delitem(sys.modules, f"hf_paged.integrations.{module}", raising=False)
    with pytest.raises(ImportError, match=rf"pip install 'hf-paged\[{extra}\]'"):
        importlib.import_module(f"hf_paged.integrations.{module}")


def test_core_does_not_import_frameworks():
    code = (
        "import sys, hf_paged, hf_paged.integrations, hf_paged.engine\n"
        "loaded = [m for m in ('lm_eval', 'llm', 'inspect_ai', 'trl') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
