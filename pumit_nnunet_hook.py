"""Interpreter start-up hook (imported by ``pumit_nnunet.pth``): let stock nnU-Net find the PUMIT trainers.

It appends our trainer folder to ``nnUNet_extTrainer`` (nnU-Net >= 2.8's external-trainer lookup) without
overwriting what the user set, imports nothing heavy, and never raises. Opt out with ``PUMIT_NNUNET_NO_HOOK=1``.
"""

import os

_SHIM = "pumit_nnunet_trainers.py"


def trainer_folder() -> "str | None":
    """The folder holding ``pumit_nnunet_trainers.py``, found beside the ``pumit_nnunet`` package that Python imports:
    ``pumit_nnunet/_nnunet_trainers`` in a wheel, ``trainers/`` in a source checkout. Looking beside the package (not
    beside this hook) matters for editable installs: the build copies ``trainers/`` next to the hook in site-packages,
    and that copy goes stale as soon as the checkout is edited. ``find_spec`` locates the package without importing it."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("pumit_nnunet")
    except (ImportError, ValueError):
        spec = None
    packages = list(spec.submodule_search_locations or []) if spec is not None else []
    here = os.path.dirname(os.path.abspath(__file__))
    candidates = [os.path.join(p, "_nnunet_trainers") for p in packages]
    candidates += [os.path.join(os.path.dirname(p), "trainers") for p in packages]
    candidates += [os.path.join(here, "pumit_nnunet", "_nnunet_trainers"), os.path.join(here, "trainers")]
    for folder in candidates:
        if os.path.isfile(os.path.join(folder, _SHIM)):
            return folder
    return None


def _warn_not_registered(error: BaseException) -> None:
    """One stderr line: without it nnU-Net later fails with an obscure "cannot find PumitPercentileZScore...".
    Stdlib-only and never raises (it runs inside nnU-Net's import)."""
    try:
        import sys

        reason = " ".join(f"{type(error).__name__}: {error}".split())
        sys.stderr.write("pumit-nnunet: warning: could not register the PUMIT normalisation schemes in nnU-Net "
                         f"({reason}); plans that use them will fail\n")
    except Exception:
        pass


class _RegisterNormalizationAfterImport:
    """Meta-path finder: once nnU-Net's normalisation module has been imported (in any process, also its ``spawn``
    workers), add the PUMIT normalisation schemes to it, so plans can name them (nnU-Net looks nowhere else; see
    ``pumit_nnunet.nnunet.recipe_normalization``). Finds nothing itself: the normal finders load the module."""

    target = "nnunetv2.preprocessing.normalization.default_normalization_schemes"

    def find_spec(self, name, path=None, target=None):
        if name != self.target:
            return None
        import importlib.machinery

        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            try:
                from pumit_nnunet.nnunet.recipe_normalization import register

                register()
            except Exception as error:  # never break nnU-Net's import, but say why PUMIT plans will fail later
                _warn_not_registered(error)

        spec.loader.exec_module = exec_module  # a fresh loader object per spec: nothing shared is changed
        return spec


def install() -> None:
    if os.environ.get("PUMIT_NNUNET_NO_HOOK"):
        return
    try:
        import sys

        if not any(isinstance(f, _RegisterNormalizationAfterImport) for f in sys.meta_path):
            sys.meta_path.insert(0, _RegisterNormalizationAfterImport())
        folder = trainer_folder()
        if folder is None:
            return
        current = [p for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
        if folder not in current:
            os.environ["nnUNet_extTrainer"] = os.pathsep.join(current + [folder])
    except Exception:  # a start-up hook must never break the interpreter
        pass
