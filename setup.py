"""Ships the repository's ``configs/`` inside the wheel as ``detlab/configs``.

The configs stay at the top of the checkout, where Hydra users look for them and the ``detlab`` command
(``detlab.cli``, which train.py and the other scripts call) reads them; a non-editable install (``pip
install .``) has no checkout, so ``detlab.paths.config_dir()`` finds this copy instead. The console
script (``detlab = "detlab.cli:main"``) and everything else about the build are in pyproject.toml.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithConfigs(build_py):
    """``build_py``, then ``configs/`` copied into the built package."""

    def run(self) -> None:
        super().run()
        if not self.editable_mode:  # an editable install reads the checkout's configs/ in place
            self.copy_tree("configs", str(Path(self.build_lib) / "detlab" / "configs"))


setup(cmdclass={"build_py": BuildPyWithConfigs})
