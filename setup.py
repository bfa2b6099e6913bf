"""Builds jacobian_ext._C against the torch that will run it (pip install --no-build-isolation -e .).

CUDA sources are compiled whenever torch is a CUDA build and nvcc is found, with or without a GPU;
otherwise the build is CPU-only. Environment knobs:
  JACEXT_FORCE_CPU=1       build without CUDA even when it is available
  TORCH_CUDA_ARCH_LIST     GPU architectures (default: Ampere and Hopper, "8.0;9.0")
  CUDA_HOME                the CUDA toolkit (default: found from nvcc, see find_cuda_home)
  JACEXT_SANITIZE=1        CPU-only build with AddressSanitizer and UndefinedBehaviorSanitizer, objects in
                           build/temp-sanitize (`make sanitize`: use with build_ext --build-lib DIR so the
                           normal in-place library and its build record stay untouched)
"""
import glob
import os
import shutil
import sys
import sysconfig

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0"


def find_cuda_home():
    """The toolkit folder behind nvcc. `nvcc` on PATH may be a wrapper script in /usr/local/bin, which
    makes torch's own guess (the parent of nvcc's folder) wrong: look for the folder that holds
    include/cuda_runtime.h instead."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    candidates = []
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        try:
            with open(nvcc, "rb") as wrapper:  # a wrapper script names the real nvcc
                for word in wrapper.read(4096).decode(errors="ignore").split():
                    if word.endswith("/bin/nvcc"):
                        candidates.append(os.path.dirname(os.path.dirname(word)))
        except OSError:
            pass
    candidates += ["/usr/local/cuda"]
    for folder in candidates:
        if os.path.isfile(os.path.join(folder, "include", "cuda_runtime.h")) and os.path.isfile(
            os.path.join(folder, "bin", "nvcc")
        ):
            return folder
    return None


def pip_nvidia_include_dirs():
    """Headers (cuBLAS, cuSPARSE, ...) that ATen's CUDA headers include but a bare toolkit may lack;
    the pip `nvidia` packages that come with a CUDA build of torch carry them."""
    site = sysconfig.get_paths()["purelib"]
    return sorted(glob.glob(os.path.join(site, "nvidia", "cu*", "include"))) + sorted(
        glob.glob(os.path.join(site, "nvidia", "*", "include"))
    )


cuda_home = find_cuda_home()
if cuda_home:
    os.environ["CUDA_HOME"] = cuda_home  # before torch.utils.cpp_extension reads it

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def cxx_runtime_link_args():
    """Links the C++ runtime that torch runs on, the shared libstdc++ this process has loaded, by its path.
    A toolchain may otherwise link a static copy into our library (seen on a GPU server, whose Python's g++
    wrapper did, so that even -lstdc++ found only the archive): that copy keeps its own locale state, and
    formatting a number into an error message segfaulted in it. A library named by its path is linked
    dynamically whatever -Bstatic or -static-libstdc++ the toolchain adds."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1]
                if os.path.basename(path).startswith("libstdc++.so"):
                    return [path]
    except OSError:  # not Linux
        pass
    return ["-lstdc++"]


sanitize = os.environ.get("JACEXT_SANITIZE", "0") == "1"
cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
with_cuda = (
    torch.version.cuda is not None
    and cuda_home is not None
    and bool(cuda_sources)
    and os.environ.get("JACEXT_FORCE_CPU", "0") != "1"
    and not sanitize
)
cpp_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))

# -fopenmp: torch's at::parallel_for is inline and runs serially unless the including code is compiled
# with OpenMP (ATen's OpenMP backend); linking it resolves to the libgomp.so.1 that torch already loads.
cxx_flags = ["-O3", "-std=c++20", "-fvisibility=hidden", "-fopenmp"]
link_flags = ["-fopenmp", *cxx_runtime_link_args()]
if sanitize:
    sanitizers = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"]
    cxx_flags = ["-O1", "-g", "-std=c++20", "-fvisibility=hidden", "-fopenmp"] + sanitizers
    link_flags = ["-fopenmp", *cxx_runtime_link_args()] + sanitizers
define_macros = [("Py_LIMITED_API", "0x030A0000")]
if with_cuda:
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    define_macros.append(("JACEXT_WITH_CUDA", None))
    extension = CUDAExtension(
        "jacobian_ext._C",
        cpp_sources + cuda_sources,
        include_dirs=[os.path.join(ROOT, "csrc")] + pip_nvidia_include_dirs(),
        define_macros=define_macros,
        # C++20 for nvcc as for the host compiler: recent torch headers refuse anything older (ATen.h).
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++20", "--expt-relaxed-constexpr"]},
        extra_link_args=link_flags,
        py_limited_api=True,
    )
else:
    extension = CppExtension(
        "jacobian_ext._C",
        cpp_sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=link_flags,
        py_limited_api=True,
    )


class BuildWithInfo(BuildExtension):
    """Records what the library was built against, so that importing it under another torch fails
    with a clear message instead of an undefined-symbol error."""

    def finalize_options(self):
        super().finalize_options()
        # A fixed object folder (pip's editable builds otherwise use a fresh temporary one), so that
        # ninja recompiles only the sources that changed.
        self.build_temp = os.path.join(ROOT, "build", "temp-sanitize" if sanitize else "temp")

    def run(self):
        # The sanitizer build records itself next to its own library, never over the normal build's record.
        package = os.path.join(self.build_lib, "jacobian_ext") if sanitize else os.path.join(ROOT, "jacobian_ext")
        os.makedirs(package, exist_ok=True)
        info = os.path.join(package, "_build_info.py")
        with open(info, "w") as f:
            f.write("# Written by setup.py at build time; not tracked by git.\n")
            f.write(f"TORCH_VERSION = {torch.__version__!r}\n")
            f.write(f"CUDA_VERSION = {torch.version.cuda if with_cuda else None!r}\n")
            f.write(f"WITH_CUDA = {with_cuda!r}\n")
            f.write(f"CUDA_ARCHS = {os.environ.get('TORCH_CUDA_ARCH_LIST') if with_cuda else None!r}\n")
        print(f"jacobian_ext: building with CUDA={with_cuda} against torch {torch.__version__}", file=sys.stderr)
        super().run()


setup(
    name="jacobian_ext",
    version="0.1.0",
    description="Per-sample Jacobians of neural networks in one fused pass (PyTorch C++/CUDA extension)",
    packages=["jacobian_ext"],
    ext_modules=[extension],
    cmdclass={"build_ext": BuildWithInfo.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
    python_requires=">=3.10",
    install_requires=["torch>=2.4"],
)
