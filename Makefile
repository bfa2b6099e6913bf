# jacobian_ext: `make demo` runs the main job, `make test` the tests; both set everything up first
# (a .venv with torch and the build tools, then the extension, rebuilt only when a source changed).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# A CUDA build of torch, so that the CUDA sources compile even on a machine without a GPU.
TORCH_SPEC ?= torch==2.14.1
BUILD_TOOLS := ninja setuptools
TEST_TOOLS := pytest numpy torchvision hypothesis tqdm captum
LIBRARY := jacobian_ext/_C.abi3.so
SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' -o -name '*.def') setup.py

.PHONY: setup build cpp demo test test-slow test-captum fuzz sanitize bench bench-peers clean

setup: $(VENV)/.deps-installed

$(VENV)/.deps-installed: Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)" $(BUILD_TOOLS) $(TEST_TOOLS)
	touch $@

build: $(LIBRARY)

# pip builds in build/temp with ninja, so only changed sources are recompiled.
$(LIBRARY): $(VENV)/.deps-installed $(SOURCES)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

demo: build
	$(PY) examples/demo.py
	$(PY) -m jacobian_ext.explain --demo build/explain_demo.png

test: build cpp
	$(PY) -m pytest -q -m "not slow" tests

# The C++ library and examples/cpp/jacobian_demo with CMake against the .venv's LibTorch (README "Deploying";
# tests/test_cpp.py runs the program). The system's cmake, else one pip-installed into the .venv (< 3.28, the
# releases that torch's CMake files are written for).
CPP_BUILD := build/cpp
CMAKE := $(shell command -v cmake || echo $(VENV)/bin/cmake)
cpp: setup
	test -x "$(CMAKE)" || $(PY) -m pip install -q "cmake<3.28"
	"$(CMAKE)" -S . -B $(CPP_BUILD) -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch;print(torch.utils.cmake_prefix_path)')"
	"$(CMAKE)" --build $(CPP_BUILD) -j $$(nproc)

# Tests that take minutes (AOTInductor packaging of the exported Jacobian).
test-slow: build
	$(PY) -m pytest -q -m slow tests

# Long property-based run (tests/hypothesis_profiles.py): thousands of random models per property.
fuzz: build
	HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest -q tests/test_properties.py

# The extension built with AddressSanitizer + UndefinedBehaviorSanitizer (CPU only, objects in
# build/temp-sanitize, package in build/sanitize; the normal build is untouched), then the core tests
# against it. Python itself leaks by design, hence detect_leaks=0; any sanitizer report fails the run.
# triton's bundled LLVM aborts under a preloaded libasan: a stub that raises ImportError hides it (torch
# then runs without triton). libstdc++ is preloaded too, or ASan's __cxa_throw interceptor finds no real
# __cxa_throw (python does not link libstdc++) and aborts on the first C++ exception.
SANITIZE_LIB := build/sanitize
SANITIZE_TESTS := test_build.py test_rules.py test_errors.py test_opcheck.py test_api.py test_hostile.py
sanitize: setup
	JACEXT_SANITIZE=1 MAX_JOBS=$${MAX_JOBS:-1} $(PY) setup.py -q build_py --build-lib $(SANITIZE_LIB) \
		build_ext --build-lib $(SANITIZE_LIB)
	mkdir -p $(SANITIZE_LIB)/triton
	echo 'raise ImportError("triton is disabled under the sanitizers")' > $(SANITIZE_LIB)/triton/__init__.py
	cd $(SANITIZE_LIB) && LD_PRELOAD="$$(c++ -print-file-name=libasan.so) $$(c++ -print-file-name=libstdc++.so)" \
		ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
		$(abspath $(PY)) -m pytest -q -p no:cacheprovider --rootdir=$(CURDIR) \
		$(addprefix $(CURDIR)/tests/,$(SANITIZE_TESTS))

# The benchmark suite (bench/README.md): about 5-10 minutes, writes bench/RESULTS.md and results.png.
bench: build
	$(PY) -m bench --memory --plot

# Optional peers and extras: JAX (CPU), matplotlib for the plot, timm for bench.models' timm set.
bench-peers: setup
	$(PY) -m pip install -q jax jaxlib matplotlib timm

clean:
	rm -rf build $(LIBRARY) jacobian_ext/_build_info.py *.egg-info

# Captum's own tests of the classes jacobian_ext.explain replaces (explain.CAPTUM_CLASSES), run on ours
# (tests/captum_swap.py).
# CAPTUM_SRC: a checkout of pytorch/captum (its tests/ and captum/ folders); the tests run against that
# checkout's captum package, so they match it. Skipped when CAPTUM_SRC is unset or holds no tests.
CAPTUM_TESTS := test_saliency.py test_input_x_gradient.py test_integrated_gradients_basic.py \
	test_integrated_gradients_classification.py test_gradient_shap.py test_targets.py test_hook_removal.py \
	layer/test_layer_integrated_gradients.py layer/test_layer_gradient_x_activation.py
test-captum: build
	@if [ -z "$(CAPTUM_SRC)" ] || [ ! -d "$(CAPTUM_SRC)/tests/attr" ]; then \
		echo "test-captum: skipped (set CAPTUM_SRC to a pytorch/captum checkout)"; \
	else \
		PYTHONPATH="$(CURDIR):$(CURDIR)/tests:$(abspath $(CAPTUM_SRC))" $(abspath $(PY)) -m pytest -q \
			-p captum_swap -p no:cacheprovider --rootdir="$(abspath $(CAPTUM_SRC))" \
			$(addprefix $(abspath $(CAPTUM_SRC))/tests/attr/,$(CAPTUM_TESTS)) $(PYTEST_ARGS); \
	fi
