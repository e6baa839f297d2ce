"""The CLI's doors: the core stages import without the extras, and a command whose extra is missing says which
extra to install instead of a traceback."""

import subprocess
import sys

from ray_jobs import cli

EXTRA_MODULES = ("fastapi", "peft", "lm_eval", "ray.serve")


def test_the_core_stages_import_without_any_extra():
    blocked = "; ".join(f"sys.modules[{name!r}] = None" for name in EXTRA_MODULES)
    code = (f"import sys; {blocked}; "
            "import ray_jobs.demo, ray_jobs.pipeline, ray_jobs.warmup, ray_jobs.collect, ray_jobs.selfcheck, "
            "ray_jobs.select, ray_jobs.grade, qgate.demo_corpus, qgate.grading")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]


def test_a_missing_extra_names_the_extra_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "fastapi", None)
    monkeypatch.delitem(sys.modules, "serve.app", raising=False)
    assert cli.main(["serve", "--help"]) == 2
    assert "pip install 'qgate[serve]'" in capsys.readouterr().err


def test_every_command_with_an_extra_is_a_command():
    assert set(cli.EXTRAS) <= set(cli.COMMANDS)


def test_the_library_imports_neither_ray_nor_its_callers():
    """Every module of qgate/ imports without Ray, ray_jobs or serve installed: the layers only import downwards."""
    import pkgutil

    import qgate

    modules = [f"qgate.{m.name}" for m in pkgutil.iter_modules(qgate.__path__) if not m.ispkg]
    blocker = ("import sys\n"
               "class Block:\n"
               "    def find_spec(self, name, path=None, target=None):\n"
               "        if name.split('.')[0] in ('ray', 'ray_jobs', 'serve'):\n"
               "            raise ImportError(f'qgate imported {name}')\n"
               "sys.meta_path.insert(0, Block())\n"
               f"import {', '.join(modules)}\n")
    result = subprocess.run([sys.executable, "-c", blocker], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(modules) > 25
