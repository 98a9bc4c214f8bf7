# The README's two commands: `make serve` and `make test`.
.PHONY: serve test lint crds dashboards

serve:  ## install (first time) and serve SmolLM2-135M-Instruct disaggregated on this machine
	@venv=$$(bash hack/setup-venv.sh) && exec "$$venv/bin/kvrelay" serve --model smollm2

test:   ## install what tests need, lint, run every test tier
	bash hack/test.sh

lint:
	@venv=$$(bash hack/setup-venv.sh) && "$$venv/bin/ruff" check . && "$$venv/bin/ruff" format --check .

crds:   ## re-render crds/ from operator/kvrelay_operator/api.py and copy them into the chart
	@venv=$$(bash hack/setup-venv.sh) && "$$venv/bin/kvrelay-render-crds" && bash charts/kvrelay/sync-crds.sh

dashboards:  ## re-render charts/kvrelay/dashboards/*.json from operator/kvrelay_operator/dashboards.py
	@venv=$$(bash hack/setup-venv.sh) && "$$venv/bin/python" -m kvrelay_operator.dashboards
