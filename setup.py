"""Builds the compiled extension ``fastdd._C`` from ``csrc/``.

CPU kernels are always compiled. CUDA kernels (``csrc/cuda/*.cu``) are compiled only when a CUDA toolkit and a CUDA
build of torch are both present, or when ``FASTDD_CUDA=1`` forces it (``FASTDD_CUDA=0`` disables it).
The Triton kernels live in the top-level ``kernels/`` folder and are installed as ``fastdd.kernels``.
"""
import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "7.5;8.0;9.0+PTX"


def _want_cuda() -> bool:
    forced = os.environ.get("FASTDD_CUDA")
    if forced is not None:
        return forced == "1"
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME is not None and torch.version.cuda is not None and torch.cuda.is_available()


def _nvidia_dirs():
    """Include and library folders of the pip package ``nvidia`` (CUDA headers that match torch's CUDA)."""
    try:
        import nvidia
    except ImportError:
        return [], []
    includes, libs = [], []
    for base in getattr(nvidia, "__path__", []):
        for sub in sorted(glob.glob(os.path.join(base, "cu*"))):
            if os.path.isdir(os.path.join(sub, "include")):
                includes.append(os.path.join(sub, "include"))
            if os.path.isdir(os.path.join(sub, "lib")):
                libs.append(os.path.join(sub, "lib"))
    return includes, libs


def _extensions():
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    # torch's BuildExtension adds -std=c++20 (its headers need C++20) and, for py_limited_api, defines
    # Py_LIMITED_API as its minimum CPython; setting either here would override or clash with it.
    cxx_flags = ["-O3", "-fopenmp"]
    define_macros = []
    if _want_cuda():
        includes, libs = _nvidia_dirs()
        # Binaries for T4 (sm_75), A100 (sm_80) and H100 (sm_90), plus sm_90 PTX that the driver compiles for
        # newer cards (Blackwell); without PTX a card newer than the list gets no kernel at all.
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
        return [
            CUDAExtension(
                "fastdd._C",
                sources + sorted(glob.glob("csrc/cuda/*.cu")),
                include_dirs=includes,
                library_dirs=libs,
                define_macros=define_macros + [("FASTDD_WITH_CUDA", None)],
                extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
                extra_link_args=["-fopenmp"],
                py_limited_api=True,
            )
        ]
    return [
        CppExtension(
            "fastdd._C",
            sources,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
            py_limited_api=True,
        )
    ]


def _build_ext():
    from torch.utils.cpp_extension import BuildExtension

    class BuildAndRecordTorch(BuildExtension):
        """Also writes ``_C_build.json`` beside ``fastdd._C``: the torch it was compiled against, so that fastdd can
        refuse to load it under another torch (whose ABI it may not match) and fall back to its reference ops."""

        def build_extension(self, ext):
            super().build_extension(ext)
            import json

            import torch

            record = {"torch": torch.__version__, "cuda": torch.version.cuda,
                      "cuda_kernels": any(str(s).endswith(".cu") for s in ext.sources)}
            # Beside the library in build/ (what a wheel installs) and in the source package (what an editable or
            # in-place build loads: setuptools copies the library there after this method).
            folders = {os.path.dirname(self.get_ext_fullpath(ext.name)),
                       os.path.abspath(self.get_finalized_command("build_py").get_package_dir("fastdd"))}
            for folder in folders:
                os.makedirs(folder, exist_ok=True)
                with open(os.path.join(folder, "_C_build.json"), "w") as f:
                    json.dump(record, f)

    return BuildAndRecordTorch.with_options(no_python_abi_suffix=True)


setup(
    packages=[*find_packages(include=["fastdd", "fastdd.*"]), "fastdd.kernels"],
    package_dir={"fastdd.kernels": "kernels"},
    ext_modules=_extensions(),
    cmdclass={"build_ext": _build_ext()},
    # fastdd._C uses only the stable CPython ABI (torch defines Py_LIMITED_API as 3.10), so tag wheels abi3.
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
